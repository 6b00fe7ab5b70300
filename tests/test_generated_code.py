"""The committed generated code matches the proto (byte for byte, with the pinned generators),
the packages that ship it declare at least the runtime versions it checks at import, and the proto
passes buf lint."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from aiservices.v1 import tool_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "clients" / "aiservices" / "v1"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_committed_generated_code_is_current(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            "aiservices/v1/tool_service.proto",
        ],
        check=True,
        cwd=ROOT,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "aiservices" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.glob("tool_service_pb2*")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make proto` and commit"


def test_proto_passes_buf_lint() -> None:
    buf = str(BUF) if BUF.exists() else shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: `make tools` installs it")
    result = subprocess.run(
        [buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def generated_protobuf_version() -> Version:
    """The protobuf runtime the generated messages require: the arguments of their
    `ValidateProtobufRuntimeVersion(domain, major, minor, patch, suffix, file)` call."""
    tree = ast.parse((GENERATED / "tool_service_pb2.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "ValidateProtobufRuntimeVersion"
        ):
            major, minor, patch = (ast.literal_eval(arg) for arg in node.args[1:4])
            return Version(f"{major}.{minor}.{patch}")
    raise AssertionError("the generated messages no longer check the protobuf runtime")


def declared_floor(pyproject: Path, distribution: str) -> Version:
    """The lowest version of `distribution` a project's dependencies admit (its `>=` bound)."""
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (requirement,) = [
        Requirement(line) for line in dependencies if Requirement(line).name == distribution
    ]
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert floors, f"{pyproject.relative_to(ROOT)} gives {distribution} no lower bound"
    return max(floors)


@pytest.mark.parametrize("pyproject", ["clients/pyproject.toml", "pyproject.toml"])
def test_declared_floors_admit_no_runtime_the_generated_code_refuses(pyproject: str) -> None:
    # grpcio older than GRPC_GENERATED_VERSION makes the stubs raise at import; protobuf older
    # than the messages' version makes them refuse to load. Regenerating with newer generators
    # raises both, and this fails until the floors follow.
    needed = {
        "grpcio": Version(tool_service_pb2_grpc.GRPC_GENERATED_VERSION),
        "protobuf": generated_protobuf_version(),
    }
    floors = {name: declared_floor(ROOT / pyproject, name) for name in needed}
    assert {name: floors[name] >= needed[name] for name in needed} == dict.fromkeys(needed, True), (
        f"{pyproject}: declared {floors}, the generated code needs {needed}"
    )


def test_the_server_and_the_client_it_serves_are_released_together() -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert f"aiservices-client=={client['version']}" in server["dependencies"]
    assert server["version"] == client["version"]
