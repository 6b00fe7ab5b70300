"""Which HTTP transport should the service's one shared upstream client use?

Compares, against the stand-in upstream running in a separate process on loopback:
(a) httpx with its default (httpcore) transport, (b) httpx over ``httpx_aiohttp.AiohttpTransport``
and (c) a plain ``aiohttp.ClientSession`` as the floor. Two loads: steady traffic at concurrency 16
to an instant upstream (client CPU per call, req/s) and a burst of concurrent calls to an upstream
that sleeps (wall time, errors), which is what a slow LLM behind the runner looks like.

    .venv/bin/python -m bench.transport            # ~1 minute; writes bench/results/transport.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import httpx_aiohttp

from server.standin import RUN_PATH

CallFn = Callable[[], Awaitable[None]]
ClientFactory = Callable[[str, int], contextlib.AbstractAsyncContextManager[CallFn]]

API_KEY = "bench-key"
HEADERS = {"Authorization": f"ApiKey {API_KEY}", "Content-Type": "application/json"}
TEMPLATE = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{product}}."},
        {"role": "user", "content": "Answer {{question}} in {{language}}."},
    ]
}
# Pre-encoded once so every client pays only for its transport, not for json.dumps.
BODY = json.dumps(
    {
        "inputs": {
            "__ag_prompt_template_json": json.dumps(TEMPLATE),
            "__ag_guidelines": "Keep it short.",
            "__ag_context": "",
        },
        "environment": "production",
        "app": "ai-services-refine-prompt",
    }
).encode()
TIMEOUT_S = 30.0
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transport.md"


class UpstreamError(Exception):
    """A non-200 answer, counted as an error like a transport failure."""


def _check(status: int, content: bytes) -> None:
    if status != 200:
        raise UpstreamError(f"HTTP {status}")
    json.loads(content)


@contextlib.asynccontextmanager
async def httpx_default(url: str, pool: int) -> AsyncIterator[CallFn]:
    """(a) httpx with httpcore underneath: the zero-dependency choice."""
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=TIMEOUT_S, headers=HEADERS
    ) as client:

        async def call() -> None:
            response = await client.post(RUN_PATH, content=BODY)
            _check(response.status_code, response.content)

        yield call


@contextlib.asynccontextmanager
async def httpx_aiohttp_transport(url: str, pool: int) -> AsyncIterator[CallFn]:
    """(b) the httpx API (timeouts, exceptions, mocking) over aiohttp's faster connection pool."""
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
    session = aiohttp.ClientSession(connector=connector)
    transport = httpx_aiohttp.AiohttpTransport(client=session)
    # The client closes the transport, which closes the session and its connector.
    async with httpx.AsyncClient(
        base_url=url, transport=transport, timeout=TIMEOUT_S, headers=HEADERS
    ) as client:

        async def call() -> None:
            response = await client.post(RUN_PATH, content=BODY)
            _check(response.status_code, response.content)

        yield call


@contextlib.asynccontextmanager
async def aiohttp_plain(url: str, pool: int) -> AsyncIterator[CallFn]:
    """(c) aiohttp directly: the floor any httpx layering is measured against."""
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(
        base_url=url, connector=connector, timeout=timeout, headers=HEADERS
    ) as session:

        async def call() -> None:
            async with session.post(RUN_PATH, data=BODY) as response:
                _check(response.status, await response.read())

        yield call


CLIENTS: dict[str, ClientFactory] = {
    "httpx (default transport)": httpx_default,
    "httpx + AiohttpTransport": httpx_aiohttp_transport,
    "aiohttp.ClientSession": aiohttp_plain,
}


@dataclass
class Run:
    """One measured run of one client under one load."""

    calls: int
    wall_s: float
    cpu_s: float
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.calls - sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_s / self.calls * 1e6


async def _measure(call: CallFn, calls: int, concurrency: int) -> Run:
    errors: Counter[str] = Counter()
    remaining = calls

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await call()
            except Exception as exc:
                errors[type(exc).__name__] += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(calls, time.perf_counter() - wall0, time.process_time() - cpu0, errors)


async def steady(factory: ClientFactory, url: str, pool: int, calls: int, conc: int) -> Run:
    """Concurrency ``conc`` against an instant upstream, after a warm-up on the same client."""
    async with factory(url, pool) as call:
        await _measure(call, 200, conc)
        return await _measure(call, calls, conc)


async def burst(factory: ClientFactory, url: str, pool: int, calls: int) -> Run:
    """All calls at once on a fresh client (cold pool) against an upstream that sleeps."""
    async with factory(url, pool) as call:
        return await _measure(call, calls, calls)


class Upstream:
    """``python -m server.standin`` in its own process (own CPU when possible), port from stdout."""

    def __init__(self, delay: float, cpu: int | None) -> None:
        cmd = [sys.executable, "-m", "server.standin", "--port", "0", "--api-key", API_KEY]
        if delay > 0:
            cmd += ["--delay", str(delay)]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        if found is None:
            self.close()
            raise RuntimeError(f"stand-in upstream did not start: {line!r}")
        self.url = found.group(0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def upstreams(delay: float, cpu: int | None) -> Iterator[tuple[Upstream, Upstream]]:
    """An instant and a slow upstream, always stopped."""
    instant = Upstream(0.0, cpu)
    try:
        slow = Upstream(delay, cpu)
        try:
            yield instant, slow
        finally:
            slow.close()
    finally:
        instant.close()


def pin_cpus() -> tuple[int | None, str]:
    """Client on CPU 0, upstream on CPU 1, so the two do not steal each other's time."""
    if not hasattr(os, "sched_setaffinity") or shutil.which("taskset") is None:
        return None, "no pinning (taskset or sched_setaffinity missing)"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, "no pinning (one CPU)"
    os.sched_setaffinity(0, {cpus[0]})
    return cpus[1], f"client pinned to CPU {cpus[0]}, upstream to CPU {cpus[1]}"


def _errors(runs: list[Run]) -> str:
    total: Counter[str] = Counter()
    for run in runs:
        total.update(run.errors)
    if not total:
        return "0"
    return ", ".join(f"{n} {name}" for name, n in total.most_common())


def _median(values: list[float]) -> float:
    return statistics.median(values)


def render(
    args: argparse.Namespace,
    pinning: str,
    steady_runs: dict[str, list[Run]],
    burst_runs: dict[str, list[Run]],
) -> str:
    """Markdown: medians over rounds, errors summed over rounds."""
    lines = [
        "# Upstream HTTP transport: measured",
        "",
        f"Command: `{' '.join(['.venv/bin/python -m bench.transport', *args.argv])}`",
        "",
        f"Python {platform.python_version()}, httpx {httpx.__version__}, "
        f"aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs; {pinning}. "
        f"Upstream: `python -m server.standin` in its own process on 127.0.0.1. "
        f"Medians of {args.rounds} rounds (clients interleaved); errors summed over rounds.",
        "",
        f"Steady: {args.calls} calls at concurrency {args.concurrency}, instant upstream, "
        f"warm pool. Burst: {args.burst} concurrent calls, upstream sleeps {args.delay:g} s, "
        f"fresh client (cold pool). Pool limit {args.pool} for every client.",
        "",
        "| client | steady req/s | steady client CPU µs/call | steady errors "
        "| burst wall s | burst req/s | burst client CPU µs/call | burst errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in CLIENTS:
        st, bu = steady_runs[name], burst_runs[name]
        lines.append(
            f"| {name} "
            f"| {_median([r.rps for r in st]):,.0f} "
            f"| {_median([r.cpu_us_per_call for r in st]):,.0f} "
            f"| {_errors(st)} "
            f"| {_median([r.wall_s for r in bu]):.2f} "
            f"| {_median([r.rps for r in bu]):,.0f} "
            f"| {_median([r.cpu_us_per_call for r in bu]):,.0f} "
            f"| {_errors(bu)} |"
        )
    return "\n".join(lines) + "\n"


async def run_all(
    args: argparse.Namespace, instant: str, slow: str
) -> tuple[dict[str, list[Run]], dict[str, list[Run]]]:
    """Interleave the clients round by round so drift (thermal, noisy neighbours) spreads evenly."""
    steady_runs: dict[str, list[Run]] = {name: [] for name in CLIENTS}
    burst_runs: dict[str, list[Run]] = {name: [] for name in CLIENTS}
    for round_no in range(1, args.rounds + 1):
        for name, factory in CLIENTS.items():
            async with asyncio.timeout(args.step_timeout):
                run = await steady(factory, instant, args.pool, args.calls, args.concurrency)
            steady_runs[name].append(run)
            print(
                f"round {round_no} steady {name}: {run.rps:,.0f} req/s, "
                f"{run.cpu_us_per_call:,.0f} µs CPU/call, errors {dict(run.errors)}",
                flush=True,
            )
        for name, factory in CLIENTS.items():
            async with asyncio.timeout(args.step_timeout):
                run = await burst(factory, slow, args.pool, args.burst)
            burst_runs[name].append(run)
            print(
                f"round {round_no} burst  {name}: {run.wall_s:.2f} s wall, "
                f"{run.cpu_us_per_call:,.0f} µs CPU/call, errors {dict(run.errors)}",
                flush=True,
            )
    return steady_runs, burst_runs


def main(argv: list[str] | None = None) -> int:
    """Run the comparison, print the table and write it to bench/results/transport.md."""
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="steady calls per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst", type=int, default=500, help="concurrent slow calls")
    parser.add_argument("--delay", type=float, default=1.0, help="slow upstream delay (s)")
    parser.add_argument("--pool", type=int, default=500, help="connection limit per client")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-timeout", type=float, default=30.0, help="bound per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv

    upstream_cpu, pinning = pin_cpus()
    print(pinning, flush=True)
    with upstreams(args.delay, upstream_cpu) as (instant, slow):
        steady_runs, burst_runs = asyncio.run(run_all(args, instant.url, slow.url))
    table = render(args, pinning, steady_runs, burst_runs)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
