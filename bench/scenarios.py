"""Scenarios 1 to 5 of issue 5, run interleaved so drift on a noisy machine spreads evenly."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness import Harness, Server
from bench.loadgen import LoadResult
from bench.results_model import Row, Scenario, Target

ALL = ("1", "2", "3", "4", "5")
NAMES = {
    "baseline": "1",
    "status": "2",
    "getstatus": "2",
    "calltool": "3",
    "instant": "3",
    "slow": "4",
    "growth": "5",
    "cost": "5",
}

FAST_CONCURRENCY = 64
SLOW_IN_FLIGHT = 1000
GROWTH_CONCURRENCY = (1, 16, 64, 256)
GROWTH_IN_FLIGHT = (100, 500, 1000)
CALL_TIMEOUT_S = 10.0
SLOW_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Profile:
    runs: int
    warmup_s: float
    duration_s: float
    slow_ramp_s: float
    slow_warmup_s: float
    slow_duration_s: float


FULL = Profile(
    runs=3,
    warmup_s=1.0,
    duration_s=3.0,
    slow_ramp_s=1.0,
    slow_warmup_s=2.5,
    slow_duration_s=4.0,
)
QUICK = Profile(
    runs=1,
    warmup_s=0.5,
    duration_s=1.5,
    slow_ramp_s=1.0,
    slow_warmup_s=2.0,
    slow_duration_s=2.0,
)


def channels_for(concurrency: int) -> int:
    """Several HTTP/2 connections, as several client replicas would open: 1 to 8."""
    if concurrency <= 1:
        return 1
    return min(8, max(2, concurrency // 16))


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _describe(row: Row, run: LoadResult) -> str:
    errors = sum(run.errors.values())
    server = f"{run.server_cpu_us_per_call:,.0f}" if run.server_cpu_us_per_call else "?"
    return (
        f"  {row.label} c={row.concurrency}: {run.rps:,.0f} req/s, p50 {run.p50_ms:.1f} ms, "
        f"p99 {run.p99_ms:.1f} ms, server {server} µs/call, client CPU {run.client_util:.0%}, "
        f"errors {errors}"
    )


class Runner:
    def __init__(self, harness: Harness, profile: Profile) -> None:
        self.h = harness
        self.p = profile

    def _fast(self, server: Server, rpc: str, concurrency: int) -> LoadResult:
        assert self.h.instant is not None
        return self.h.load(
            server,
            self.h.instant[1],
            rpc=rpc,
            concurrency=concurrency,
            channels=channels_for(concurrency),
            warmup_s=self.p.warmup_s,
            duration_s=self.p.duration_s,
            timeout_s=CALL_TIMEOUT_S,
        )

    def _slow_run(self, row: Row, in_flight: int) -> None:
        """A fresh server per run, so VmHWM is the peak of exactly this load."""
        assert self.h.slow is not None
        server = self.h.real_server(self.h.slow[0])
        try:
            run = self.h.load(
                server,
                self.h.slow[1],
                rpc="call",
                concurrency=in_flight,
                channels=channels_for(in_flight),
                users=True,
                ramp_s=self.p.slow_ramp_s,
                warmup_s=self.p.slow_warmup_s,
                duration_s=self.p.slow_duration_s,
                timeout_s=SLOW_TIMEOUT_S,
            )
        finally:
            self.h.stop(server)
        row.runs.append(run)
        row.idle_rss_mb.append(server.idle_rss_mb)
        progress(_describe(row, run) + f", peak RSS {run.server_hwm_mb or 0:.1f} MB")

    def _interleave(self, pairs: list[tuple[Row, Callable[[], LoadResult]]]) -> None:
        """Run every row once per round; the order flips each round to cancel drift."""
        for round_no in range(self.p.runs):
            order = pairs if round_no % 2 == 0 else list(reversed(pairs))
            for row, measure in order:
                run = measure()
                row.runs.append(run)
                progress(_describe(row, run))

    def run(self, selected: set[str]) -> list[Scenario]:
        h = self.h
        assert h.instant is not None
        out: dict[str, Scenario] = {}
        if selected & {"1", "2", "3", "5"}:
            real = h.real_server(h.instant[0])
            h.capture_status(real)
            base = h.baseline(h.instant[0])
            try:
                if selected & {"1", "2"}:
                    floor = h.baseline(None, floor=True)
                    try:
                        out.update(self._status(base, floor, real))
                    finally:
                        h.stop(floor)
                if "3" in selected:
                    client_base = h.baseline(h.instant[0], client="service")
                    try:
                        out["3"] = self._calltool(base, client_base, real)
                    finally:
                        h.stop(client_base)
                if "5" in selected:
                    out["5"] = self._growth_concurrency(real)
            finally:
                h.stop(real)
                h.stop(base)
        if "4" in selected or "5" in selected:
            slow = self._slow(SLOW_IN_FLIGHT)
            if "4" in selected:
                out["4"] = self._scenario4(slow)
            if "5" in selected:
                self._growth_in_flight(out["5"], slow)
        return [out[key] for key in ALL if key in out]

    # --- 1 and 2 -----------------------------------------------------------------------------

    def _status(self, base: Server, floor: Server, real: Server) -> dict[str, Scenario]:
        progress(f"scenarios 1-2: GetStatus, concurrency {FAST_CONCURRENCY}")
        base_row = Row("bare grpc.aio GetStatus", FAST_CONCURRENCY)
        floor_row = Row("bare grpc.aio + floor interceptor", FAST_CONCURRENCY, ratio_to=base_row)
        real_row = Row("real server GetStatus", FAST_CONCURRENCY, ratio_to=base_row)
        for row, server in ((base_row, base), (floor_row, floor), (real_row, real)):
            row.idle_rss_mb.append(server.idle_rss_mb)
        self._interleave(
            [
                (base_row, lambda: self._fast(base, "status", FAST_CONCURRENCY)),
                (floor_row, lambda: self._fast(floor, "status", FAST_CONCURRENCY)),
                (real_row, lambda: self._fast(real, "status", FAST_CONCURRENCY)),
            ]
        )
        one = Scenario(
            "1",
            "Baseline: bare grpc.aio server, same proto, trivial handlers",
            [base_row],
            notes=[
                "GetStatus answers the real server's GetStatus reply, built once, so both "
                "servers send the same bytes; no interceptors, logging or metrics."
            ],
        )
        two = Scenario(
            "2",
            "GetStatus through the real stack (auth, rate limit, metrics, access log)",
            [floor_row, real_row],
            notes=[
                "The floor row is the bare baseline behind one interceptor doing the least "
                "those four concerns can do (bench/floor.py: a dict lookup of the key, one GCRA "
                "step, integer counters, an f-string access line written in batches); its "
                "ratio is about the most any Python implementation of them reaches here."
            ],
            targets=[
                Target("GetStatus req/s ratio real / bare", real_row.ratio, ">=", 0.95),
                Target("GetStatus CPU ratio bare / real", real_row.cpu_ratio, ">=", 0.95),
            ],
        )
        return {"1": one, "2": two}

    # --- 3 -----------------------------------------------------------------------------------

    def _calltool(self, base: Server, client_base: Server, real: Server) -> Scenario:
        progress(f"scenario 3: CallTool to an instant upstream, concurrency {FAST_CONCURRENCY}")
        base_row = Row("bare grpc.aio + aiohttp POST", FAST_CONCURRENCY)
        client_row = Row("bare grpc.aio + service HTTP client", FAST_CONCURRENCY, ratio_to=base_row)
        real_row = Row("real server CallTool", FAST_CONCURRENCY, ratio_to=base_row)
        self._interleave(
            [
                (base_row, lambda: self._fast(base, "call", FAST_CONCURRENCY)),
                (client_row, lambda: self._fast(client_base, "call", FAST_CONCURRENCY)),
                (real_row, lambda: self._fast(real, "call", FAST_CONCURRENCY)),
            ]
        )
        notes = [
            "The baseline handler posts the same body with one plain aiohttp.ClientSession, "
            "parses the reply and returns summary, refined messages and trace id: no "
            "argument or output checks, no auth, no rate limit, no logging.",
            "The second baseline is the same handler posting through the service's own "
            "upstream client (AgentaCompletionClient: httpx over httpx-aiohttp), so the "
            "difference between the two is the HTTP client layer alone.",
        ]
        split = _cost_split(base_row, client_row, real_row)
        if split:
            notes.append(split)
        return Scenario(
            "3",
            "CallTool refine_prompt, instant upstream",
            [base_row, client_row, real_row],
            targets=[
                Target("CallTool req/s on one server core", real_row.median("rps"), ">=", 1000),
                Target("CallTool req/s ratio real / bare", real_row.ratio, ">=", 0.85),
                Target("CallTool core capacity req/s", real_row.capacity, ">=", 1000),
                Target("CallTool CPU ratio bare / real", real_row.cpu_ratio, ">=", 0.85),
            ],
            notes=notes,
        )

    # --- 4 -----------------------------------------------------------------------------------

    def _slow(self, in_flight: int) -> Row:
        progress(f"scenario 4: slow upstream ({1.0:g} s), {in_flight} calls in flight")
        row = Row("real server, 1 s upstream", in_flight, rss_from_hwm=True)
        for _ in range(self.p.runs):
            self._slow_run(row, in_flight)
        return row

    def _scenario4(self, row: Row) -> Scenario:
        errors = float(sum(row.errors.values()))
        return Scenario(
            "4",
            f"Slow upstream (1 s), {row.concurrency} calls in flight, distinct delegated users",
            [row],
            targets=[
                Target("slow: errors (all runs)", errors, "==", 0),
                Target("slow: req/s", row.median("rps"), ">=", 700),
                Target("slow: peak server RSS MB", row.rss_mb, "<", 120),
            ],
            notes=[
                f"A fresh server per run; calls start spread over {self.p.slow_ramp_s:g} s so "
                "they do not move in lockstep; RSS is VmHWM (peak of the whole run)."
            ],
        )

    # --- 5 -----------------------------------------------------------------------------------

    def _growth_concurrency(self, real: Server) -> Scenario:
        progress(f"scenario 5: CallTool at concurrency {', '.join(map(str, GROWTH_CONCURRENCY))}")
        rows = [Row("real server CallTool", c) for c in GROWTH_CONCURRENCY]

        def measure(concurrency: int) -> Callable[[], LoadResult]:
            return lambda: self._fast(real, "call", concurrency)

        self._interleave([(row, measure(row.concurrency)) for row in rows])
        return Scenario(
            "5",
            "Cost growth: CallTool (instant upstream) by concurrency; RSS by slow calls in flight",
            rows,
        )

    def _growth_in_flight(self, scenario: Scenario, at_1000: Row) -> None:
        for in_flight in GROWTH_IN_FLIGHT:
            if in_flight == SLOW_IN_FLIGHT:
                row = Row("real server, 1 s upstream", in_flight, rss_from_hwm=True)
                row.runs, row.idle_rss_mb = at_1000.runs, at_1000.idle_rss_mb
                scenario.notes.append(f"{in_flight} in flight: the runs of scenario 4.")
            else:
                progress(f"scenario 5: {in_flight} slow calls in flight")
                row = Row("real server, 1 s upstream", in_flight, rss_from_hwm=True)
                for _ in range(self.p.runs):
                    self._slow_run(row, in_flight)
            scenario.rows.append(row)


def _cost_split(base: Row, client: Row, real: Row) -> str:
    """Where the real server's extra CPU per call goes, from the medians of the three rows."""
    costs = [row.median("server_cpu_us_per_call") for row in (base, client, real)]
    if any(cost is None for cost in costs):
        return ""
    bare, with_client, full = (float(cost or 0.0) for cost in costs)
    return (
        f"Server CPU per call over the aiohttp baseline: {full - bare:,.0f} µs, of which "
        f"{with_client - bare:,.0f} µs is the HTTP client layer (second baseline minus the "
        f"first) and {full - with_client:,.0f} µs the service's own work (auth, rate limit, "
        "argument and template checks, metrics, access log)."
    )


def parse_only(values: list[str]) -> set[str]:
    """``--only 2 --only slow`` or ``--only 2,4``; scenario 2's ratio needs 1, so 2 brings 1."""
    if not values:
        return set(ALL)
    selected: set[str] = set()
    for value in values:
        for raw in value.split(","):
            name = raw.strip().lower()
            key = NAMES.get(name, name)
            if key not in ALL:
                raise ValueError(
                    f"unknown scenario {name!r}: use 1-5 or {', '.join(sorted(NAMES))}"
                )
            selected.add(key)
    if "2" in selected:
        selected.add("1")
    return selected


def describe_profile(profile: Profile) -> dict[str, Any]:
    return {
        "runs": profile.runs,
        "warmup_s": profile.warmup_s,
        "duration_s": profile.duration_s,
        "slow_ramp_s": profile.slow_ramp_s,
        "slow_warmup_s": profile.slow_warmup_s,
        "slow_duration_s": profile.slow_duration_s,
        "fast_concurrency": FAST_CONCURRENCY,
        "slow_in_flight": SLOW_IN_FLIGHT,
        "growth_concurrency": list(GROWTH_CONCURRENCY),
        "growth_in_flight": list(GROWTH_IN_FLIGHT),
        "channels": "1 at concurrency 1, else concurrency/16 clamped to 2..8",
    }
