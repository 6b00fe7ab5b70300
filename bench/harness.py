"""Starts the stand-in upstreams and the servers under test as processes, and runs the load.

Every process is pinned with taskset when there are two CPUs or more (servers on one, load
generator and upstreams on another), writes its output to files (no pipe can fill up and block
it), runs in its own session (Ctrl-C reaches only the harness) and is stopped when the harness
closes. The servers under test are reached only as a user would: by their port.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.auth import generate_key, hash_key
from aiservices_server.config import ENV_PREFIX
from bench.common import (
    ENVIRONMENT_SLUG,
    RATE_LIMIT_BURST,
    RATE_LIMIT_PER_MINUTE,
    REFINE_PROMPT_KEY,
    UPSTREAM_API_KEY,
)
from bench.loadgen import LoadConfig, LoadResult

ROOT = Path(__file__).resolve().parent.parent
SLOW_DELAY_S = 1.0
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
        load = f"load generator, stand-in upstreams and harness on CPU {cpus[1]} (taskset)"
        return cls(cpus[0], cpus[1], f"servers under test on CPU {cpus[0]}; {load}")


def pinned(cpu: int | None, *args: str) -> list[str]:
    """``python args``, run with taskset on ``cpu`` when there is one."""
    return [*([] if cpu is None else ["taskset", "-c", str(cpu)]), sys.executable, *args]


class Server:
    """A process started by the harness that listens on 127.0.0.1:``port``."""

    def __init__(self, name: str, cmd: list[str], port: int, logs: Path, **popen: Any) -> None:
        self.name = name
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.mcp_target = ""  # where it serves MCP when not on ``target``
        self.log_path = logs / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                **popen,
            )

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-10:])

    def wait_listening(self, port: int = 0) -> None:
        """Return once the port (its own by default) accepts connections; ProcessFailed if it
        never does."""
        deadline, address = time.monotonic() + READY_TIMEOUT_S, ("127.0.0.1", port or self.port)
        while True:
            with contextlib.suppress(OSError), socket.create_connection(address):
                return
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not listening after {READY_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Harness(contextlib.ExitStack):
    """Owns every process it starts and its temporary directory: leaving the ``with`` stops
    and removes them all. The stand-in upstreams live as long as the harness."""

    def __init__(self, pinning: Pinning) -> None:
        super().__init__()
        self.pinning = pinning
        self._tmp = Path(self.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        self._count = 0
        self.keys_file = self._tmp / "keys.toml"
        self.status_file: Path | None = None
        self.key = generate_key()
        self.keys_file.touch(mode=0o600)  # a keys file others can read draws a warning
        self.keys_file.write_text(
            f'[[keys]]\nid = "bench"\nhash = "{hash_key(self.key)}"\n'
            'permissions = ["*", "act_for_users"]\n'
        )
        self.instant = self._upstream(0.0)
        self.slow = self._upstream(SLOW_DELAY_S)

    def _start(self, name: str, cpu: int | None, *args: str, port: int = 0, **popen: Any) -> Server:
        """Start ``python args`` pinned to ``cpu`` (with ``--port`` unless ``port`` is given);
        return once it listens."""
        if not port:
            port = free_port()
            args = (*args, "--port", str(port))
        self._count += 1
        server = Server(f"{self._count:03d}-{name}", pinned(cpu, *args), port, self._tmp, **popen)
        self.callback(server.stop)
        server.wait_listening()
        return server

    def _upstream(self, delay: float) -> Server:
        args = ("-m", "tests.standin", "--api-key", UPSTREAM_API_KEY, "--delay", str(delay))
        return self._start(f"upstream-{delay:g}s", self.pinning.load_cpu, *args)

    def service(self, upstream: Server, mcp: bool = False, openai: bool = False) -> Server:
        """``aiservices-server`` with production settings, the rate limit raised out of the way,
        serving MCP too when ``mcp`` is set, refining through the stand-in's OpenAI-compatible
        endpoint instead of its Agenta one when ``openai`` is set.

        It runs in a temporary directory so a developer's ``.env`` does not leak in. Settings in
        the bench's own environment win: ``AGENTA_AI_SERVICES_LOG_LEVEL=WARNING make bench``
        measures the service without its access lines."""
        port = free_port()
        settings = {
            "GRPC_ADDRESS": f"127.0.0.1:{port}",
            "API_KEYS_FILE": str(self.keys_file),
            "RATE_LIMIT_BURST": str(RATE_LIMIT_BURST),
            "RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT_PER_MINUTE),
            "API_KEY": UPSTREAM_API_KEY,
            "API_URL": f"http://{upstream.target}",
            "ENVIRONMENT_SLUG": ENVIRONMENT_SLUG,
            "REFINE_PROMPT_KEY": REFINE_PROMPT_KEY,
            "METRICS_ADDRESS": "127.0.0.1:0",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE": "2",
        }
        if openai:
            settings.update(
                UPSTREAM="openai",
                OPENAI_BASE_URL=f"http://{upstream.target}/v1",
                OPENAI_MODEL="stand-in",
            )
        mcp_port = free_port() if mcp else 0
        if mcp:
            settings["MCP_ADDRESS"] = f"127.0.0.1:{mcp_port}"
        env = {**{ENV_PREFIX + name: value for name, value in settings.items()}, **os.environ}
        cpu = self.pinning.server_cpu
        server = self._start(
            "service", cpu, "-m", "aiservices_server", port=port, env=env, cwd=self._tmp
        )
        if mcp:
            server.wait_listening(mcp_port)
            server.mcp_target = f"127.0.0.1:{mcp_port}"
        return server

    def baseline(self, upstream: Server) -> Server:
        status = () if self.status_file is None else ("--status-file", str(self.status_file))
        return self.peer("baseline", upstream, *status)

    def peer(self, module: str, upstream: Server, *args: str) -> Server:
        """``python -m bench.<module>``, a server the service is compared with, on its core:
        baseline (bare grpc.aio) or rest (the REST design or, with ``--client mcp``, a plain
        MCP SDK server, serving MCP on its one port)."""
        args = (*args, "--upstream", f"http://{upstream.target}")
        if module != "baseline":
            args += ("--keys-file", str(self.keys_file))
        return self._start(
            module, self.pinning.server_cpu, "-m", f"bench.{module}", *args, cwd=ROOT
        )

    def capture_status(self, service: Server) -> None:
        """Save the service's GetStatus reply so the baseline answers with the same bytes."""
        with grpc.insecure_channel(service.target) as channel:
            reply = pb_grpc.ToolServiceStub(channel).GetStatus(
                pb.GetStatusRequest(),
                metadata=(("authorization", f"Bearer {self.key}"),),
                timeout=10,
                wait_for_ready=True,
            )
        self.status_file = self._tmp / "status.bin"
        self.status_file.write_bytes(reply.SerializeToString())

    def load(self, server: Server, rpc: str, **config: Any) -> LoadResult:
        """One measured run of the load generator (``config``: the rest of its LoadConfig), as
        its own process on the load CPU."""
        load = LoadConfig(
            target=(rpc == "mcp" and server.mcp_target) or server.target,
            rpc=rpc,
            key=self.key,
            server_pid=server.proc.pid,
            server_cpu=self.pinning.server_cpu,
            **config,
        )
        bound = load.warmup_s + load.duration_s + load.timeout_s + 40.0
        argv = pinned(self.pinning.load_cpu, "-m", "bench.loadgen", json.dumps(asdict(load)))
        try:
            finished = subprocess.run(
                argv,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=bound,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"load generator still running after {bound:g} s") from None
        if finished.returncode != 0:
            raise ProcessFailed(f"load generator failed:\n{finished.stderr[-2000:]}")
        if server.proc.poll() is not None:
            raise ProcessFailed(f"{server.name} died during the run:\n{server.tail()}")
        return LoadResult(**json.loads(finished.stdout.splitlines()[-1]))
