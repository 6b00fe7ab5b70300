"""The scenarios (which servers run side by side, under which load, with which targets) and the
harness: upstreams, servers and load generator each a process of its own, pinned with taskset
(servers on one CPU, the load side on the other), stopped when the harness closes. Rows compared
run in rounds, the order flipped every round, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

import grpc

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.auth import generate_key, hash_key
from aiservices_server.config import ENV_PREFIX
from bench import common
from bench.loadgen import LoadConfig, LoadResult, sample
from tests.support.nginx import NginxProcess
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0


class ProcessFailed(RuntimeError):
    """A process the harness needs exited, or never became ready."""


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPU the servers get and which the load side (generator, upstreams, harness) gets."""

    server_cpu: int | None
    load_cpu: int | None
    note: str

    @classmethod
    def detect(cls) -> Pinning:
        if shutil.which("taskset") is None:
            return cls(None, None, "no pinning: taskset is not installed")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, f"no pinning: only CPU {cpus} available")
        load = f"load generator and stand-in upstreams on CPU {cpus[1]} (taskset)"
        return cls(cpus[0], cpus[1], f"servers under test on CPU {cpus[0]}; {load}")


def pinned(cpu: int | None, *args: str) -> list[str]:
    """``python args``, run with taskset on ``cpu`` when there is one."""
    return [*([] if cpu is None else ["taskset", "-c", str(cpu)]), sys.executable, *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A process the harness started, listening on ``target`` (serving MCP on ``mcp_target``)."""

    def __init__(
        self, name: str, cmd: list[str], port: int, logs: Path, cpu: int | None, **popen: Any
    ) -> None:
        self.name, self.cpu = name, cpu
        self.target = self.mcp_target = f"127.0.0.1:{port}"
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdin=DEVNULL, stdout=log, stderr=log, start_new_session=True, **popen
            )

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-10:])

    def wait_listening(self, target: str) -> None:
        """Return once ``target`` accepts connections; ProcessFailed if it never does."""
        deadline, (host, port) = time.monotonic() + READY_TIMEOUT_S, target.split(":")
        while True:
            with contextlib.suppress(OSError), socket.create_connection((host, int(port))):
                return
            if (code := self.proc.poll()) is not None:
                raise ProcessFailed(f"{self.name} exited with {code}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not listening after {READY_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM, as to any process that has not exited yet
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        self.proc.kill()  # when SIGTERM has not stopped it in 5 s
        self.proc.wait()


class Fronted(Server):
    """nginx in front of replicas, all stopped together: its CPU is nginx's own."""

    def __init__(self, nginx: NginxProcess, replicas: list[Server]) -> None:
        self.name, self.cpu, self.proc = "nginx", None, nginx.process
        self.target, self.mcp_target = nginx.grpc_target, nginx.mcp_url
        self._nginx, self._replicas = nginx, replicas

    def tail(self) -> str:
        return self._nginx.errors()

    def stop(self) -> None:
        self._nginx.close()
        for replica in self._replicas:
            replica.stop()


@dataclass(frozen=True)
class Profile:
    """How often each row runs, and for how long (warm-up, then the measured window)."""

    runs: int
    warmup_s: float
    duration_s: float
    slow_ramp_s: float
    slow_warmup_s: float
    slow_duration_s: float


FULL = Profile(3, 1.0, 3.0, slow_ramp_s=1.0, slow_warmup_s=2.5, slow_duration_s=4.0)
QUICK = Profile(1, 0.5, 1.5, slow_ramp_s=1.0, slow_warmup_s=2.0, slow_duration_s=2.0)


class Harness(contextlib.ExitStack):
    """Owns the processes it starts (the upstreams live as long as it) and a temporary directory."""

    def __init__(self, pinning: Pinning, profile: Profile) -> None:
        super().__init__()
        self.pinning, self.profile = pinning, profile
        self._tmp = Path(self.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        self._count = 0
        self._redis: RedisServer | None = None
        self.keys_file = self._tmp / "keys.toml"
        self.status_file: Path | None = None
        self.key = generate_key()
        self.keys_file.touch(mode=0o600)  # a keys file others can read draws a warning
        keys = f'[[keys]]\nid = "bench"\nhash = "{hash_key(self.key)}"\n'
        self.keys_file.write_text(keys + 'permissions = ["*", "act_for_users"]\n')
        self.instant, self.slow = self.upstream(0.0), self.upstream(1.0)

    def upstream(self, delay: float) -> Server:  # the stand-in, answering after ``delay`` s
        standin = ("-m", "tests.standin", "--api-key", common.UPSTREAM_API_KEY, "--delay")
        return self._start(f"upstream-{delay:g}s", self.pinning.load_cpu, *standin, str(delay))

    def _start(self, name: str, cpu: int | None, *args: str, port: int = 0, **popen: Any) -> Server:
        """``python args`` on ``cpu``, with ``--port`` unless ``port`` is given, once listening."""
        if not port:
            port = free_port()
            args = (*args, "--port", str(port))
        self._count += 1
        name = f"{self._count:03d}-{name}"
        process = Server(name, pinned(cpu, *args), port, self._tmp, cpu, **popen)
        self.callback(process.stop)
        process.wait_listening(process.target)
        return process

    def start(self, spec: str, upstream: Server) -> Server:
        """A server under test calling ``upstream``: ``baseline`` (GetStatus as ``capture_status``
        saved it), ``rest shared|per-call|mcp`` or ``service`` (``mcp``, ``openai``, ``wide``: room
        for HUGE calls), run in a temporary directory, the bench's own environment winning."""
        module, *options = spec.split()
        if module == "nginx":  # two replicas (REDIS_URL, any core) behind deploy/nginx.conf
            replicas = [self.start("service any mcp", upstream) for _ in range(2)]
            nginx = NginxProcess([r.target for r in replicas], [r.mcp_target for r in replicas])
            return Fronted(nginx.start(), replicas)
        cpu = None if "any" in options else self.pinning.server_cpu
        url = f"http://{upstream.target}"
        if module != "service":
            args = ["-m", f"bench.{module}", "--upstream", url]
            if module == "rest":
                args += ["--keys-file", str(self.keys_file), "--client", *options]
            elif self.status_file is not None:
                args += ["--status-file", str(self.status_file)]
            if "wide" in options:  # a baseline with the service's room for HUGE connections
                args += ["--connections", str(HUGE)]
            return self._start(module, cpu, *args, cwd=ROOT)
        port, mcp_port = free_port(), free_port() if "mcp" in options else 0
        settings = {
            "GRPC_ADDRESS": f"127.0.0.1:{port}",
            "API_KEYS_FILE": str(self.keys_file),
            "RATE_LIMIT_BURST": str(common.RATE_LIMIT_BURST),
            "RATE_LIMIT_PER_MINUTE": str(common.RATE_LIMIT_PER_MINUTE),
            "API_KEY": common.UPSTREAM_API_KEY,
            "API_URL": url,
            "ENVIRONMENT_SLUG": common.ENVIRONMENT_SLUG,
            "REFINE_PROMPT_KEY": common.REFINE_PROMPT_KEY,
            "METRICS_ADDRESS": "127.0.0.1:0",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE": "2",
        }
        if "openai" in options:
            settings |= {"UPSTREAM": "openai", "OPENAI_BASE_URL": f"{url}/v1"}
            settings |= {"OPENAI_MODEL": "stand-in", "TOOLS_FILE": str(ROOT / DECLARED_FILE)}
        if mcp_port:
            settings["MCP_ADDRESS"] = f"127.0.0.1:{mcp_port}"
        if "any" in options:  # every core, sharing one budget with the others
            settings |= {"WORKERS": "2" if "workers" in options else "1", "REDIS_URL": self.redis()}
        if "wide" in options:  # room for HUGE calls in flight, each holding an upstream connection
            settings |= {"MAX_CONCURRENT_CALLS": str(2 * HUGE), "UPSTREAM_MAX_CONNECTIONS": "10000"}
        env = {**{ENV_PREFIX + name: value for name, value in settings.items()}, **os.environ}
        args = ["-m", "aiservices_server"]
        server = self._start("service", cpu, *args, port=port, env=env, cwd=self._tmp)
        if mcp_port:
            server.mcp_target = settings["MCP_ADDRESS"]
            server.wait_listening(server.mcp_target)
        return server

    def redis(self) -> str:
        """A redis-server for the rows that share a budget, started once, on every core."""
        if self._redis is None:
            self._redis = self.enter_context(RedisServer())
        return self._redis.url

    def capture_status(self, service: Server) -> None:
        """Save the service's GetStatus reply so the baseline answers with the same bytes."""
        auth = (("authorization", f"Bearer {self.key}"),)
        with grpc.insecure_channel(service.target) as channel:
            status = pb_grpc.ToolServiceStub(channel).GetStatus
            reply = status(pb.GetStatusRequest(), metadata=auth, timeout=10, wait_for_ready=True)
        self.status_file = self._tmp / "status.bin"
        self.status_file.write_bytes(reply.SerializeToString())

    def load(
        self, server: Server, rpc: str, concurrency: int, slow: bool, **override: Any
    ) -> LoadResult:
        """One run of the load generator; workers start spread over half the warm-up or, when
        ``slow``, over ``slow_ramp_s``, each its own user. ``override``: LoadConfig fields."""
        p = self.profile
        load = LoadConfig(
            target=server.mcp_target if rpc == "mcp" else server.target,
            rpc=rpc,
            concurrency=concurrency,
            key=self.key,
            server_pid=server.proc.pid,
            server_cpu=server.cpu,
            users=slow,
            ramp_s=p.slow_ramp_s if slow else p.warmup_s / 2,
            warmup_s=p.slow_warmup_s if slow else p.warmup_s,
            duration_s=p.slow_duration_s if slow else p.duration_s,
            timeout_s=30.0 if slow else 10.0,
        )
        load = replace(load, **override)
        bound = load.warmup_s + load.duration_s + load.timeout_s + 40.0
        cpu = None if server.cpu is None else self.pinning.load_cpu  # unpinned beside them
        argv = pinned(cpu, "-m", "bench.loadgen", json.dumps(asdict(load)))
        try:
            stdout = subprocess.check_output(
                argv, cwd=ROOT, stderr=PIPE, text=True, timeout=bound, start_new_session=True
            )
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"load generator still running after {bound:g} s") from None
        except subprocess.CalledProcessError as exc:
            raise ProcessFailed(f"load generator failed:\n{exc.stderr[-2000:]}") from None
        if server.proc.poll() is not None:
            raise ProcessFailed(f"{server.name} died during the run:\n{server.tail()}")
        return LoadResult(**json.loads(stdout.splitlines()[-1]))


SCENARIOS: tuple[str, ...] = ("status", "calltool", "upstreams", "rest", "mcp", "slow", "growth")
SCENARIOS += ("thousands", "workers")
FAST = 64  # calls in flight against the instant upstream
SLOW = 1000  # calls in flight against the 1 s upstream
HUGE = 10_000  # calls in flight against a 10 s upstream, over 16 channels
DECLARED_FILE = "examples/tools.toml"  # the upstreams scenario's declared tool, served by openai
DECLARED_CALL = {"tool": "tools.examples.support.classify_ticket", "arguments": {"ticket": "Hi"}}
GROWTH_CONCURRENCY = (1, 16, 64, 256)
GROWTH_IN_FLIGHT = (100, 500, SLOW)  # SLOW last: the slow scenario's row stands in for it
SATURATED = 0.85  # a process using this share of its core is what limits the run
# The medians each row reports, with their format in the table.
METRICS = {"rps": ",.0f", "p50_ms": ",.1f", "p99_ms": ",.1f", "server_cpu_us_per_call": ",.0f"}
METRICS |= {"server_util": ".0%", "client_util": ".0%"}
COMPARE = {">=": operator.ge, "<": operator.lt, "==": operator.eq}
Json = dict[str, Any]  # a part of the report, as written to the JSON file


@dataclass
class Row:
    """One server at one load, measured ``len(runs)`` times; ``slow``: a fresh server per run."""

    label: str
    concurrency: int
    server: str = "service"  # what Harness.start starts
    rpc: str = "call"  # status or call over gRPC, rest or mcp
    ratio_to: Row | None = None  # its req/s is shown against this row's, in the same rounds
    slow: bool = False
    load: Json = field(default_factory=dict)  # LoadConfig fields: channels, tool, arguments
    runs: list[LoadResult] = field(default_factory=list)

    def median(self, metric: str) -> float | None:
        values = [value for run in self.runs if (value := getattr(run, metric)) is not None]
        return statistics.median(values) if values else None

    def ratio(self, other: Row) -> float | None:
        """Median of per-round req/s ratios this / other: drift on a busy machine cancels out."""
        pairs = [a.rps / b.rps for a, b in zip(self.runs, other.runs, strict=False) if b.rps > 0]
        return statistics.median(pairs) if pairs else None

    @property
    def errors(self) -> Counter[str]:
        return sum((Counter(run.errors) for run in self.runs), Counter())

    @property
    def rss_mb(self) -> float | None:
        return self.median("server_hwm_mb" if self.slow else "server_rss_peak_mb")

    def bound(self) -> str:
        """What limited the run: server CPU, client CPU, a shared server core, or latency."""
        if (self.median("server_util") or 0.0) >= SATURATED:
            return "server CPU"
        if (self.median("client_util") or 0.0) >= SATURATED:
            return "CLIENT CPU"
        if (self.median("server_cpu_busy") or 0.0) >= 0.95:
            return "server core shared"
        return "latency"

    def to_json(self) -> Json:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "median": {metric: self.median(metric) for metric in METRICS},
            "ratio": self.ratio(self.ratio_to) if self.ratio_to else None,
            "ratio_to": self.ratio_to.label if self.ratio_to else None,
            "errors": dict(self.errors),
            "rss_mb": self.rss_mb,
            "bound": self.bound(),
            "runs": [asdict(run) for run in self.runs],
        }


def target(name: str, value: float | None, op: str, threshold: float) -> Json:
    """A target as the report holds it: whether ``value op threshold`` (op: a key of COMPARE)."""
    passed = value is not None and bool(COMPARE[op](value, threshold))
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": passed}


def scenario(key: str, title: str, rows: list[Row], targets: list[Json], notes: list[str]) -> Json:
    """A scenario as the report holds it, every row with every run."""
    rows_json = [row.to_json() for row in rows]
    return {"key": key, "title": title, "rows": rows_json, "targets": targets, "notes": notes}


progress = functools.partial(print, file=sys.stderr, flush=True)


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
    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.at_1000: Row | None = None  # the slow scenario's service row, for growth to reuse

    def run(self, selected: list[str]) -> list[Json]:
        """The scenarios in ``selected``, in SCENARIOS order (slow before growth)."""
        return [getattr(self, name)() for name in selected]

    def _measure(self, *rows: Row) -> None:
        """Rounds of runs of ``rows``: one server per spec, or a fresh one per run of a slow row."""
        servers: dict[str, Server] = {}

        def measure(row: Row) -> LoadResult:
            if not row.slow:
                server = servers[row.server]
                return self.h.load(server, row.rpc, row.concurrency, False, **row.load)
            server = self.h.start(row.server, self.h.slow)
            try:
                return self.h.load(server, row.rpc, row.concurrency, slow=True)
            finally:
                server.stop()

        try:
            # The baseline starts last, once it can answer GetStatus with the service's reply.
            specs = dict.fromkeys(row.server for row in rows if not row.slow)
            for spec in sorted(specs, key=lambda spec: spec == "baseline"):
                if spec == "baseline" and "service" in servers:
                    self.h.capture_status(servers["service"])
                servers[spec] = self.h.start(spec, self.h.instant)
            for round_no in range(self.h.profile.runs):
                for row in rows if round_no % 2 == 0 else reversed(rows):
                    row.runs.append(run := measure(row))
                    progress(
                        f"  {row.label} c={row.concurrency}: {run.rps:,.0f} req/s, "
                        f"p50 {run.p50_ms:,.1f} ms, server {run.server_cpu_us_per_call:,.0f} "
                        f"µs/call, errors {sum(run.errors.values())}"
                    )
        finally:
            for server in servers.values():
                server.stop()

    def status(self) -> Json:
        note = (
            "The bare server answers with the service's own GetStatus reply and has no "
            "interceptors: the ratio is what authentication, metrics and the access line cost "
            "on the cheapest call (not rate limited)."
        )
        return self._against_bare("status", "GetStatus", "bare grpc.aio GetStatus", note)

    def calltool(self) -> Json:
        note = (
            "The bare handler posts the same body with one aiohttp session and returns the "
            "reply, with no checks, auth, rate limit or logging."
        )
        return self._against_bare("calltool", "CallTool", "bare grpc.aio + aiohttp CallTool", note)

    def _against_bare(self, key: str, method: str, bare_label: str, note: str) -> Json:
        progress(f"{key}: {method}, {FAST} in flight")
        rpc = "status" if method == "GetStatus" else "call"
        bare = Row(bare_label, FAST, "baseline", rpc)
        row = Row(f"service {method}", FAST, rpc=rpc, ratio_to=bare)
        self._measure(bare, row)
        against = "a bare grpc.aio server" + (" doing one aiohttp POST" if rpc == "call" else "")
        targets = [target(f"{method} req/s / {bare_label}", row.ratio(bare), ">=", 0.6)]
        return scenario(key, f"{method} against {against}", [bare, row], targets, [note])

    def upstreams(self) -> Json:
        progress(f"upstreams: CallTool through each upstream adapter, {FAST} in flight")
        agenta = Row("service CallTool, Agenta runner", FAST)
        openai = Row("service CallTool, OpenAI-compatible", FAST, "service openai", ratio_to=agenta)
        label, call = "service CallTool, declared tool, OpenAI-compatible", DECLARED_CALL
        declared = Row(label, FAST, "service openai", ratio_to=openai, load=call)
        self._measure(agenta, openai, declared)
        ratio, declared_ratio = openai.ratio(agenta), declared.ratio(openai)
        inverse = round(1 / ratio, 2) if ratio else None
        targets = [
            target("CallTool req/s, OpenAI-compatible / Agenta runner", ratio, ">=", 0.9),
            target("CallTool req/s, Agenta runner / OpenAI-compatible", inverse, ">=", 0.9),
            target("CallTool req/s, declared tool / refine_prompt", declared_ratio, ">=", 0.9),
        ]
        note = (
            "The same service and stand-in, refining through the Agenta completion runner's "
            "endpoint or its OpenAI-compatible chat completions endpoint; the declared tool is "
            f"{DECLARED_CALL['tool']} of {DECLARED_FILE}, answered by the stand-in."
        )
        title = "CallTool through each upstream"
        return scenario("upstreams", title, [agenta, openai, declared], targets, [note])

    def rest(self) -> Json:
        progress(f"rest: CallTool against the REST design, {FAST} in flight")
        row = Row("service CallTool", FAST)
        tuned = Row("REST, tuned POST /tools/call", FAST, "rest shared", "rest", row)
        merged = Row("REST, as merged POST /tools/call", FAST, "rest per-call", "rest", row)
        self._measure(row, tuned, merged)
        targets = [
            target("CallTool req/s, service / REST, tuned", row.ratio(tuned), ">=", 3),
            target("CallTool req/s, service / REST, as merged", row.ratio(merged), ">=", 30),
        ]
        note = (
            "FastAPI on one uvicorn worker (uvloop, httptools) on the service's core, with the "
            "same keys file, limiter and checks; tuned shares one httpx.AsyncClient, as merged "
            "builds one per call. Load: one aiohttp session, same concurrency."
        )
        title = "CallTool against the REST design the service replaces"
        return scenario("rest", title, [row, tuned, merged], targets, [note])

    def mcp(self) -> Json:
        progress(f"mcp: tools/call against a plain MCP SDK server, {FAST} in flight")
        sdk = Row("plain MCP SDK server tools/call", FAST, "rest mcp", "mcp")
        face = Row("service MCP tools/call", FAST, "service mcp", "mcp", sdk)
        grpc = Row("service CallTool", FAST, "service mcp", ratio_to=sdk)
        self._measure(grpc, face, sdk)
        progress(f"mcp: 1 s upstream, {SLOW:,} calls in flight over gRPC and MCP")
        slow_grpc = Row("service CallTool, 1 s upstream", SLOW, "service mcp", slow=True)
        label = "service MCP tools/call, 1 s upstream"
        slow_face = Row(label, SLOW, "service mcp", "mcp", slow_grpc, slow=True)
        self._measure(slow_grpc, slow_face)
        face_ratio, grpc_ratio = face.ratio(sdk), grpc.ratio(sdk)
        targets = [
            target("tools/call req/s, service MCP / plain MCP SDK server", face_ratio, ">=", 0.9),
            target("CallTool req/s, service gRPC / plain MCP SDK server", grpc_ratio, ">=", 3),
            target("1,000 in flight over MCP: errors", float(slow_face.errors.total()), "==", 0),
            target("1,000 in flight: req/s, MCP / gRPC", slow_face.ratio(slow_grpc), ">=", 0.5),
        ]
        note = (
            "The SDK server is the SDK's stateless JSON MCPServer with one tool on one uvicorn "
            "worker on the service's core, doing the REST design's work. Load: tools/call bodies "
            "with the SDK client's headers through one aiohttp session; the service serves gRPC "
            "and MCP from one process. Slow rows: a fresh service per run, a user per call."
        )
        title = "MCP tools/call: the service's MCP face against a plain MCP SDK server"
        return scenario("mcp", title, [grpc, face, sdk, slow_grpc, slow_face], targets, [note])

    def slow(self) -> Json:
        progress(f"slow: 1 s upstream, {SLOW:,} calls in flight")
        bare = Row("bare grpc.aio + aiohttp, 1 s upstream", SLOW, "baseline", slow=True)
        row = Row("service, 1 s upstream", SLOW, ratio_to=bare, slow=True)
        self._measure(bare, row)
        bare_rps = bare.median("rps") or 0.0
        targets = [
            target("1,000 in flight: errors (all runs)", float(row.errors.total()), "==", 0),
            target("1,000 in flight: peak RSS MB", row.rss_mb, "<", 130),
            target("1,000 in flight: req/s", row.median("rps"), ">=", slow_rps_floor(bare_rps)),
        ]
        note = (
            "A fresh server per run; RSS is its VmHWM. The req/s target is 900, or 0.9 of the "
            f"bare server's req/s in the same run when that is under 900 (here {bare_rps:,.0f})."
        )
        title = f"{SLOW:,} calls in flight to a 1 s upstream"
        self.at_1000 = row
        return scenario("slow", title, [bare, row], targets, [note])

    def growth(self) -> Json:
        """CallTool by concurrency, then the service's RSS by slow calls in flight."""
        progress(f"growth: CallTool at {', '.join(map(str, GROWTH_CONCURRENCY))} in flight")
        rows = [Row("service CallTool", c) for c in GROWTH_CONCURRENCY]
        self._measure(*rows)
        progress(f"growth: 1 s upstream, {', '.join(map(str, GROWTH_IN_FLIGHT))} in flight")
        slow = [Row("service, 1 s upstream", n, slow=True) for n in GROWTH_IN_FLIGHT]
        if self.at_1000:  # the slow scenario measured 1,000 in flight already
            slow[-1] = self.at_1000
        self._measure(*(row for row in slow if not row.runs))
        title = "Cost growth: CallTool by concurrency; RSS by slow calls in flight"
        notes = ["The 1,000 row is the slow scenario's, when it ran."] if self.at_1000 else []
        return scenario("growth", title, rows + slow, [], notes)

    def thousands(self) -> Json:
        """HUGE calls in flight: callers' and access lines' counts must agree; RSS per call.
        The bare server under the same load shows what grpc.aio and aiohttp hold alone."""
        progress(f"thousands: 10 s upstream, {HUGE:,} calls in flight over 16 channels")
        bare = Row("bare grpc.aio + aiohttp, 10 s upstream", HUGE, "baseline wide", slow=True)
        row = Row("service, 10 s upstream", HUGE, "service wide", ratio_to=bare, slow=True)
        upstream, idle_kb = self.h.upstream(10.0), 0.0
        window = {"ramp_s": 10.0, "warmup_s": 12.0, "duration_s": 10.0, "timeout_s": 60.0}
        for each in (bare, row):
            server = self.h.start(each.server, upstream)
            idle_kb = sample(server.proc.pid)[1]
            each.runs.append(self.h.load(server, "call", HUGE, True, channels=16, **window))
            server.stop()  # every access line is written once it has exited
        lines = server.log_path.read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith('{"')]
        logged = Counter(r["code"] for r in records if r.get("method", "").endswith("/CallTool"))
        seen = Counter(row.runs[0].totals)
        per_call_kb = ((row.rss_mb or 0.0) * 1024 - idle_kb) / HUGE
        targets = [
            target("10,000 in flight: errors", float(seen.total() - seen["OK"]), "==", 0),
            target("10,000 in flight: req/s", row.median("rps"), ">=", 900),
            target("10,000 in flight: OK lines - OK seen", logged["OK"] - seen["OK"], "==", 0),
            target("10,000 in flight: peak RSS MB", row.rss_mb, "<", 600),
        ]
        note = (
            f"Callers of the service saw {dict(seen)} in the whole run, its access lines "
            f"{dict(logged)}; callers of the bare server saw {bare.runs[0].totals}. "
            f"{per_call_kb:,.0f} KB of RSS per call in flight, over {idle_kb / 1024:,.0f} MB idle."
        )
        title = f"{HUGE:,} calls to a 10 s upstream"
        return scenario("thousands", title, [bare, row], targets, [note])

    def workers(self) -> Json:
        """CallTool on every core: WORKERS=2 and two replicas behind nginx against one process,
        all sharing one Redis budget, unpinned, beside the load generator."""
        progress(f"workers: CallTool, {FAST} in flight over 16 channels, every core")
        wide = {"channels": 16}
        one = Row("service, 1 process", FAST, "service any", load=wide)
        two = Row("service, WORKERS=2", FAST, "service any workers", ratio_to=one, load=wide)
        fronted = Row("2 replicas behind nginx", FAST, "nginx", ratio_to=one, load=wide)
        self._measure(one, two, fronted)
        used = ", ".join(
            f"{r.label} {(r.median('server_util') or 0) + (r.median('client_util') or 0):.2f}"
            for r in (one, two)
        )
        note = (
            f"Servers (with REDIS_URL), nginx, Redis and the load generator share all "
            f"{len(os.sched_getaffinity(0))} cores; the stand-in keeps the load's. Server + load "
            f"generator CPU, in cores: {used}. The nginx row's server CPU is nginx's own."
        )
        title = "CallTool with every core: workers and replicas against one process"
        return scenario("workers", title, [one, two, fronted], [], [note])
