"""The server installs as wheels, outside any checkout, and serves.

`make dist` builds both wheels and the constraints file from uv.lock; they go into a fresh
virtualenv in a temporary directory with the documented `pip install` (docs/operations.md), and
the installed `aiservices-server` answers GetStatus to the installed `aiservices` command, which
calls through the generated client. Nothing of the checkout is on either import path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import pytest

from tests.support.processes import PROJECT_VERSION, REPO_ROOT, ServerProcess, upstream_settings
from tests.support.waiting import closed_port

# Each wheel and the package it ships its type hints with.
WHEELS = {"aiservices_client": "aiservices", "aiservices_server": "aiservices_server"}


@dataclass(frozen=True)
class Installed:
    dist: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def run(*command: str | Path, cwd: Path) -> str:
    """A command's stdout, once it has exited 0."""
    ran = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert ran.returncode == 0, (command, ran.stdout[-2000:], ran.stderr[-2000:])
    return ran.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Both wheels built by `make dist` and installed, with `pip install`, into a new venv."""
    root = tmp_path_factory.mktemp("installed")
    dist = root / "dist"
    run("make", "--no-print-directory", "dist", f"DIST={dist}", cwd=project_copy(root / "src"))
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=root)
    # The command docs/operations.md gives, run from outside the checkout.
    pip = venv / "bin" / "pip"
    run(pip, "install", "--quiet", "-c", dist / "constraints.txt", *dist.glob("*.whl"), cwd=root)
    yield Installed(dist, venv)


# What `make dist` reads: the projects, their lock, and the uv that `make` installed.
PROJECT_FILES = ("Makefile", "pyproject.toml", "uv.lock", "README.md", "LICENSE")
PROJECT_DIRS = ("server", "clients")


def project_copy(where: Path) -> Path:
    """The checkout's projects, copied: building an sdist writes `*.egg-info` into the source
    tree, which another test run building at the same moment would be rewriting too."""
    for name in PROJECT_FILES:
        where.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, where / name)
    leave_out = shutil.ignore_patterns("*.egg-info", "__pycache__", "build")
    for name in PROJECT_DIRS:
        shutil.copytree(REPO_ROOT / name, where / name, ignore=leave_out)
    (where / ".tools").mkdir()
    (where / ".tools" / "uv").symlink_to(REPO_ROOT / ".tools" / "uv")
    return where


def wheel_metadata(dist: Path, name: str) -> tuple[dict[str, list[str]], list[str]]:
    """A wheel's METADATA headers (each name with all its values) and its file names."""
    (wheel,) = dist.glob(f"{name}-{PROJECT_VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        text = archive.read(f"{name}-{PROJECT_VERSION}.dist-info/METADATA").decode()
    message = HeaderParser().parsestr(text)
    headers: dict[str, list[str]] = {}
    for key, value in message.items():
        headers.setdefault(key, []).append(value)
    return headers, names


@pytest.mark.parametrize("name", WHEELS)
def test_each_wheel_carries_its_metadata_and_only_its_own_package(
    installed: Installed, name: str
) -> None:
    headers, names = wheel_metadata(installed.dist, name)
    assert headers["License-Expression"] == ["MIT"]
    assert headers["License-File"] == ["LICENSE"]
    assert headers["Description-Content-Type"] == ["text/markdown"]
    assert headers["Requires-Python"] == [">=3.11"]
    assert any(value.startswith("Typing :: Typed") for value in headers["Classifier"])
    assert {value.split(",")[0] for value in headers["Project-URL"]} >= {"Homepage", "Source"}
    packages = {path.split("/")[0] for path in names if not path.split("/")[0].endswith("-info")}
    if name == "aiservices_server":
        # The stand-in upstream and the demo are development tools: not in the server.
        assert packages == {"aiservices_server"}
        assert "aiservices_server/upstream/prompts/refine-v1.txt" in names
        assert "aiservices_server/upstream/prompts/refine-v2.txt" in names
        assert f"aiservices-client=={PROJECT_VERSION}" in headers["Requires-Dist"]
    else:
        assert packages == {"aiservices", "aiservices_cli.py"}
        assert "aiservices/v1/tool_service_pb2.pyi" in names
    assert f"{WHEELS[name]}/py.typed" in names


def test_the_installed_server_answers_the_installed_client(installed: Installed) -> None:
    work = installed.venv.parent
    server_script = installed.bin("aiservices-server")
    assert run(server_script, "--version", cwd=work) == f"aiservices-server {PROJECT_VERSION}\n"
    assert "keys new" in run(server_script, "--help", cwd=work)
    keys_file = work / "keys.toml"
    new_key = ("keys", "new", "--id", "ops", "--permission", "*", "--append", keys_file)
    key = run(server_script, *new_key, cwd=work).strip()
    # An upstream that is configured (so the tool is enabled) but never called.
    upstream = f"http://127.0.0.1:{closed_port()}"
    settings = {"API_KEYS_FILE": str(keys_file), **upstream_settings(upstream)}
    with ServerProcess(settings, command=[server_script], name="installed") as server:
        client = ("--target", server.target, "--api-key", key)
        status = run(installed.bin("aiservices"), *client, "status", "--json", cwd=work)
    shown = json.loads(status)
    assert shown["enabled"] is True
    assert [tool["name"] for tool in shown["tools"]] == ["tools.agenta.api.refine_prompt"]
