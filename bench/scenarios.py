"""The scenarios (which servers run side by side, under which load, with which targets) and the
harness: upstreams, servers and load generator each a process of its own, pinned with taskset
(servers on one CPU, the load side on the other), stopped when the harness closes. Rows compared
run in rounds, the order flipped every round, so drift on a shared machine hits them alike."""

from __future__ import annotations

import contextlib
import functools
import itertools
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
from tests.support.otlp import OtlpReceiver
from tests.support.redis_server import RedisServer
from tests.support.waiting import closed_port

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


@dataclass
class Server:
    """A process the harness started (or nginx's master, in front of replicas started with it),
    listening on ``target`` (MCP on ``mcp_target`` when that is set), its log in ``log_path``."""

    name: str
    proc: subprocess.Popen[Any]
    target: str
    log_path: Path
    cpu: int | None
    mcp_target: str = ""

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
        self._count = itertools.count(1)
        self._redis: RedisServer | None = None  # the shared budget's store, once needed
        self.otlp: OtlpReceiver | None = None  # the traces row's receiver, once needed
        self.keys_file = self._tmp / "keys.toml"
        self.status_file: Path | None = None
        self.key = generate_key()
        self.keys_file.touch(mode=0o600)  # a keys file others can read draws a warning
        keys = f'[[keys]]\nid = "bench"\nhash = "{hash_key(self.key)}"\n'
        self.keys_file.write_text(keys + 'permissions = ["*", "act_for_users"]\n')
        self.instant, self.delayed = self.upstream(0.0), self.upstream(1.0)

    def upstream(self, delay: float) -> Server:  # the stand-in, answering after ``delay`` s
        standin = ("-m", "tests.standin", "--api-key", common.UPSTREAM_API_KEY, "--delay")
        return self._start(f"upstream-{delay:g}s", self.pinning.load_cpu, *standin, str(delay))

    def _start(self, name: str, cpu: int | None, *args: str, port: int = 0, **popen: Any) -> Server:
        """``python args`` on ``cpu``, with ``--port`` unless ``port`` is given, once listening."""
        if not port:
            port = closed_port()
            args = (*args, "--port", str(port))
        name = f"{next(self._count):03d}-{name}"
        with open(log_path := self._tmp / f"{name}.log", "wb") as log:
            popen |= {"stdin": DEVNULL, "stdout": log, "stderr": log, "start_new_session": True}
            proc = subprocess.Popen(pinned(cpu, *args), **popen)
        process = Server(name, proc, f"127.0.0.1:{port}", log_path, cpu)
        self.callback(process.stop)
        process.wait_listening(process.target)
        return process

    def start(self, spec: str, upstream: Server) -> Server:
        """A server under test calling ``upstream``: ``baseline`` (GetStatus as ``capture_status``
        saved it), ``rest shared|per-call|mcp``, ``nginx`` (two replicas behind deploy/nginx.conf)
        or ``service`` (``mcp``, ``openai``, ``traces``, ``any`` core, ``workers``, ``wide``: room
        for HUGE calls), in a temporary directory; the bench's environment wins, traces aside."""
        module, *options = spec.split()
        if module == "nginx":  # the replicas stop with the harness
            replicas = [self.start("service any mcp", upstream) for _ in range(2)]
            upstreams = [r.target for r in replicas], [r.mcp_target for r in replicas]
            nginx = self.enter_context(NginxProcess(*upstreams))
            return Server("nginx", nginx.process, nginx.grpc_target, nginx.error_log, None)
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
        port = closed_port()
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
            "SHUTDOWN_GRACE": "2",
        }
        if "openai" in options:
            settings |= {"UPSTREAM": "openai", "OPENAI_BASE_URL": f"{url}/v1"}
            settings |= {"OPENAI_MODEL": "stand-in", "TOOLS_FILE": str(ROOT / DECLARED_FILE)}
        if "mcp" in options:
            settings["MCP_ADDRESS"] = f"127.0.0.1:{closed_port()}"
        if "any" in options:  # every core, sharing one budget with the others
            self._redis = self._redis or self.enter_context(RedisServer())
            workers = "2" if "workers" in options else "1"
            settings |= {"WORKERS": workers, "REDIS_URL": self._redis.url}
        if "wide" in options:  # room for HUGE calls in flight, each holding an upstream connection
            settings |= {"MAX_CONCURRENT_CALLS": str(2 * HUGE), "UPSTREAM_MAX_CONNECTIONS": "10000"}
        env = {**{ENV_PREFIX + name: value for name, value in settings.items()}, **os.environ}
        env["OTEL_SDK_DISABLED"] = str("traces" not in options).lower()
        if "traces" in options:  # exported over OTLP/HTTP to a receiver in the harness
            self.otlp = self.otlp or self.enter_context(OtlpReceiver())
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp.endpoint
        args = ["-m", "aiservices_server"]
        server = self._start("service", cpu, *args, port=port, env=env, cwd=self._tmp)
        server.mcp_target = settings.get("MCP_ADDRESS", server.target)
        server.wait_listening(server.mcp_target)
        return server

    def capture_status(self, service: Server) -> None:
        """Save the service's GetStatus reply so the baseline answers with the same bytes."""
        auth = (("authorization", f"Bearer {self.key}"),)
        with grpc.insecure_channel(service.target) as channel:
            status = pb_grpc.ToolServiceStub(channel).GetStatus
            reply = status(pb.GetStatusRequest(), metadata=auth, timeout=10, wait_for_ready=True)
        self.status_file = self._tmp / "status.bin"
        self.status_file.write_bytes(reply.SerializeToString())

    def load(self, server: Server, row: Row, **override: Any) -> LoadResult:
        """One run of the load generator for ``row`` (workers start over half the warm-up, or for
        a slow row over ``slow_ramp_s``, a user each); ``row.load``, ``override``: config fields."""
        p, slow = self.profile, row.slow
        config = LoadConfig(
            target=(server.mcp_target or server.target) if row.rpc == "mcp" else server.target,
            rpc=row.rpc,
            concurrency=row.concurrency,
            key=self.key,
            server_pid=server.proc.pid,
            server_cpu=server.cpu,
            users=slow,
            ramp_s=p.slow_ramp_s if slow else p.warmup_s / 2,
            warmup_s=p.slow_warmup_s if slow else p.warmup_s,
            duration_s=p.slow_duration_s if slow else p.duration_s,
            timeout_s=30.0 if slow else 10.0,
        )
        load = replace(config, **row.load | override)
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


# Every scenario by its key, with its title, in the order they run (slow before growth).
TITLES = {
    "status": "GetStatus: the service against a bare grpc.aio server",
    "calltool": "CallTool: the service, traces off and on, against bare grpc.aio + aiohttp",
    "upstreams": "CallTool through the Agenta runner and through the OpenAI-compatible upstream",
    "rest": "CallTool: the service against the REST design it replaces, tuned and as merged",
    "mcp": "tools/call: the service's MCP face against a plain MCP SDK server; 1,000 slow calls",
    "slow": "1,000 calls in flight to an upstream answering after 1 s",
    "growth": "CallTool at 1/16/64/256 in flight; RSS at 100/500/1,000 slow calls in flight",
    "thousands": "10,000 calls in flight to an upstream answering after 10 s, over 16 channels",
    "workers": "CallTool on every core: WORKERS=2 and 2 replicas behind nginx against 1 process",
}
DECLARED_FILE = "examples/tools.toml"  # the upstreams scenario's declared tool, served by openai
DECLARED_CALL = {"tool": "tools.examples.support.classify_ticket", "arguments": {"ticket": "Hi"}}
# What a reader of a scenario's table should know, beside the notes its run adds.
NOTES = {
    "status": "The bare server answers the service's own GetStatus reply, with no interceptors: "
    "the ratio is what authentication, metrics and the access line cost (no rate limit).",
    "calltool": "The bare handler posts the same body with one aiohttp session and returns the "
    "reply, with no checks, auth, rate limit or logging. Traces on: the same service exporting "
    "its spans over OTLP/HTTP to the tests' receiver (tests/support/otlp.py), which runs in the "
    "harness's process, unpinned; off, the OpenTelemetry SDK is not even imported.",
    "upstreams": "The same service and stand-in, through the Agenta runner's endpoint or the "
    f"OpenAI-compatible one; the declared tool is {DECLARED_CALL['tool']} of {DECLARED_FILE}.",
    "rest": "FastAPI, one uvicorn worker (uvloop, httptools) on the service's core, same keys, "
    "limiter and checks; tuned shares one httpx.AsyncClient, as merged builds one per call.",
    "mcp": "The SDK's stateless JSON MCPServer, one tool, one uvicorn worker on the service's "
    "core, doing the REST design's work; the service serves gRPC and MCP from one process. Slow "
    "rows: a fresh service per run, a user per call.",
    "slow": "A fresh server per run; RSS is its VmHWM. The req/s target is 900, or 0.9 of the bare "
    "server's req/s in the same run when that is under 900.",
    "workers": "Servers (with REDIS_URL), nginx, Redis and the load generator share all cores; the "
    "stand-in keeps the load's. The nginx row's server CPU is nginx's own.",
}
FAST = 64  # calls in flight against the instant upstream
SLOW = 1000  # calls in flight against the 1 s upstream
HUGE = 10_000  # calls in flight against a 10 s upstream, over 16 channels
SATURATED = 0.85  # a process using this share of its core is what limits the run
# The medians each row reports, with their format in the table.
METRICS = {"rps": ",.0f", "p50_ms": ",.1f", "p99_ms": ",.1f", "server_cpu_us_per_call": ",.0f"}
METRICS |= {"server_util": ".0%", "client_util": ".0%"}
COMPARE = {">=": operator.ge, "<": operator.lt, "==": operator.eq}
Json = dict[str, Any]  # a part of the report, as written to the JSON file
Report = tuple[list["Row"], list[Json], list[str]]  # a scenario's rows, targets and notes


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


progress = functools.partial(print, file=sys.stderr, flush=True)


def slow_rps_floor(bare_rps: float) -> float:
    """The slow scenario's req/s target: 900, unless the bare server itself cannot reach 900
    in the same run (a slow or busy machine): then 0.9 of the bare server's req/s."""
    return 900.0 if bare_rps >= 900 else round(0.9 * bare_rps, 1)


class Runner(Harness):
    """The harness running the scenarios."""

    at_1000: Row | None = None  # the slow scenario's service row, for growth to reuse

    def run(self, selected: list[str]) -> list[Json]:
        """The scenarios in ``selected``, in TITLES order, as the report holds them."""
        results = []
        for key in selected:
            progress(f"{key}: {TITLES[key]}")
            rows, targets, notes = getattr(self, key)()
            notes = [NOTES[key], *notes] if key in NOTES else notes
            report = {"key": key, "title": TITLES[key], "rows": [row.to_json() for row in rows]}
            results.append(report | {"targets": targets, "notes": notes})
        return results

    def _measure(self, *rows: Row) -> None:
        """Rounds of runs of ``rows``: one server per spec, or a fresh one per run of a slow row
        (should a run fail, the harness stops them all when it closes)."""
        servers: dict[str, Server] = {}
        # The baseline starts last, once it can answer GetStatus with the service's reply.
        specs = dict.fromkeys(row.server for row in rows if not row.slow)
        for spec in sorted(specs, key=lambda spec: spec == "baseline"):
            if spec == "baseline" and "service" in servers:
                self.capture_status(servers["service"])
            servers[spec] = self.start(spec, self.instant)
        for round_no in range(self.profile.runs):
            for row in rows if round_no % 2 == 0 else reversed(rows):
                server = self.start(row.server, self.delayed) if row.slow else servers[row.server]
                row.runs.append(run := self.load(server, row))
                if row.slow:
                    server.stop()
                done = f"{run.rps:,.0f} req/s, p50 {run.p50_ms:,.1f} ms, errors {run.errors}"
                progress(f"  {row.label} c={row.concurrency}: {done}")
        for server in servers.values():
            server.stop()

    def status(self) -> Report:
        return self._vs_bare("GetStatus", "bare grpc.aio GetStatus")

    def calltool(self) -> Report:
        rows, targets, _ = self._vs_bare("CallTool", "bare grpc.aio + aiohttp CallTool", "traces")
        spans = len(self.otlp.spans) if self.otlp else 0
        return rows, targets, [f"The receiver took {spans:,} spans from the traces row's service."]

    def _vs_bare(self, method: str, bare_label: str, *also: str) -> Report:
        """``method`` on the bare server and on the service (also with each option in ``also``,
        its req/s shown against the service's), 64 in flight, in the same rounds."""
        rpc = "status" if method == "GetStatus" else "call"
        rows = [bare := Row(bare_label, FAST, "baseline", rpc)]
        rows.append(row := Row(f"service {method}", FAST, rpc=rpc, ratio_to=bare))
        rows += [Row(f"service {method}, {o} on", FAST, f"service {o}", rpc, row) for o in also]
        self._measure(*rows)
        targets = [target(f"{method} req/s / {bare_label}", row.ratio(bare), ">=", 0.6)]
        return rows, targets, []

    def upstreams(self) -> Report:
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
        return [agenta, openai, declared], targets, []

    def rest(self) -> Report:
        row = Row("service CallTool", FAST)
        tuned = Row("REST, tuned POST /tools/call", FAST, "rest shared", "rest", row)
        merged = Row("REST, as merged POST /tools/call", FAST, "rest per-call", "rest", row)
        self._measure(row, tuned, merged)
        targets = [
            target("CallTool req/s, service / REST, tuned", row.ratio(tuned), ">=", 3),
            target("CallTool req/s, service / REST, as merged", row.ratio(merged), ">=", 30),
        ]
        return [row, tuned, merged], targets, []

    def mcp(self) -> Report:
        sdk = Row("plain MCP SDK server tools/call", FAST, "rest mcp", "mcp")
        face = Row("service MCP tools/call", FAST, "service mcp", "mcp", sdk)
        grpc = Row("service CallTool", FAST, "service mcp", ratio_to=sdk)
        self._measure(grpc, face, sdk)
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
        return [grpc, face, sdk, slow_grpc, slow_face], targets, []

    def slow(self) -> Report:
        bare = Row("bare grpc.aio + aiohttp, 1 s upstream", SLOW, "baseline", slow=True)
        row = Row("service, 1 s upstream", SLOW, ratio_to=bare, slow=True)
        self._measure(bare, row)
        bare_rps = bare.median("rps") or 0.0
        targets = [
            target("1,000 in flight: errors (all runs)", float(row.errors.total()), "==", 0),
            target("1,000 in flight: peak RSS MB", row.rss_mb, "<", 130),
            target("1,000 in flight: req/s", row.median("rps"), ">=", slow_rps_floor(bare_rps)),
        ]
        self.at_1000 = row
        return [bare, row], targets, [f"The bare server's req/s here: {bare_rps:,.0f}."]

    def growth(self) -> Report:
        """CallTool by concurrency, then the service's RSS by slow calls in flight."""
        rows = [Row("service CallTool", c) for c in (1, 16, 64, 256)]
        self._measure(*rows)
        slow = [Row("service, 1 s upstream", n, slow=True) for n in (100, 500, SLOW)]
        if self.at_1000:  # the slow scenario measured SLOW in flight already: its row stands in
            slow[-1] = self.at_1000
        self._measure(*(row for row in slow if not row.runs))
        notes = ["The 1,000 row is the slow scenario's, when it ran."] if self.at_1000 else []
        return rows + slow, [], notes

    def thousands(self) -> Report:
        """HUGE calls in flight: callers' and access lines' counts must agree; RSS per call.
        The bare server under the same load shows what grpc.aio and aiohttp hold alone."""
        bare = Row("bare grpc.aio + aiohttp, 10 s upstream", HUGE, "baseline wide", slow=True)
        row = Row("service, 10 s upstream", HUGE, "service wide", ratio_to=bare, slow=True)
        window = {"channels": 16, "ramp_s": 10.0, "warmup_s": 12.0, "duration_s": 10.0}
        upstream, idle_kb = self.upstream(10.0), 0.0
        for each in (bare, row):
            server = self.start(each.server, upstream)
            idle_kb = sample(server.proc.pid)[1]
            each.runs.append(self.load(server, each, timeout_s=60.0, **window))
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
        return [bare, row], targets, [note]

    def workers(self) -> Report:
        """CallTool on every core: WORKERS=2 and two replicas behind nginx against one process,
        all sharing one Redis budget, unpinned, beside the load generator."""
        wide = {"channels": 16}
        one = Row("service, 1 process", FAST, "service any", load=wide)
        two = Row("service, WORKERS=2", FAST, "service any workers", ratio_to=one, load=wide)
        fronted = Row("2 replicas behind nginx", FAST, "nginx", ratio_to=one, load=wide)
        self._measure(one, two, fronted)
        used = ", ".join(
            f"{r.label} {(r.median('server_util') or 0) + (r.median('client_util') or 0):.2f}"
            for r in (one, two)
        )
        return [one, two, fronted], [], [f"Server + load generator CPU, in cores: {used}."]
