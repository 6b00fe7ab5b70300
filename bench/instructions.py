"""Instructions per call under load, real server against the bare baseline: a ratio free of noise.

    .venv/bin/python -m bench.instructions status            # GetStatus, 4,000 calls
    .venv/bin/python -m bench.instructions call --calls 1000 # CallTool to the instant upstream
                                                             # (and the service-client baseline)
    .venv/bin/python -m bench.instructions status --floor    # and the floor (bench/floor.py)
    .venv/bin/python -m bench.instructions status --server-env LOG_LEVEL=WARNING  # no access line

Each server runs under ``valgrind --tool=callgrind`` on the server core; after a warm-up this
process makes a fixed number of calls (concurrency 16 over 4 channels) while callgrind counts
the user-space instructions of all the server's threads. The same build gives the same counts
to about 0.1 %, on a busy machine too, so a change worth a few per cent shows here when timed
runs cannot resolve it. It is not time: kernel work, context switches and cache misses are not
counted, and under load one instruction of the service's Python costs more than one of grpc's
C (docs/performance.md). Needs valgrind (Debian package ``valgrind``); takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from bench.common import ARGUMENTS, TOOL_NAME
from bench.harness import Harness, Server, add_server_env_option, harness
from bench.procs import Pinning

CHANNELS = 4
CONCURRENCY_PER_CHANNEL = 4
WARMUP_CALLS = 400
TIMEOUT_S = 120.0
DEFAULT_CALLS = {"status": 4000, "call": 1000}


def _request(rpc: str) -> tuple[str, pb.GetStatusRequest | pb.CallToolRequest]:
    if rpc == "status":
        return "GetStatus", pb.GetStatusRequest()
    arguments = struct_pb2.Struct()
    arguments.update(ARGUMENTS)
    return "CallTool", pb.CallToolRequest(name=TOOL_NAME, arguments=arguments)


async def _calls(target: str, key: str, rpc: str, count: int) -> None:
    """`count` calls, all of which must succeed, shared by the workers of every channel."""
    method, request = _request(rpc)
    metadata = (("authorization", f"Bearer {key}"),)
    left = count

    async def worker(stub: pb_grpc.ToolServiceStub) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reply = await getattr(stub, method)(request, metadata=metadata, timeout=TIMEOUT_S)
            if getattr(reply, "is_error", False):
                raise RuntimeError(f"{method} failed: {reply.error.message}")

    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.ToolServiceStub(channel) for channel in channels]
        await asyncio.gather(
            *(worker(stub) for stub in stubs for _ in range(CONCURRENCY_PER_CHANNEL))
        )
    finally:
        for channel in channels:
            await channel.close()


def _callgrind(action: str, pid: int) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True)


def _dumped_total(dump: Path, timeout: float = 60.0) -> int:
    """The instruction total of the dump `callgrind_control -d` asked for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("totals:", "summary:")) and int(line.split()[1]) > 0:
                    return int(line.split()[1])
        time.sleep(0.2)
    raise RuntimeError(f"no callgrind dump in {dump}")


def count(h: Harness, server: Server, out_dir: Path, rpc: str, calls: int) -> float:
    """Instructions per call of `server` while it serves `calls` calls after a warm-up."""
    asyncio.run(_calls(server.target, h.key, rpc, WARMUP_CALLS))
    _callgrind("--instr=on", server.pid)
    asyncio.run(_calls(server.target, h.key, rpc, calls))
    _callgrind("--instr=off", server.pid)
    _callgrind("--dump", server.pid)
    total = _dumped_total(out_dir / f"callgrind.{server.pid}.1")
    h.stop(server)
    return total / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rpc", choices=("status", "call"))
    parser.add_argument("--calls", type=int, default=0, help="measured calls per server")
    parser.add_argument(
        "--keep", type=Path, help="write the callgrind files here (for callgrind_annotate)"
    )
    parser.add_argument(
        "--floor", action="store_true", help="also count the baseline behind bench.floor"
    )
    add_server_env_option(parser)
    args = parser.parse_args(argv)
    calls = args.calls or DEFAULT_CALLS[args.rpc]
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="instructions-") as tmp,
        harness(Pinning.detect(), dict(args.server_env)) as h,
    ):
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        assert h.instant is not None
        upstream = h.instant[0]
        h.ready_timeout = 300.0
        h.server_wrapper = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out_dir}/callgrind.%p",
        ]
        real = h.real_server(upstream)
        if args.rpc == "status":
            h.capture_status(real)
        per_call = {"real server": count(h, real, out_dir, args.rpc, calls)}
        bare = h.baseline(upstream if args.rpc == "call" else None)
        per_call["bare grpc.aio"] = count(h, bare, out_dir, args.rpc, calls)
        if args.floor:
            floor = h.baseline(upstream if args.rpc == "call" else None, floor=True)
            per_call["floor"] = count(h, floor, out_dir, args.rpc, calls)
        if args.rpc == "call":
            # The bare handler posting through the service's own client: the HTTP layer alone.
            client = h.baseline(upstream, client="service")
            per_call["bare + httpx"] = count(h, client, out_dir, args.rpc, calls)
    method = _request(args.rpc)[0]
    print(f"{method}, {calls:,} calls under load; user-space instructions per call, all threads:")
    base = per_call["bare grpc.aio"]
    for name, value in sorted(per_call.items()):
        extra = "" if value == base else f"  (+{value - base:,.0f}; bare / this {base / value:.2f})"
        print(f"  {name:<14} {value:>10,.0f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
