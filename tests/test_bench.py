"""`make bench` keeps working: a quick run of the GetStatus and CallTool scenarios completes and
reports every row with its ratio. The figures themselves are not judged here (machines differ);
the benchmark's own targets are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_quick_benchmark_run_reports_every_row_with_its_ratio(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "status,calltool", "--out", out],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "| target |" in finished.stdout

    results = json.loads(out.read_text())
    rows = {row["label"]: row for scenario in results["scenarios"] for row in scenario["rows"]}
    assert set(rows) == {
        "bare grpc.aio GetStatus",
        "bare grpc.aio + floor interceptor",
        "real server GetStatus",
        "bare grpc.aio + aiohttp POST",
        "bare grpc.aio + service HTTP client",
        "real server CallTool",
    }
    for label, row in rows.items():
        assert row["errors"] == {}, label
        assert row["median"]["rps"] > 0, label
        assert row["median"]["server_cpu_us_per_call"] > 0, label
    for label in ("bare grpc.aio + floor interceptor", "real server GetStatus"):
        assert 0 < rows[label]["ratio"] < 2, label
    targets = {target["name"]: target for target in results["targets"]}
    assert targets["CallTool req/s on one server core"]["value"] > 0
    assert all(target["value"] is not None for target in targets.values())
