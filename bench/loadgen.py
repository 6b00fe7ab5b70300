"""Closed-loop asyncio load generator: ``python -m bench.loadgen '<LoadConfig as JSON>'``.

Workers call back to back: GetStatus or CallTool over gRPC channels (each its own connection),
or REST or MCP calls through one aiohttp session. Calls ending in the window after the warm-up
count; CPU and memory are read at the window's edges. It prints a LoadResult as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import aiohttp
import grpc
from google.protobuf import struct_pb2

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from bench.common import ARGUMENTS, REST_PATH, TOOL_NAME

SAMPLE_EVERY_S = 0.1
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
MCP_PROTOCOL: Final = "2026-07-28"
# A tools/call as the SDK's own client posts it: the method and tool name in headers too, and
# the protocol version and client in every request's _meta (the protocol has no sessions).
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Mcp-Method": "tools/call"}
MCP_HEADERS |= {"MCP-Protocol-Version": MCP_PROTOCOL, "Mcp-Name": TOOL_NAME}
MCP_META: Final = {
    "io.modelcontextprotocol/protocolVersion": MCP_PROTOCOL,
    "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
MCP_PARAMS: Final = {"name": TOOL_NAME, "arguments": ARGUMENTS, "_meta": MCP_META}
MCP_CALL: Final = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": MCP_PARAMS}

Call = Callable[[], Awaitable[str]]  # one call: "OK" or a short code for what went wrong


@dataclass(frozen=True, slots=True)
class LoadConfig:
    target: str  # host:port of the server under test
    rpc: str  # "status" or "call" over gRPC; "rest" (POST /tools/call) or "mcp" (tools/call)
    concurrency: int
    warmup_s: float
    duration_s: float
    key: str
    server_pid: int  # whose CPU time and memory the run reads from /proc
    ramp_s: float = 0.0  # start worker i after ramp_s * i / concurrency: no lockstep
    users: bool = False  # a distinct x-agenta-user-id (rate-limit budget) per worker
    timeout_s: float = 30.0
    server_cpu: int | None = None  # the CPU the server is pinned to
    channels: int = 0  # gRPC channels; 0: 1 to 8, by concurrency
    tool: str = TOOL_NAME  # which tool a gRPC CallTool calls, with these arguments
    arguments: dict[str, Any] = field(default_factory=lambda: dict(ARGUMENTS))


@dataclass(slots=True)
class LoadResult:
    window_s: float
    calls: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float
    server_util: float  # share of one core the server used in the window
    server_rss_peak_mb: float
    server_hwm_mb: float
    client_util: float
    server_cpu_busy: float | None  # how busy the server's CPU was, counting every process on it
    totals: dict[str, int]  # every call that ended, in the window or not, by code


def _grpc_call(config: LoadConfig, channel: grpc.aio.Channel, index: int) -> Call:
    stub = pb_grpc.ToolServiceStub(channel)
    user = [("x-agenta-user-id", f"user-{index}")] if config.users else []
    metadata = (("authorization", f"Bearer {config.key}"), *user)
    arguments = struct_pb2.Struct()
    arguments.update(config.arguments)
    request = pb.CallToolRequest(name=config.tool, arguments=arguments)
    timeout = config.timeout_s

    async def call() -> str:
        try:
            if config.rpc == "status":
                await stub.GetStatus(pb.GetStatusRequest(), metadata=metadata, timeout=timeout)
                return "OK"
            response = await stub.CallTool(request, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        if response.is_error:
            return f"is_error:{pb.ToolErrorCode.Name(response.error.code)}"
        return "OK"

    return call


def _http_call(config: LoadConfig, session: aiohttp.ClientSession, index: int) -> Call:
    """The REST design's ``POST /tools/call``, or an MCP ``tools/call`` posted as the SDK's own
    client posts it (protocol 2026-07-28: the version and method in headers and in ``_meta``)."""
    headers = {"Authorization": f"Bearer {config.key}", "Content-Type": "application/json"}
    if config.users:
        headers["x-agenta-user-id"] = f"user-{index}"
    if config.rpc == "rest":
        url = f"http://{config.target}{REST_PATH}"
        request: dict[str, Any] = {"name": TOOL_NAME, "arguments": ARGUMENTS}
    else:
        url, request, headers = f"http://{config.target}/mcp", MCP_CALL, headers | MCP_HEADERS
    body = json.dumps(request).encode()

    async def call() -> str:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
        if response.status != 200:
            return f"HTTP {response.status}"
        reply = json.loads(payload)
        if "error" in reply:
            return f"JSON-RPC {reply['error'].get('code')}"
        return "is_error" if reply.get("result", reply).get("isError") else "OK"

    return call


def sample(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system, all threads), VmRSS and VmHWM in kB of a process and its
    children (a supervisor's workers) now."""
    cpu, rss, hwm = _sample_one(pid)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        for child in map(_sample_one, map(int, f.read().split())):
            cpu, rss, hwm = cpu + child[0], rss + child[1], hwm + child[2]
    return cpu, rss, hwm


def _sample_one(pid: int) -> tuple[float, int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    kb = {"VmRSS:": 0, "VmHWM:": 0}  # 0 for a process that has exited
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        kb |= {name: int(rest[0]) for name, *rest in map(str.split, f) if name in kb}
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, kb["VmRSS:"], kb["VmHWM:"]


def cpu_ticks(cpu: int | None) -> tuple[int, int]:
    """(busy, total) clock ticks since boot of CPU ``cpu``, all processes counted ((0, 0): None)."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if cpu is not None and name == f"cpu{cpu}":
                ticks = [int(v) for v in values[:8]]
                return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait
    return 0, 0


async def _connect(config: LoadConfig, stack: contextlib.AsyncExitStack) -> list[Call]:
    """A call per worker, over one aiohttp session or 1 to 8 gRPC channels (``stack`` closes)."""
    if config.rpc in ("rest", "mcp"):
        connector = aiohttp.TCPConnector(limit=config.concurrency)
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        stack.push_async_callback(session.close)
        return [_http_call(config, session, i) for i in range(config.concurrency)]
    channels = []
    by_load = 1 if config.concurrency <= 1 else min(8, max(2, config.concurrency // 16))
    count = config.channels or by_load
    for i in range(count):
        # A distinct option per channel keeps grpc from sharing one connection.
        options = [("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)]
        channel = grpc.aio.insecure_channel(config.target, options=options)
        stack.push_async_callback(channel.close)
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        channels.append(channel)
    return [_grpc_call(config, channels[i % count], i) for i in range(config.concurrency)]


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, round(q * len(ordered)) - 1)] if ordered else 0.0


async def run(config: LoadConfig) -> LoadResult:
    """Start the workers, measure one window after the warm-up, then stop them."""
    codes, totals = Counter[str](), Counter[str]()
    latencies: list[float] = []
    measuring, stopping = asyncio.Event(), asyncio.Event()

    async def worker(index: int, call: Call) -> None:
        await asyncio.sleep(config.ramp_s * index / config.concurrency)  # no lockstep
        while not stopping.is_set():
            start = time.perf_counter()
            try:
                code = await call()
            except Exception as exc:
                code = type(exc).__name__
            totals[code] += 1
            if measuring.is_set():
                codes[code] += 1
                if code == "OK":
                    latencies.append(time.perf_counter() - start)
            if code != "OK":
                await asyncio.sleep(0.01)  # a failing server answers fast: do not spin on it

    bound = config.warmup_s + config.duration_s + config.timeout_s + 30.0
    async with asyncio.timeout(bound), contextlib.AsyncExitStack() as stack:
        calls = await _connect(config, stack)
        workers = [asyncio.create_task(worker(i, call)) for i, call in enumerate(calls)]
        try:
            await asyncio.sleep(config.warmup_s)
            cpu0, peak_kb, _ = sample(config.server_pid)
            busy0, total0 = cpu_ticks(config.server_cpu)
            client0, t0 = time.process_time(), time.perf_counter()
            measuring.set()
            end = t0 + config.duration_s
            while (now := time.perf_counter()) < end:
                await asyncio.sleep(min(SAMPLE_EVERY_S, end - now))
                peak_kb = max(peak_kb, sample(config.server_pid)[1])
            measuring.clear()
            t1, client1 = time.perf_counter(), time.process_time()
            cpu1, rss_kb, hwm_kb = sample(config.server_pid)
            busy1, total1 = cpu_ticks(config.server_cpu)
        finally:
            stopping.set()  # let calls in flight finish, then cancel what is left
            _, pending = await asyncio.wait(workers, timeout=config.timeout_s + 2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    window, server_cpu_s, ordered = t1 - t0, cpu1 - cpu0, sorted(latencies)
    calls_done = sum(codes.values())
    return LoadResult(
        window_s=window,
        calls=calls_done,
        errors={code: n for code, n in codes.most_common() if code != "OK"},
        rps=codes["OK"] / window,
        p50_ms=_percentile(ordered, 0.50) * 1000,
        p99_ms=_percentile(ordered, 0.99) * 1000,
        client_util=(client1 - client0) / window,
        server_cpu_us_per_call=server_cpu_s / max(calls_done, 1) * 1e6,
        server_util=server_cpu_s / window,
        server_rss_peak_mb=max(peak_kb, rss_kb) / 1024,
        server_hwm_mb=hwm_kb / 1024,
        server_cpu_busy=(busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
        totals=dict(totals),
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.loadgen '<LoadConfig JSON>'")
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(run(LoadConfig(**json.loads(sys.argv[1]))))
        print(json.dumps(asdict(result)), flush=True)
