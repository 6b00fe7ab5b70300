"""``python -m bench`` (``make bench``): the service against its baselines, side by side.

Scenarios, all on 127.0.0.1, every server a process of its own pinned to the same core:

  status    GetStatus: the service against a bare grpc.aio server (a ratio, no target)
  calltool  CallTool to an instant upstream: the service against a bare grpc.aio server doing
            one aiohttp POST (a ratio, no target)
  rest      CallTool: the service against the REST design it replaces, tuned and as merged
            (targets: at least 3x and 30x their req/s); needs pip install -e '.[bench]'
  mcp       tools/call: the service's MCP face against a plain MCP SDK server doing the same
            work, with the service's CallTool in the same rounds (targets: MCP at least 0.9x
            and gRPC at least 3x its req/s); 1,000 calls in flight to a 1 s upstream over MCP
            and gRPC (targets: 0 errors, MCP at least half of gRPC's req/s); needs the extra too
  slow      1,000 calls in flight to a 1 s upstream (targets: 0 errors, peak RSS under 130 MB,
            900 req/s or 0.9 of the bare server's when that is under 900)
  growth    cost growth: CallTool at 1/16/64/256 in flight; RSS at 100/500/1,000 slow calls

Prints a table on stdout (progress on stderr) and writes bench/results/latest.json; a run with
--quick or --only writes bench/results/partial.json instead, unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.harness import ROOT, Harness, Pinning, ProcessFailed
from bench.report import document, machine, render, write_json
from bench.scenarios import FULL, QUICK, Runner, parse_only


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 run per row, shorter windows")
    parser.add_argument(
        "--only", action="append", default=[], metavar="SCENARIO", help="repeat or comma-separate"
    )
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(args_list)
    try:
        selected = parse_only(args.only)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    needs_extra = [name for name in ("rest", "mcp") if name in selected]
    if needs_extra and importlib.util.find_spec("fastapi") is None:
        print(f"python -m bench: {needs_extra[0]} needs pip install -e '.[bench]'", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    name = "partial" if args.quick or args.only else "latest"
    out: Path = args.out or ROOT / "bench" / "results" / f"{name}.json"

    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    # Even when started with SIGINT ignored (a background job), Ctrl-C stops it cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    pinning = Pinning.detect()
    if pinning.load_cpu is not None:
        os.sched_setaffinity(0, {pinning.load_cpu})  # the harness mostly waits: off the server core
    print(f"python -m bench: {pinning.note}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with Harness(pinning) as harness:
            scenarios = Runner(harness, profile).run(selected)
    except ProcessFailed as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    doc = document(
        scenarios,
        command=shlex.join([".venv/bin/python", "-m", "bench", *args_list]),
        elapsed_s=round(time.monotonic() - started, 1),
        machine=machine(pinning.note),
        profile=asdict(profile),
    )
    print(render(doc))
    write_json(out, doc)
    print(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if args.strict and not doc["all_targets_passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
