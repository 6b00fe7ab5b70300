"""`make bench` keeps working: a quick run of the GetStatus and CallTool scenarios starts the
service and the bare baseline as processes, measures both, and reports every row with its ratio,
in the table and in the JSON file, CallTool also with traces exported to a real OTLP receiver
beside the same service with traces off; a quick run of the MCP scenario does the same for the MCP
face, the plain SDK server and the gRPC face, and of the workers scenario for two workers and
two replicas behind nginx beside one process. The figures themselves are not judged here
(machines differ); the benchmark's own targets are."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench.scenarios import slow_rps_floor

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_quick_run_reports_the_service_and_the_bare_baseline_side_by_side(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results.json"
    finished = run_bench("--quick", "--only", "status,calltool", "--out", str(out))

    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {row["label"]: row for scenario in results["scenarios"] for row in scenario["rows"]}
    assert set(rows) == {
        "bare grpc.aio GetStatus",
        "service GetStatus",
        "bare grpc.aio + aiohttp CallTool",
        "service CallTool",
        "service CallTool, traces on",
    }
    for label, row in rows.items():
        assert row["errors"] == {}, label
        assert row["median"]["rps"] > 0, label
        assert row["median"]["server_cpu_us_per_call"] > 0, label
        assert row["rss_mb"] > 20, label  # a Python gRPC server's resident memory, in MB
    assert rows["service GetStatus"]["ratio_to"] == "bare grpc.aio GetStatus"
    assert rows["service GetStatus"]["ratio"] > 0
    assert rows["service CallTool"]["ratio_to"] == "bare grpc.aio + aiohttp CallTool"
    assert rows["service CallTool"]["ratio"] > 0
    assert rows["service CallTool, traces on"]["ratio_to"] == "service CallTool"
    assert rows["service CallTool, traces on"]["ratio"] > 0
    # The traced service's spans reached the receiver: the row measured tracing, not a no-op.
    calltool = next(s for s in results["scenarios"] if s["key"] == "calltool")
    took = [m[1] for note in calltool["notes"] if (m := re.search(r"receiver took ([\d,]+)", note))]
    assert len(took) == 1, calltool["notes"]
    assert int(took[0].replace(",", "")) > 0, calltool["notes"]
    targets = {t["name"]: t for t in results["targets"]}
    assert set(targets) == {
        "GetStatus req/s / bare grpc.aio GetStatus",
        "CallTool req/s / bare grpc.aio + aiohttp CallTool",
    }
    status_target = targets["GetStatus req/s / bare grpc.aio GetStatus"]
    assert status_target["value"] == rows["service GetStatus"]["ratio"]
    assert (status_target["op"], status_target["threshold"]) == (">=", 0.6)
    table = [line for line in finished.stdout.splitlines() if line.startswith("| status |")]
    assert len(table) == 2
    assert "of bare grpc.aio GetStatus" in table[1]
    assert "| calltool | service CallTool, traces on | 64 |" in finished.stdout
    assert "of service CallTool |" in finished.stdout


def test_a_quick_mcp_run_sets_the_mcp_face_beside_the_sdk_server_and_grpc(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    finished = run_bench("--quick", "--only", "mcp", "--out", str(out))

    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {row["label"]: row for row in results["scenarios"][0]["rows"]}
    sdk = "plain MCP SDK server tools/call"
    slow_grpc = "service CallTool, 1 s upstream"
    assert rows["service MCP tools/call"]["ratio_to"] == sdk
    assert rows["service CallTool"]["ratio_to"] == sdk
    assert rows["service MCP tools/call, 1 s upstream"]["ratio_to"] == slow_grpc
    for label, row in rows.items():
        assert row["errors"] == {}, label  # every tools/call answered, without isError
        assert row["median"]["rps"] > 0, label
    assert rows["service MCP tools/call, 1 s upstream"]["concurrency"] == 1000
    targets = {target["name"]: target for target in results["targets"]}
    assert len(targets) == 4
    assert targets["1,000 in flight: req/s, MCP / gRPC"]["threshold"] == 0.5
    assert all(target["value"] is not None for target in targets.values())
    assert "| mcp | service MCP tools/call | 64 |" in finished.stdout


def test_a_quick_workers_run_sets_two_workers_and_nginx_beside_one_process(
    tmp_path: Path,
) -> None:
    out = tmp_path / "results.json"
    finished = run_bench("--quick", "--only", "workers", "--out", str(out))

    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {row["label"]: row for row in results["scenarios"][0]["rows"]}
    one, two, nginx = "service, 1 process", "service, WORKERS=2", "2 replicas behind nginx"
    assert set(rows) == {one, two, nginx}
    for label, row in rows.items():
        assert row["errors"] == {}, label
        assert row["median"]["rps"] > 0, label
    assert rows[two]["ratio_to"] == rows[nginx]["ratio_to"] == one
    # The supervisor's row counts its workers too: two servers' memory and more.
    assert rows[two]["rss_mb"] > 1.5 * rows[one]["rss_mb"], (rows[two], rows[one])
    assert "| workers | 2 replicas behind nginx | 64 |" in finished.stdout


def test_a_quick_upstreams_run_sets_a_declared_tool_beside_refine_prompt(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    finished = run_bench("--quick", "--only", "upstreams", "--out", str(out))

    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = {row["label"]: row for row in results["scenarios"][0]["rows"]}
    declared = rows["service CallTool, declared tool, OpenAI-compatible"]
    assert declared["ratio_to"] == "service CallTool, OpenAI-compatible"
    for label, row in rows.items():
        assert row["errors"] == {}, label  # the declared tool's answers fit its schema
        assert row["median"]["rps"] > 0, label
    targets = {t["name"]: t for t in results["targets"]}
    assert targets["CallTool req/s, declared tool / refine_prompt"]["value"] == declared["ratio"]


def test_an_unknown_scenario_is_refused_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    finished = run_bench("--only", "status,nonsense", "--out", str(out))

    assert finished.returncode == 2
    assert "unknown scenario 'nonsense'" in finished.stderr
    assert "status, calltool, upstreams, rest, mcp, slow, growth" in finished.stderr
    assert not out.exists()


def test_the_slow_req_s_target_follows_a_bare_baseline_that_cannot_reach_900() -> None:
    assert slow_rps_floor(990.0) == 900.0
    assert slow_rps_floor(900.0) == 900.0
    assert slow_rps_floor(800.0) == 720.0
