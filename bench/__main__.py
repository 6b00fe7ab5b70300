"""``python -m bench`` (``make bench``): the service against its baselines, side by side.

Scenarios (listed below, from TITLES in bench/scenarios.py): every server a process of its own on
127.0.0.1 pinned to one core; their targets are in the report and in docs/performance.md.

Prints a table on stdout (progress on stderr) and writes bench/results/latest.json; a run with
--quick or --only writes bench/results/partial.json instead, unless --out says otherwise."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.scenarios import ROOT

PACKAGES = ("grpcio", "protobuf", "httpx", "aiohttp", "fastapi", "uvicorn", "uvloop", "mcp")
EXTRA = ("rest", "mcp")  # the scenarios that need the bench extra


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    listing = [f"  {k + '*' * (k in EXTRA):10} {title}" for k, title in scenarios.TITLES.items()]
    parser = argparse.ArgumentParser(  # RawDescription: the docstring's layout kept as written
        "python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = "scenarios (* needs pip install -e '.[bench]'):\n" + "\n".join(listing)
    parser.add_argument("--quick", action="store_true", help="1 run per row, shorter windows")
    parser.add_argument(
        "--only", action="extend", type=names, default=[], help="repeat or comma-separate"
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(args_list)
    selected = [name for name in scenarios.TITLES if name in args.only or not args.only]
    if (extra := sorted(set(EXTRA) & set(selected))) and not importlib.util.find_spec("fastapi"):
        parser.error(f"{extra[0]} needs pip install -e '.[bench]'")
    profile = scenarios.QUICK if args.quick else scenarios.FULL
    name = "partial" if args.quick or args.only else "latest"
    out: Path = args.out or ROOT / "bench" / "results" / f"{name}.json"

    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    # Even when started with SIGINT ignored (a background job), Ctrl-C stops it cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pinning = scenarios.Pinning.detect()
    print(f"python -m bench: {pinning.note}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with scenarios.Runner(pinning, profile) as runner:
            results = runner.run(selected)
    except scenarios.ProcessFailed as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    targets = [t for s in results for t in s["targets"]]
    doc: dict[str, Any] = {"command": shlex.join([".venv/bin/python", "-m", "bench", *args_list])}
    doc |= {"elapsed_s": round(time.monotonic() - started, 1), "machine": machine(pinning.note)}
    doc |= {"profile": asdict(profile), "scenarios": results, "targets": targets}
    doc["all_targets_passed"] = all(t["passed"] for t in targets)
    print(render(doc))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")  # written whole, then renamed: a reader never sees half of it
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if args.strict and not doc["all_targets_passed"] else 0


def names(value: str) -> list[str]:
    """``--only status,slow``: scenario names, each refused unless known."""
    found = [name.strip().lower() for name in value.split(",")]
    if unknown := [name for name in found if name not in scenarios.TITLES]:
        known = ", ".join(scenarios.TITLES)
        raise argparse.ArgumentTypeError(f"unknown scenario {unknown[0]!r}: use {known}")
    return found


def machine(pinning: str) -> dict[str, Any]:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    installed = {dist.metadata["Name"].lower(): dist.version for dist in metadata.distributions()}
    versions = {"python": platform.python_version()}
    versions |= {name: installed.get(name, "not installed") for name in PACKAGES}
    model = models[0] if models else platform.processor() or "unknown"
    return {"cores": os.cpu_count(), "cpu_model": model, "pinning": pinning, "versions": versions}


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict[str, Any]) -> str:
    """The report as Markdown: how it was run, one table row per Row, notes, then targets."""
    m, runs = doc["machine"], doc["profile"]["runs"]
    lines = [
        f"Command: `{doc['command']}` ({doc['elapsed_s']:.0f} s, median of {runs} "
        f"run{'s' if runs > 1 else ''} per row)",
        f"Machine: {m['cores']} cores, {m['cpu_model']}; {m['pinning']}",
        "Versions: " + ", ".join(f"{name} {v}" for name, v in m["versions"].items()),
        "",
        "| # | variant | conc. | req/s | p50 ms | p99 ms | server CPU µs/call | server CPU "
        "| client CPU | errors | RSS MB | ratio | bound by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for scenario in doc["scenarios"]:
        for row in scenario["rows"]:
            med, errors = row["median"], row["errors"]
            worst = f"{sum(errors.values())} ({max(errors, key=errors.get)})" if errors else "0"
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f} of {row['ratio_to']}"
            cells = [scenario["key"], row["label"], f"{row['concurrency']:,}"]
            cells += [_num(med[metric], spec) for metric, spec in scenarios.METRICS.items()]
            cells += [worst, _num(row["rss_mb"], ".1f"), ratio, row["bound"]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "server/client CPU: share of one core the server / the load generator used; RSS: peak "
        "VmRSS in the window, or VmHWM where the server was fresh for the run; ratio: median of "
        "per-round req/s ratios to the named row; bound by: the side at least 85 % busy (CLIENT "
        "CPU: the load generator limited the run, its req/s a floor for the server's).",
    ]
    notes = [f"- {s['key']}. {note}" for s in doc["scenarios"] for note in s["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    if doc["targets"]:
        lines += ["", "| target | this run | pass |", "|---|---:|---|"]
        for t in doc["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:,.2f}".rstrip("0").rstrip(".")
            verdict = "PASS" if t["passed"] else "FAIL"
            lines.append(f"| {t['name']} {t['op']} {t['threshold']:,g} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
