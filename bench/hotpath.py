"""CPU per call of the service's own Python, in-process: no grpc, no sockets, no other threads.

    .venv/bin/python -m bench.hotpath                 # GetStatus: interceptors + handler
    .venv/bin/python -m bench.hotpath --rpc call      # CallTool, upstream replaced in-process
    .venv/bin/python -m bench.hotpath --profile       # and cProfile's top functions

Starts the real server (loopback, a fresh key, the rate limit raised), then calls the method
exactly as grpc would: the interceptor chain around the servicer method, with a minimal
servicer context. For CallTool the upstream transport is an ``httpx.MockTransport`` returning a
canned completion-runner reply, so the figure covers everything but the network and aiohttp.

Steadier than a load test (a spread of a few per cent between runs, against tens of per cent
for `python -m bench`), so it shows small changes. It is not what a call costs under load: there
the same code runs beside grpc's threads on one core, with cold caches, and costs several times
more (docs/performance.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import uvloop
from aiservices.v1 import tool_service_pb2 as pb
from google.protobuf import struct_pb2
from pydantic import SecretStr

from bench.common import (
    ARGUMENTS,
    ENVIRONMENT_SLUG,
    PROMPT_TEMPLATE_JSON,
    REFINE_PROMPT_KEY,
    TOOL_NAME,
    UPSTREAM_API_KEY,
)
from bench.harness import write_keys_file
from server.app import AiServicesServer
from server.config import Settings
from server.logs import configure_logging

SERVICE = "/aiservices.v1.ToolService/"
# The upstream's answer: the benchmark's template back, which passes every output check.
REPLY = json.dumps(
    {
        "data": json.dumps({**json.loads(PROMPT_TEMPLATE_JSON), "summary": "Made it warmer."}),
        "trace_id": "ab" * 16,
    }
).encode()


class Context:
    """What the interceptors and the servicer use of grpc.aio.ServicerContext."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)
        self.trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    def code(self) -> None:
        return None

    def time_remaining(self) -> float:
        return 30.0

    async def abort(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the call was refused: the measurement set-up is wrong")


def _reply(request: httpx.Request) -> httpx.Response:
    # A stream, as a network transport hands it over: the service reads it with a byte cap.
    return httpx.Response(
        200, headers=[("Content-Type", "application/json")], stream=httpx.ByteStream(REPLY)
    )


def _settings(keys_file: Path) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        grpc_address="127.0.0.1:0",
        api_keys_file=keys_file,
        api_url="http://127.0.0.1:9",
        api_key=SecretStr(UPSTREAM_API_KEY),
        environment_slug=ENVIRONMENT_SLUG,
        refine_prompt_key=REFINE_PROMPT_KEY,
        rate_limit_burst=1_000_000,
        rate_limit_per_minute=6_000_000,
        reflection=False,
    )


def _request(rpc: str) -> Any:
    if rpc == "status":
        return pb.GetStatusRequest()
    arguments = struct_pb2.Struct()
    arguments.update(ARGUMENTS)
    return pb.CallToolRequest(name=TOOL_NAME, arguments=arguments)


async def measure(rpc: str, rounds: int, calls: int, profile: bool, tmp: Path) -> int:
    keys_file = tmp / "keys.toml"
    key = write_keys_file(keys_file)
    server = AiServicesServer(_settings(keys_file), http_transport=httpx.MockTransport(_reply))
    await server.start()
    try:
        assert server.chain is not None and server.servicer is not None
        name = "GetStatus" if rpc == "status" else "CallTool"
        run = server.chain.wrap(SERVICE + name, getattr(server.servicer, name))
        context = Context([("authorization", f"Bearer {key}"), ("user-agent", "hotpath")])
        request = _request(rpc)
        response = await run(request, context)
        if rpc == "call" and response.is_error:
            print(f"CallTool failed: {response.error.message}", file=sys.stderr)
            return 1
        for _ in range(calls):  # warm-up
            await run(request, context)
        costs = []
        for _ in range(rounds):
            started = time.process_time()
            for _ in range(calls):
                await run(request, context)
            costs.append((time.process_time() - started) / calls * 1e6)
        print(
            f"{name}: {statistics.median(costs):.2f} µs CPU per call in-process "
            f"(median of {rounds} rounds of {calls:,}; min {min(costs):.2f})"
        )
        if profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(calls):
                await run(request, context)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
    finally:
        await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hotpath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rpc", choices=("status", "call"), default="status")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=0, help="per round (default by RPC)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 25")
    args = parser.parse_args(argv)
    calls = args.calls or (20_000 if args.rpc == "status" else 4_000)
    with (
        tempfile.TemporaryDirectory(prefix="hotpath-") as tmp,
        open(Path(tmp) / "access.log", "w") as access_log,
    ):
        # Access lines are written as in production, to a file rather than the terminal.
        configure_logging("INFO", access_log)
        try:
            return uvloop.run(measure(args.rpc, args.rounds, calls, args.profile, Path(tmp)))
        finally:
            logging.shutdown()  # written out while the file is still open


if __name__ == "__main__":
    sys.exit(main())
