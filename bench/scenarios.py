"""The scenarios: which servers run, under which load, side by side, and the targets they carry.

Rows compared with each other are measured in rounds (each row once per round, the order
flipped every round), so drift on a shared machine spreads over all of them alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from bench.harness import Harness, Server
from bench.loadgen import LoadResult
from bench.report import Row, Scenario, Target

SCENARIOS = ("status", "calltool", "upstreams", "rest", "mcp", "slow", "growth")
FAST = 64  # calls in flight against the instant upstream
SLOW_IN_FLIGHT = 1000
GROWTH_CONCURRENCY = (1, 16, 64, 256)
GROWTH_IN_FLIGHT = (100, 500, 1000)

SERVICE = "service"
BARE = "bare grpc.aio"
BARE_CALL = "bare grpc.aio + aiohttp"
REST_TUNED = "REST, tuned"
REST_MERGED = "REST, as merged"
SDK = "plain MCP SDK server"

Measure = Callable[[], LoadResult]


@dataclass(frozen=True)
class Profile:
    runs: int
    warmup_s: float
    duration_s: float
    slow_ramp_s: float
    slow_warmup_s: float
    slow_duration_s: float


FULL = Profile(3, 1.0, 3.0, slow_ramp_s=1.0, slow_warmup_s=2.5, slow_duration_s=4.0)
QUICK = Profile(1, 0.5, 1.5, slow_ramp_s=1.0, slow_warmup_s=2.0, slow_duration_s=2.0)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse_only(values: list[str]) -> list[str]:
    """``--only status --only slow`` or ``--only status,slow``; none means all, in order."""
    names = {name.strip().lower() for value in values for name in value.split(",")}
    unknown = sorted(names - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario {unknown[0]!r}: use {', '.join(SCENARIOS)}")
    return [name for name in SCENARIOS if name in names or not names]


def slow_rps_floor(bare_rps: float) -> float:
    """The slow scenario's req/s target: 900, unless the bare server itself cannot reach 900
    in the same run (a slow or busy machine): then 0.9 of the bare server's req/s."""
    return 900.0 if bare_rps >= 900 else round(0.9 * bare_rps, 1)


class Runner:
    def __init__(self, harness: Harness, profile: Profile) -> None:
        self.h = harness
        self.p = profile

    def run(self, selected: list[str]) -> list[Scenario]:
        out: dict[str, Scenario] = {}
        for name in selected:
            if name == "growth":
                out[name] = self.growth(out["slow"].rows[-1] if "slow" in out else None)
            else:
                out[name] = getattr(self, name)()
        return [out[name] for name in SCENARIOS if name in out]

    def _fast(self, server: Server, rpc: str, concurrency: int) -> Measure:
        """A measured run against the instant upstream. Workers start spread over half the
        warm-up: started at once, calls to a server that costs tens of ms each would finish
        in bunches, and a short window could hold none of them."""
        p = self.p
        window = {"ramp_s": p.warmup_s / 2, "warmup_s": p.warmup_s, "duration_s": p.duration_s}
        return lambda: self.h.load(server, rpc, concurrency=concurrency, timeout_s=10.0, **window)

    def _slow(
        self, start: Callable[[Server], Server], in_flight: int, rpc: str = "call"
    ) -> Measure:
        """A measured run of ``in_flight`` calls to the 1 s upstream, on a fresh server, so its
        VmHWM is the peak RSS of exactly this load. Every worker acts for its own user, so each
        has a rate-limit budget of its own; their starts spread over ``slow_ramp_s``."""

        def measure() -> LoadResult:
            server, p = start(self.h.slow), self.p
            try:
                return self.h.load(
                    server,
                    rpc,
                    concurrency=in_flight,
                    users=True,
                    ramp_s=p.slow_ramp_s,
                    warmup_s=p.slow_warmup_s,
                    duration_s=p.slow_duration_s,
                    timeout_s=30.0,
                )
            finally:
                server.stop()

        return measure

    def _rounds(self, pairs: list[tuple[Row, Measure]]) -> None:
        for round_no in range(self.p.runs):
            for row, measure in pairs if round_no % 2 == 0 else reversed(pairs):
                run = measure()
                row.runs.append(run)
                progress(
                    f"  {row.label} c={row.concurrency}: {run.rps:,.0f} req/s, "
                    f"p50 {run.p50_ms:,.1f} ms, server {run.server_cpu_us_per_call:,.0f} "
                    f"µs/call, errors {sum(run.errors.values())}"
                )

    def _side_by_side(self, rows: list[tuple[Row, Server, str]]) -> None:
        """Rounds of fast runs, each row against its server with its rpc; then stop them."""
        try:
            self._rounds([(row, self._fast(srv, rpc, row.concurrency)) for row, srv, rpc in rows])
        finally:
            for _, server, _ in rows:
                server.stop()

    def _against_bare(self, key: str, rpc: str, bare_label: str, title: str, note: str) -> Scenario:
        """The service against the bare grpc.aio baseline on one RPC: a ratio, not a target.
        The service starts first, so the baseline answers GetStatus with its reply."""
        method = "GetStatus" if rpc == "status" else "CallTool"
        service = self.h.service(self.h.instant)
        self.h.capture_status(service)
        bare = Row(f"{bare_label} {method}", FAST)
        row = Row(f"{SERVICE} {method}", FAST, ratio_to=bare)
        baseline = self.h.baseline(self.h.instant)
        self._side_by_side([(bare, baseline, rpc), (row, service, rpc)])
        return Scenario(key, title, [bare, row], notes=[note + " A fact, not a target."])

    def status(self) -> Scenario:
        progress(f"status: GetStatus, {FAST} in flight")
        note = (
            "The bare server answers with the service's own GetStatus reply, built once, and "
            "has no interceptors: the ratio is what authentication, metrics and the access "
            "line cost on the cheapest call (it is not rate limited)."
        )
        title = "GetStatus against a bare grpc.aio server"
        return self._against_bare("status", "status", BARE, title, note)

    def calltool(self) -> Scenario:
        progress(f"calltool: CallTool to an instant upstream, {FAST} in flight")
        note = (
            "The bare handler posts the same body with one aiohttp session and returns the "
            "reply, with no checks, auth, rate limit or logging."
        )
        title = "CallTool against a bare grpc.aio server doing one aiohttp POST"
        return self._against_bare("calltool", "call", BARE_CALL, title, note)

    def upstreams(self) -> Scenario:
        progress(f"upstreams: CallTool through each upstream adapter, {FAST} in flight")
        agenta = Row(f"{SERVICE} CallTool, Agenta runner", FAST)
        openai = Row(f"{SERVICE} CallTool, OpenAI-compatible", FAST, ratio_to=agenta)
        self._side_by_side(
            [
                (agenta, self.h.service(self.h.instant), "call"),
                (openai, self.h.service(self.h.instant, openai=True), "call"),
            ]
        )
        note = (
            "The same service and stand-in, refining through the Agenta completion runner's "
            "endpoint or its OpenAI-compatible chat completions endpoint."
        )
        ratio = openai.ratio(agenta)
        targets = [
            Target("CallTool req/s, OpenAI-compatible / Agenta runner", ratio, ">=", 0.9),
            Target("CallTool req/s, Agenta runner / OpenAI-compatible", _inverse(ratio), ">=", 0.9),
        ]
        return Scenario(
            "upstreams", "CallTool through each upstream", [agenta, openai], targets, [note]
        )

    def rest(self) -> Scenario:
        progress(f"rest: CallTool against the REST design, {FAST} in flight")
        row = Row(f"{SERVICE} CallTool", FAST)
        tuned = Row(f"{REST_TUNED} POST /tools/call", FAST, ratio_to=row)
        merged = Row(f"{REST_MERGED} POST /tools/call", FAST, ratio_to=row)
        service, instant = self.h.service(self.h.instant), self.h.instant
        self._side_by_side(
            [
                (row, service, "call"),
                (tuned, self.h.peer("rest", instant, "--client", "shared"), "rest"),
                (merged, self.h.peer("rest", instant, "--client", "per-call"), "rest"),
            ]
        )
        note = (
            "FastAPI on one uvicorn worker (uvloop, httptools) on the service's core, with the "
            "same keys file, limiter, argument and output checks; tuned shares one "
            "httpx.AsyncClient, as merged builds one per call. Load: one aiohttp session at the "
            "same concurrency."
        )
        targets = [
            Target(f"CallTool req/s, {SERVICE} / {REST_TUNED}", row.ratio(tuned), ">=", 3),
            Target(f"CallTool req/s, {SERVICE} / {REST_MERGED}", row.ratio(merged), ">=", 30),
        ]
        title = "CallTool against the REST design the service replaces"
        return Scenario("rest", title, [row, tuned, merged], targets, [note])

    def mcp(self) -> Scenario:
        progress(f"mcp: tools/call against a plain MCP SDK server, {FAST} in flight")
        sdk = Row(f"{SDK} tools/call", FAST)
        face = Row(f"{SERVICE} MCP tools/call", FAST, ratio_to=sdk)
        grpc = Row(f"{SERVICE} CallTool", FAST, ratio_to=sdk)
        service = self.h.service(self.h.instant, mcp=True)
        sdk_server = self.h.peer("rest", self.h.instant, "--client", "mcp")
        self._side_by_side(
            [(grpc, service, "call"), (face, service, "mcp"), (sdk, sdk_server, "mcp")]
        )
        progress(f"mcp: 1 s upstream, {SLOW_IN_FLIGHT:,} calls in flight over gRPC and MCP")
        slow_grpc = Row(f"{SERVICE} CallTool, 1 s upstream", SLOW_IN_FLIGHT, fresh_server=True)
        label = f"{SERVICE} MCP tools/call, 1 s upstream"
        slow_face = Row(label, SLOW_IN_FLIGHT, ratio_to=slow_grpc, fresh_server=True)

        def with_mcp(upstream: Server) -> Server:
            return self.h.service(upstream, mcp=True)

        self._rounds(
            [
                (slow_grpc, self._slow(with_mcp, SLOW_IN_FLIGHT)),
                (slow_face, self._slow(with_mcp, SLOW_IN_FLIGHT, "mcp")),
            ]
        )
        targets = [
            Target(f"tools/call req/s, {SERVICE} MCP / {SDK}", face.ratio(sdk), ">=", 0.9),
            Target(f"CallTool req/s, {SERVICE} gRPC / {SDK}", grpc.ratio(sdk), ">=", 3),
            Target("1,000 in flight over MCP: errors", float(slow_face.errors.total()), "==", 0),
            Target("1,000 in flight: req/s, MCP / gRPC", slow_face.ratio(slow_grpc), ">=", 0.5),
        ]
        note = (
            "The SDK server is the SDK's MCPServer with one tool, stateless with JSON responses, "
            "on one uvicorn worker on the service's core, doing the REST design's work (keys "
            "file, limiter, argument and output checks, one shared httpx.AsyncClient). Load: "
            "JSON-RPC tools/call bodies posted with the SDK client's headers through one aiohttp "
            "session; the service serves gRPC and MCP from one process. Slow rows: a fresh "
            "service per run, every call acting for its own user."
        )
        title = "MCP tools/call: the service's MCP face against a plain MCP SDK server"
        rows = [grpc, face, sdk, slow_grpc, slow_face]
        return Scenario("mcp", title, rows, targets, [note])

    def slow(self) -> Scenario:
        progress(f"slow: 1 s upstream, {SLOW_IN_FLIGHT:,} calls in flight")
        bare = Row(f"{BARE_CALL}, 1 s upstream", SLOW_IN_FLIGHT, fresh_server=True)
        row = Row(f"{SERVICE}, 1 s upstream", SLOW_IN_FLIGHT, ratio_to=bare, fresh_server=True)
        self._rounds(
            [
                (bare, self._slow(self.h.baseline, SLOW_IN_FLIGHT)),
                (row, self._slow(self.h.service, SLOW_IN_FLIGHT)),
            ]
        )
        bare_rps = bare.median("rps") or 0.0
        targets = [
            Target("1,000 in flight: errors (all runs)", float(row.errors.total()), "==", 0),
            Target("1,000 in flight: peak RSS MB", row.rss_mb, "<", 130),
            Target("1,000 in flight: req/s", row.median("rps"), ">=", slow_rps_floor(bare_rps)),
        ]
        note = (
            "A fresh server per run; RSS is its VmHWM. The req/s target is 900, or 0.9 of the "
            f"bare server's req/s in the same run when that is under 900 (here {bare_rps:,.0f})."
        )
        title = f"{SLOW_IN_FLIGHT:,} calls in flight to a 1 s upstream"
        return Scenario("slow", title, [bare, row], targets, [note])

    def growth(self, at_1000: Row | None) -> Scenario:
        progress(f"growth: CallTool at {', '.join(map(str, GROWTH_CONCURRENCY))} in flight")
        rows = [Row(f"{SERVICE} CallTool", c) for c in GROWTH_CONCURRENCY]
        service = self.h.service(self.h.instant)
        self._side_by_side([(row, service, "call") for row in rows])
        progress(f"growth: 1 s upstream, {', '.join(map(str, GROWTH_IN_FLIGHT))} in flight")
        slow_rows = [
            Row(f"{SERVICE}, 1 s upstream", n, fresh_server=True)
            for n in GROWTH_IN_FLIGHT
            if at_1000 is None or n != at_1000.concurrency
        ]
        self._rounds([(row, self._slow(self.h.service, row.concurrency)) for row in slow_rows])
        if at_1000 is not None:
            slow_rows.append(at_1000)
        title = "Cost growth: CallTool by concurrency; RSS by slow calls in flight"
        notes = ["The 1,000 row is the slow scenario's, when it ran."] if at_1000 else []
        return Scenario("growth", title, rows + slow_rows, notes=notes)


def _inverse(ratio: float | None) -> float | None:
    return None if not ratio else round(1 / ratio, 2)
