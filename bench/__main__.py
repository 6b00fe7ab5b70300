"""``python -m bench`` (``make bench``): the service against its baselines, side by side.

Scenarios (issue 5), all on 127.0.0.1, each process on its own, servers pinned to one core:

1. bare grpc.aio server, same proto, trivial handlers (the baseline)
2. GetStatus through the real server, and its ratio to (1); beside it the floor, (1) behind
   the least interceptor the same concerns need (bench/floor.py)
3. CallTool refine_prompt to an instant upstream, against a bare grpc.aio handler doing one
   aiohttp POST to the same upstream
4. a 1 s upstream with 1,000 calls in flight: req/s, latency, errors, peak RSS
5. cost growth: CallTool by concurrency 1/16/64/256; RSS by 100/500/1,000 slow calls in flight

Prints a table on stdout (progress on stderr) and writes bench/results/latest.json (a run with
--quick or --only writes bench/results/partial.json instead, unless --out says otherwise).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench.harness import add_server_env_option, harness
from bench.procs import ROOT, Pinning, ProcessFailed
from bench.report import machine, render, versions, write_json
from bench.scenarios import FULL, QUICK, Runner, describe_profile, parse_only

RESULTS = ROOT / "bench" / "results"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 run per row, shorter windows")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help="1-5 or baseline, status, calltool, slow, growth; repeat or comma-separate",
    )
    add_server_env_option(parser)
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a target is missed (for CI)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args = parse(args_list)
    try:
        selected = parse_only(args.only)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    partial = args.quick or bool(args.only)
    out: Path = args.out or RESULTS / ("partial.json" if partial else "latest.json")
    command = shlex.join([".venv/bin/python", "-m", "bench", *args_list])

    signal.signal(signal.SIGTERM, _terminate)
    # Even when started with SIGINT ignored (a background job), Ctrl-C or kill -INT stops cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pinning = Pinning.detect()
    if pinning.load_cpu is not None:
        # The harness mostly waits; keep it off the server's core anyway.
        os.sched_setaffinity(0, {pinning.load_cpu})
    info = {"machine": machine(pinning.note), "versions": versions()}
    print(f"python -m bench: {pinning.note}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with harness(pinning, dict(args.server_env)) as h:
            scenarios = Runner(h, profile).run(selected)
    except ProcessFailed as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started

    print(render(scenarios, info, command, profile.runs, elapsed))
    write_json(out, scenarios, info, command, describe_profile(profile), elapsed)
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    if args.strict and not all(t.passed for s in scenarios for t in s.targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
