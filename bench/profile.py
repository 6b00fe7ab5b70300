"""Where the real server's time goes under benchmark load: py-spy on the server process.

    .venv/bin/pip install py-spy                 # optional; `make bench` does not need it
    .venv/bin/python -m bench.profile            # CallTool, instant upstream, concurrency 64
    .venv/bin/python -m bench.profile --load status
    .venv/bin/python -m bench.profile --load slow   # 1,000 calls in flight, 1 s upstream

Starts the same processes as ``python -m bench`` (server on the server CPU, load generator,
upstream and py-spy on the load CPU), records the server with ``py-spy record --gil`` (only the
thread holding the GIL: for an asyncio server, the time that limits throughput) and prints the
shares of samples: inclusive for server code, self (leaf) for everything, and by package. The
collapsed stacks are kept in bench/results/profile-<load>.txt for flame graph tools.
Sampling slows the server down; the shares, not the absolute req/s, are the result.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.harness import harness
from bench.loadgen import LoadResult
from bench.procs import ROOT, Pinning

LOADS = {
    "call": {"rpc": "call", "concurrency": 64, "channels": 4},
    "status": {"rpc": "status", "concurrency": 64, "channels": 4},
    "slow": {
        "rpc": "call",
        "concurrency": 1000,
        "channels": 8,
        "users": True,
        "ramp_s": 1.0,
        "timeout_s": 30.0,
    },
}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
_PREFIXES = (str(ROOT) + "/", "site-packages/", "lib/python3.11/", "lib/python3.12/")


def _short(path: str) -> str:
    for marker in _PREFIXES:
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _package(path: str) -> str:
    return path if path.startswith("server/") else path.split("/", maxsplit=1)[0]


def summarize(raw: Path, top: int) -> str:
    """Shares of py-spy's collapsed stacks (``frame;frame;... count`` lines)."""
    total = 0
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for text in stack.split(";"):
            found = _FRAME.match(text.strip())
            frames.append((found["func"], _short(found["file"])) if found else (text.strip(), "?"))
        for key in {f"{file}:{func}" for func, file in frames}:
            inclusive[key] += n
        func, file = frames[-1]
        leaf[f"{file}:{func}"] += n
        by_package[_package(file)] += n
    if total == 0:
        return "no samples (is the server busy? does py-spy have ptrace permission?)"

    def share(n: int) -> str:
        return f"{100 * n / total:5.1f}%"

    lines = [f"{total} samples holding the GIL", "", "inclusive, server code:"]
    lines += [
        f"  {share(n)}  {key}"
        for key, n in inclusive.most_common()
        if key.startswith("server/") and not key.startswith("server/__main__")
    ][:top]
    lines += ["", "self (leaf frame; C code called from a frame counts as that frame):"]
    lines += [f"  {share(n)}  {key}" for key, n in leaf.most_common(top)]
    lines += ["", "self by package:"]
    lines += [f"  {share(n)}  {key}" for key, n in by_package.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load", choices=sorted(LOADS), default="call")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--native", action="store_true", help="also sample C frames")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2

    pinning = Pinning.detect()
    if pinning.load_cpu is not None:
        os.sched_setaffinity(0, {pinning.load_cpu})
    raw = ROOT / "bench" / "results" / f"profile-{args.load}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    load = dict(LOADS[args.load])
    warmup = 2.5 if args.load == "slow" else 1.0
    with harness(pinning, {}) as h:
        assert h.instant is not None and h.slow is not None
        upstream = h.slow if args.load == "slow" else h.instant
        server = h.real_server(upstream[0])
        cmd = [
            *pinning.prefix(pinning.load_cpu),
            spy,
            "record",
            "--pid",
            str(server.pid),
            "--gil",
            "--rate",
            str(args.rate),
            "--duration",
            str(round(warmup + args.seconds)),
            "--format",
            "raw",
            "--output",
            str(raw),
            *(["--native"] if args.native else []),
        ]
        recorder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            result: LoadResult = h.load(
                server, upstream[1], warmup_s=warmup, duration_s=args.seconds, **load
            )
        finally:
            try:
                _, err = recorder.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                _, err = recorder.communicate()
    if recorder.returncode != 0 or not raw.exists():
        print(f"py-spy failed:\n{err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return 1
    print(
        f"load {args.load}: {result.rps:,.0f} req/s while sampled, "
        f"server {result.server_cpu_us_per_call or 0:,.0f} µs CPU/call, "
        f"errors {sum(result.errors.values())}\n"
    )
    print(summarize(raw, args.top))
    print(f"\ncollapsed stacks: {raw.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
