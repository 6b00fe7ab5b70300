"""The committed generated code matches the proto, and the proto passes buf lint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
