"""The table on stdout and bench/results/latest.json."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.results_model import Row, Scenario

PACKAGES = ("grpcio", "protobuf", "httpx", "aiohttp", "httpx-aiohttp", "prometheus-client")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(pinning_note: str) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "pinning": pinning_note,
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _errors(row: Row) -> str:
    errors = row.errors
    if not errors:
        return "0"
    code, n = errors.most_common(1)[0]
    total = sum(errors.values())
    return f"{total} ({code})" if total == n else f"{total} ({code} {n}, ...)"


HEADER = (
    "| # | variant | conc | req/s | p50 ms | p99 ms | server µs/call | core cap. req/s "
    "| server CPU | client CPU | upstream CPU | errors | RSS MB | ratio | CPU ratio | bound by |"
)


def _row_line(key: str, row: Row) -> str:
    return (
        f"| {key} | {row.label} | {row.concurrency} "
        f"| {_num(row.median('rps'))} "
        f"| {_num(row.median('p50_ms'), '.1f')} "
        f"| {_num(row.median('p99_ms'), '.1f')} "
        f"| {_num(row.median('server_cpu_us_per_call'))} "
        f"| {_num(row.capacity)} "
        f"| {_pct(row.median('server_util'))} "
        f"| {_pct(row.median('client_util'))} "
        f"| {_pct(row.median('upstream_util'))} "
        f"| {_errors(row)} "
        f"| {_num(row.rss_mb, '.1f')} "
        f"| {_num(row.ratio, '.2f')} "
        f"| {_num(row.cpu_ratio, '.2f')} "
        f"| {row.bound} |"
    )


def render(
    scenarios: list[Scenario], info: dict[str, Any], command: str, runs: int, elapsed: float
) -> str:
    m, v = info["machine"], info["versions"]
    lines = [
        f"Command: `{command}` ({elapsed:.0f} s, median of {runs} run{'s' if runs > 1 else ''} "
        "per row)",
        f"Machine: {m['cores']} cores, {m['cpu_model']}; {m['pinning']}",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in v.items()),
        "",
        HEADER,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario in scenarios:
        lines.extend(_row_line(scenario.key, row) for row in scenario.rows)
    lines.append("")
    lines.append(
        "server/client/upstream CPU: share of one core used by that process in the window; "
        "server µs/call: server utime+stime per completed call; core cap.: 1e6 / server "
        "µs/call, what one dedicated core would serve; RSS: sampled VmRSS peak, or VmHWM "
        "where the server was fresh for the run; ratio: median of per-round req/s ratios to "
        "the baseline row; CPU ratio: the same for baseline µs/call / server µs/call (robust "
        "when other processes share the cores); bound by: the side whose CPU was >= 85% busy, "
        '"core shared" when the core was >= 95% busy counting other processes, '
        '"latency" when none was. CLIENT CPU means the load generator, not the server, '
        "limited the run."
    )
    notes = [
        f"- {scenario.key}. {scenario.title}: {note}"
        for scenario in scenarios
        for note in scenario.notes
    ]
    noisy = []
    for scenario in scenarios:
        for row in scenario.rows:
            on_server, on_load = row.other_load
            if (on_server or 0) > 0.15 or (on_load or 0) > 0.15:
                noisy.append(
                    f"{scenario.key} {row.label} c={row.concurrency} "
                    f"(server core {_pct(on_server)}, load core {_pct(on_load)})"
                )
    if noisy:
        notes.append(
            "- CPU time not charged to any benchmark process (other processes on the machine, "
            "or kernel network work) during: " + "; ".join(noisy) + ". Where that lands on the "
            "server core, req/s is low; µs/call and the interleaved ratios hold better."
        )
    client_bound = [
        f"{scenario.key} {row.label} c={row.concurrency}"
        for scenario in scenarios
        for row in scenario.rows
        if row.bound == "CLIENT CPU"
    ]
    if client_bound:
        notes.append(
            "- THE LOAD GENERATOR WAS THE BOTTLENECK in: "
            + "; ".join(client_bound)
            + ". Those req/s are a floor for the server, not its limit."
        )
    if notes:
        lines += ["", "Notes:", *notes]
    targets = [t for scenario in scenarios for t in scenario.targets]
    if targets:
        lines += ["", "| target | value | pass |", "|---|---:|---|"]
        for target in targets:
            value = "-" if target.value is None else f"{target.value:,.2f}".rstrip("0").rstrip(".")
            threshold = f"{target.threshold:,g}"
            lines.append(
                f"| {target.name} {target.op} {threshold} | {value} "
                f"| {'PASS' if target.passed else 'FAIL'} |"
            )
    return "\n".join(lines) + "\n"


def write_json(
    path: Path,
    scenarios: list[Scenario],
    info: dict[str, Any],
    command: str,
    profile: dict[str, Any],
    elapsed: float,
) -> None:
    targets = [t for scenario in scenarios for t in scenario.targets]
    document = {
        "command": command,
        "elapsed_s": round(elapsed, 1),
        **info,
        "profile": profile,
        "scenarios": [scenario.to_json() for scenario in scenarios],
        "targets": [t.to_json() for t in targets],
        "all_targets_passed": all(t.passed for t in targets),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
