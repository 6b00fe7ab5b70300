"""Closed-loop asyncio load generator, run as its own process by the harness.

``python -m bench.loadgen '<LoadConfig as JSON>'`` runs ``concurrency`` workers that call back to
back: gRPC GetStatus or CallTool through the generated stubs over 1 to 8 channels (each its own
HTTP/2 connection, as several client replicas would open), or the REST design's ``POST
/tools/call`` or an MCP ``tools/call`` through one aiohttp session. After the warm-up, calls that
complete inside the ``duration_s`` window count; the server's CPU time and memory, and the load
generator's own CPU time, are read at the window's edges. It prints one JSON line (a LoadResult).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import aiohttp
import grpc
from google.protobuf import struct_pb2

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from bench.common import ARGUMENTS, REST_PATH, TOOL_NAME

SAMPLE_EVERY_S = 0.1
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
MCP_PATH: Final = "/mcp"
MCP_PROTOCOL: Final = "2026-07-28"
# A tools/call as the SDK's own client posts it: the method and tool name in headers too, and
# the protocol version and client in every request's _meta (the protocol has no sessions).
MCP_HEADERS: Final = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": MCP_PROTOCOL,
    "Mcp-Method": "tools/call",
    "Mcp-Name": TOOL_NAME,
}
MCP_CALL: Final = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": TOOL_NAME,
        "arguments": ARGUMENTS,
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MCP_PROTOCOL,
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}

Call = Callable[[], Awaitable[str]]
"""One call; returns "OK" or a short code for what went wrong."""


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


@dataclass(slots=True)
class LoadResult:
    window_s: float
    calls: int
    ok: int
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


def _grpc_call(config: LoadConfig, channel: grpc.aio.Channel, index: int) -> Call:
    stub = pb_grpc.ToolServiceStub(channel)
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {config.key}"),)
    if config.users:
        metadata += (("x-agenta-user-id", f"user-{index}"),)
    arguments = struct_pb2.Struct()
    arguments.update(ARGUMENTS)
    request = pb.CallToolRequest(name=TOOL_NAME, arguments=arguments)
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
        url, request, headers = f"http://{config.target}{MCP_PATH}", MCP_CALL, headers | MCP_HEADERS
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
    """CPU seconds (user + system, all threads), VmRSS and VmHWM in kB of one process now."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    memory = {"VmRSS:": 0, "VmHWM:": 0}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            name, *values = line.split()
            if name in memory:
                memory[name] = int(values[0])
    return cpu_s, memory["VmRSS:"], memory["VmHWM:"]


def cpu_ticks(cpu: int | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot of CPU ``cpu`` (None for None)."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if cpu is not None and name == f"cpu{cpu}":
                ticks = [int(v) for v in values[:8]]
                return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait
    return None


def busy_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """How busy a CPU was between two ``cpu_ticks`` readings (0..1), counting every process."""
    if before and after and after[1] > before[1]:
        return (after[0] - before[0]) / (after[1] - before[1])
    return None


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[max(0, round(q * len(ordered)) - 1)] if ordered else 0.0


class Load:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stopping = False
        self.measuring = False
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()

    async def worker(self, index: int, call: Call) -> None:
        config = self.config
        if config.ramp_s > 0:
            await asyncio.sleep(config.ramp_s * index / config.concurrency)
        while not self.stopping:
            start = time.perf_counter()
            try:
                code = await call()
            except Exception as exc:
                code = type(exc).__name__
            if self.measuring:
                self.codes[code] += 1
                if code == "OK":
                    self.latencies.append(time.perf_counter() - start)
            if code != "OK":
                await asyncio.sleep(0.01)  # a failing server answers fast: do not spin on it

    async def run(self) -> LoadResult:
        config = self.config
        bound = config.warmup_s + config.duration_s + config.timeout_s + 30.0
        async with asyncio.timeout(bound), contextlib.AsyncExitStack() as stack:
            if config.rpc in ("rest", "mcp"):
                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=config.concurrency),
                    timeout=aiohttp.ClientTimeout(total=config.timeout_s),
                )
                stack.push_async_callback(session.close)
                calls = [_http_call(config, session, i) for i in range(config.concurrency)]
            else:
                channels = []
                count = 1 if config.concurrency <= 1 else min(8, max(2, config.concurrency // 16))
                for i in range(count):
                    # A distinct option per channel keeps grpc from sharing one connection.
                    options = [("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)]
                    channel = grpc.aio.insecure_channel(config.target, options=options)
                    stack.push_async_callback(channel.close)
                    await asyncio.wait_for(channel.channel_ready(), 10.0)
                    channels.append(channel)
                calls = [
                    _grpc_call(config, channels[i % len(channels)], i)
                    for i in range(config.concurrency)
                ]
            workers = [asyncio.create_task(self.worker(i, c)) for i, c in enumerate(calls)]
            try:
                return await self._measure()
            finally:
                self.stopping = True  # let calls in flight finish, then cancel what is left
                _, pending = await asyncio.wait(workers, timeout=config.timeout_s + 2.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _measure(self) -> LoadResult:
        config = self.config
        await asyncio.sleep(config.warmup_s)
        cpu0, peak_kb, _ = sample(config.server_pid)
        busy0 = cpu_ticks(config.server_cpu)
        client0, t0 = time.process_time(), time.perf_counter()
        self.measuring = True
        end = t0 + config.duration_s
        while (now := time.perf_counter()) < end:
            await asyncio.sleep(min(SAMPLE_EVERY_S, end - now))
            peak_kb = max(peak_kb, sample(config.server_pid)[1])
        self.measuring = False
        t1, client1 = time.perf_counter(), time.process_time()
        cpu1, rss_kb, hwm_kb = sample(config.server_pid)
        window, server_cpu_s = t1 - t0, cpu1 - cpu0
        ordered = sorted(self.latencies)
        calls = sum(self.codes.values())
        return LoadResult(
            window_s=window,
            calls=calls,
            ok=self.codes["OK"],
            errors={code: n for code, n in self.codes.most_common() if code != "OK"},
            rps=self.codes["OK"] / window,
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            client_util=(client1 - client0) / window,
            server_cpu_us_per_call=server_cpu_s / max(calls, 1) * 1e6,
            server_util=server_cpu_s / window,
            server_rss_peak_mb=max(peak_kb, rss_kb) / 1024,
            server_hwm_mb=hwm_kb / 1024,
            server_cpu_busy=busy_between(busy0, cpu_ticks(config.server_cpu)),
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.loadgen '<LoadConfig JSON>'")
    with contextlib.suppress(KeyboardInterrupt):
        result = asyncio.run(Load(LoadConfig(**json.loads(sys.argv[1]))).run())
        print(json.dumps(asdict(result)), flush=True)
