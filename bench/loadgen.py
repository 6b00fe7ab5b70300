"""Closed-loop asyncio gRPC load generator, run as its own process by the harness.

``python -m bench.loadgen '<LoadConfig as JSON>'`` opens ``channels`` channels (each its own
HTTP/2 connection), runs ``concurrency`` workers that call back to back, warms up, then measures
for ``duration_s``: calls that complete inside the window count. While measuring it samples the
server's RSS, and it reads CPU time of the server, the upstream and itself at the window's edges,
so the harness can tell which side was the bottleneck. One JSON line (LoadResult) on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from bench.common import (
    ARGUMENTS,
    TOOL_NAME,
    ProcSample,
    busy_fraction,
    cpu_busy_ticks,
    sample,
)

USER_HEADER = "x-agenta-user-id"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    target: str
    rpc: str  # "status" or "call"
    concurrency: int
    channels: int
    warmup_s: float
    duration_s: float
    key: str
    ramp_s: float = 0.0
    """Start worker i after ramp_s * i / concurrency, so slow calls do not move in lockstep."""
    users: bool = False
    """Send a distinct x-agenta-user-id per worker (a rate-limit budget of its own each)."""
    timeout_s: float = 30.0
    server_pid: int | None = None
    upstream_pid: int | None = None
    server_cpu: int | None = None
    load_cpu: int | None = None
    """The CPUs the server and the load side are pinned to, to report how busy each was."""
    sample_every_s: float = 0.1


@dataclass(slots=True)
class LoadResult:
    window_s: float = 0.0
    calls: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    server_cpu_us_per_call: float | None = None
    server_util: float | None = None
    server_rss_start_mb: float | None = None
    server_rss_peak_mb: float | None = None
    server_hwm_mb: float | None = None
    client_cpu_us_per_call: float = 0.0
    client_util: float = 0.0
    upstream_util: float | None = None
    server_cpu_busy: float | None = None
    """Whole-CPU busy fraction of the server's CPU: server_util plus anything else on it."""
    load_cpu_busy: float | None = None
    """Whole-CPU busy fraction of the load CPU: client, upstream and anything else on it."""
    inflight_min: int = 0
    inflight_max: int = 0
    unfinished: int = 0
    """Workers still in a call ``timeout_s + 2`` s after the window closed (then cancelled)."""


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
    return ordered[index]


def _safe_sample(pid: int | None) -> ProcSample | None:
    if pid is None:
        return None
    try:
        return sample(pid)
    except (OSError, ValueError):
        return None


class Load:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stopping = False
        self.measuring = False
        self.inflight = 0
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()

    async def worker(self, index: int, stub: pb_grpc.ToolServiceStub) -> None:
        config = self.config
        metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {config.key}"),)
        if config.users:
            metadata += ((USER_HEADER, f"user-{index}"),)
        if config.rpc == "status":
            method: Any = stub.GetStatus
            request: Any = pb.GetStatusRequest()
        else:
            method = stub.CallTool
            arguments = struct_pb2.Struct()
            arguments.update(ARGUMENTS)
            request = pb.CallToolRequest(name=TOOL_NAME, arguments=arguments)
        if config.ramp_s > 0:
            await asyncio.sleep(config.ramp_s * index / config.concurrency)
        clock = time.perf_counter
        while not self.stopping:
            self.inflight += 1
            start = clock()
            code = "OK"
            try:
                response = await method(request, metadata=metadata, timeout=config.timeout_s)
                if config.rpc == "call" and response.is_error:
                    code = "is_error:" + pb.ToolErrorCode.Name(response.error.code)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            except Exception as exc:
                code = type(exc).__name__
            end = clock()
            self.inflight -= 1
            if self.measuring:
                self.codes[code] += 1
                if code == "OK":
                    self.latencies.append(end - start)
            if code != "OK":
                # A failing server answers fast: do not spin on it.
                await asyncio.sleep(0.01)

    async def run(self) -> LoadResult:
        config = self.config
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(config.target, options=[*options, ("bench.channel", i)])
            for i in range(config.channels)
        ]
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 10.0)
            stubs = [pb_grpc.ToolServiceStub(channel) for channel in channels]
            workers = [
                asyncio.create_task(self.worker(i, stubs[i % len(stubs)]))
                for i in range(config.concurrency)
            ]
            try:
                result = await self._measure()
            finally:
                self.stopping = True
                _, pending = await asyncio.wait(workers, timeout=config.timeout_s + 2.0)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            result.unfinished = len(pending)
            return result
        finally:
            for channel in channels:
                await channel.close()

    async def _measure(self) -> LoadResult:
        config = self.config
        await asyncio.sleep(config.warmup_s)
        server0 = _safe_sample(config.server_pid)
        upstream0 = _safe_sample(config.upstream_pid)
        watched = [cpu for cpu in (config.server_cpu, config.load_cpu) if cpu is not None]
        busy0 = cpu_busy_ticks(watched)
        client0, t0 = time.process_time(), time.perf_counter()
        self.measuring = True
        peak_kb = server0.rss_kb if server0 else 0
        low = high = self.inflight
        end = t0 + config.duration_s
        while (now := time.perf_counter()) < end:
            await asyncio.sleep(min(config.sample_every_s, end - now))
            low, high = min(low, self.inflight), max(high, self.inflight)
            current = _safe_sample(config.server_pid)
            if current is not None:
                peak_kb = max(peak_kb, current.rss_kb)
        self.measuring = False
        t1, client1 = time.perf_counter(), time.process_time()
        server1 = _safe_sample(config.server_pid)
        upstream1 = _safe_sample(config.upstream_pid)
        busy = busy_fraction(busy0, cpu_busy_ticks(watched))
        window = t1 - t0

        ordered = sorted(self.latencies)
        calls = sum(self.codes.values())
        ok = self.codes.get("OK", 0)
        result = LoadResult(
            window_s=window,
            calls=calls,
            ok=ok,
            errors={code: n for code, n in self.codes.most_common() if code != "OK"},
            rps=ok / window,
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
            mean_ms=(sum(ordered) / len(ordered) * 1000) if ordered else 0.0,
            client_cpu_us_per_call=(client1 - client0) / max(calls, 1) * 1e6,
            client_util=(client1 - client0) / window,
            inflight_min=low,
            inflight_max=high,
            server_cpu_busy=busy.get(config.server_cpu) if config.server_cpu is not None else None,
            load_cpu_busy=busy.get(config.load_cpu) if config.load_cpu is not None else None,
        )
        if server0 is not None and server1 is not None:
            result.server_cpu_us_per_call = (server1.cpu_s - server0.cpu_s) / max(calls, 1) * 1e6
            result.server_util = (server1.cpu_s - server0.cpu_s) / window
            result.server_rss_start_mb = server0.rss_kb / 1024
            result.server_rss_peak_mb = max(peak_kb, server1.rss_kb) / 1024
            result.server_hwm_mb = server1.hwm_kb / 1024
        if upstream0 is not None and upstream1 is not None:
            result.upstream_util = (upstream1.cpu_s - upstream0.cpu_s) / window
        return result


async def _main(config: LoadConfig) -> LoadResult:
    bound = config.warmup_s + config.duration_s + config.timeout_s + 30.0
    async with asyncio.timeout(bound):
        return await Load(config).run()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.loadgen '<LoadConfig JSON>'", file=sys.stderr)
        return 2
    config = LoadConfig(**json.loads(args[0]))
    result = asyncio.run(_main(config))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
