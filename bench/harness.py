"""Starts the stand-in upstreams, the real server and the baselines; runs the load generator."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc

from bench.common import (
    ENVIRONMENT_SLUG,
    REFINE_PROMPT_KEY,
    UPSTREAM_API_KEY,
    memory_kb,
)
from bench.loadgen import LoadConfig, LoadResult
from bench.procs import Managed, Pinning, ProcessFailed, json_port, python, standin_url
from server.auth import generate_key, hash_key
from server.config import ENV_PREFIX as PREFIX

SLOW_DELAY_S = 1.0


@dataclass(frozen=True, slots=True)
class Server:
    """A gRPC server under test: its process and where to reach it."""

    name: str
    process: Managed
    port: int
    idle_rss_mb: float

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


def env_setting(text: str) -> tuple[str, str]:
    """`NAME=VALUE` for the server under test; the AGENTA_AI_SERVICES_ prefix is optional."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=VALUE")
    return name.upper().removeprefix(PREFIX), value


def add_server_env_option(parser: argparse.ArgumentParser) -> None:
    """``--server-env NAME=VALUE`` (repeatable), as ``env_setting`` pairs in ``server_env``."""
    parser.add_argument(
        "--server-env",
        action="append",
        type=env_setting,
        default=[],
        metavar="NAME=VALUE",
        help="extra AGENTA_AI_SERVICES_ setting for the real server (prefix optional)",
    )


def write_keys_file(path: Path) -> str:
    """A keys file with one key allowed everything (delegation included); returns the key."""
    key = generate_key()
    path.write_text(
        f'[[keys]]\nid = "bench"\nhash = "{hash_key(key)}"\npermissions = ["*", "act_for_users"]\n'
    )
    return key


class Harness:
    """Owns every process it starts; ``close`` (or leaving the ``with``) stops them all."""

    def __init__(self, pinning: Pinning, server_env: Mapping[str, str]) -> None:
        self.pinning = pinning
        self.server_env = dict(server_env)
        self._stack = contextlib.ExitStack()
        self._tmp = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        self._count = 0
        self.key = ""
        self.keys_file = self._tmp / "keys.toml"
        self.instant: tuple[str, int] | None = None
        self.slow: tuple[str, int] | None = None
        self.status_file: Path | None = None
        # Servers under test start as [*server_wrapper, python, ...] (bench.instructions runs
        # them under valgrind, which needs the longer wait for readiness).
        self.server_wrapper: list[str] = []
        self.ready_timeout = 30.0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def _name(self, base: str) -> str:
        self._count += 1
        return f"{self._count:03d}-{base}"

    def _spawn(self, base: str, cmd: list[str], cpu: int | None, **kwargs: Any) -> Managed:
        command = [*self.pinning.prefix(cpu), *cmd]
        process = Managed(self._name(base), command, logs=self._tmp, **kwargs)
        self._stack.callback(process.stop)
        return process

    # --- set-up ------------------------------------------------------------------------------

    def start(self) -> None:
        """The API key and the two stand-in upstreams, which live as long as the harness."""
        self.key = write_keys_file(self.keys_file)
        self.instant = self._upstream(0.0)
        self.slow = self._upstream(SLOW_DELAY_S)

    def _upstream(self, delay: float) -> tuple[str, int]:
        cmd = [python(), "-m", "server.standin", "--port", "0", "--api-key", UPSTREAM_API_KEY]
        if delay > 0:
            cmd += ["--delay", str(delay)]
        process = self._spawn(
            "upstream-slow" if delay else "upstream-instant",
            cmd,
            self.pinning.load_cpu,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return process.wait_for(standin_url), process.pid

    # --- servers -----------------------------------------------------------------------------

    def _server_env(self, upstream_url: str, address: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        settings = {
            "GRPC_ADDRESS": address,
            "API_KEYS_FILE": str(self.keys_file),
            "RATE_LIMIT_BURST": "1000000",
            "RATE_LIMIT_PER_MINUTE": "6000000",
            "API_KEY": UPSTREAM_API_KEY,
            "API_URL": upstream_url,
            "ENVIRONMENT_SLUG": ENVIRONMENT_SLUG,
            "REFINE_PROMPT_KEY": REFINE_PROMPT_KEY,
            "METRICS_ADDRESS": "127.0.0.1:0",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE": "2",
            **self.server_env,
        }
        env.update({PREFIX + name: value for name, value in settings.items()})
        return env

    def _ready(self, name: str, process: Managed, port: int = 0) -> Server:
        try:
            if port:
                _wait_listening(process, port, self.ready_timeout)
            else:
                port = int(process.wait_for(json_port, self.ready_timeout))
        except ProcessFailed:
            process.stop()
            raise
        rss_kb, _ = memory_kb(process.pid)
        return Server(name, process, port, rss_kb / 1024)

    def real_server(self, upstream_url: str) -> Server:
        """``python -m server`` with production settings (rate limit raised), cwd in a temporary
        directory so a developer's ``.env`` does not leak in.

        The port comes from the server's "serving" log line; when a LOG_LEVEL override hides
        INFO, the harness picks a free port itself and waits until it accepts connections.
        """
        quiet = self.server_env.get("LOG_LEVEL", "INFO").upper() not in ("INFO", "DEBUG")
        port = _free_port() if quiet else 0
        process = self._spawn(
            "server",
            [*self.server_wrapper, python(), "-m", "server"],
            self.pinning.server_cpu,
            env=self._server_env(upstream_url, f"127.0.0.1:{port}"),
            cwd=self._tmp,
        )
        return self._ready("server", process, port)

    def baseline(
        self, upstream_url: str | None, client: str = "aiohttp", *, floor: bool = False
    ) -> Server:
        """The bare baseline; with `floor`, behind the floor interceptor (bench.floor)."""
        loop = self.server_env.get("EVENT_LOOP", "uvloop")
        cmd = [*self.server_wrapper, python(), "-m", "bench.baseline", "--client", client]
        cmd += ["--loop", loop]
        if floor:
            cmd += ["--floor", str(self.keys_file)]
        if self.status_file is not None:
            cmd += ["--status-file", str(self.status_file)]
        if upstream_url is not None:
            cmd += ["--upstream", upstream_url]
        name = f"floor-{client}" if floor else f"baseline-{client}"
        process = self._spawn(name, cmd, self.pinning.server_cpu)
        return self._ready("baseline", process)

    def stop(self, server: Server) -> None:
        server.process.stop()

    def capture_status(self, server: Server) -> None:
        """Save the real server's GetStatus reply so the baseline can answer the same bytes."""
        with grpc.insecure_channel(server.target) as channel:
            reply = pb_grpc.ToolServiceStub(channel).GetStatus(
                pb.GetStatusRequest(),
                metadata=(("authorization", f"Bearer {self.key}"),),
                timeout=10,
            )
        self.status_file = self._tmp / "status.bin"
        self.status_file.write_bytes(reply.SerializeToString())

    # --- load --------------------------------------------------------------------------------

    def load(self, server: Server, upstream_pid: int | None, **config: Any) -> LoadResult:
        """One measured run of the load generator, as its own process on the load CPU."""
        load = LoadConfig(
            target=server.target,
            key=self.key,
            server_pid=server.pid,
            upstream_pid=upstream_pid,
            server_cpu=self.pinning.server_cpu,
            load_cpu=self.pinning.load_cpu,
            **config,
        )
        bound = load.warmup_s + load.duration_s + load.timeout_s + 40.0
        process = self._spawn(
            "loadgen",
            [python(), "-m", "bench.loadgen", json.dumps(asdict(load))],
            self.pinning.load_cpu,
        )
        try:
            process.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            raise ProcessFailed(f"load generator still running after {bound:g} s") from None
        finally:
            process.stop()
        if process.proc.returncode != 0:
            raise ProcessFailed(f"load generator failed:\n{process.tail(20)}")
        lines = process.stdout_path.read_text().strip().splitlines()
        if server.process.proc.poll() is not None:
            raise ProcessFailed(f"{server.name} died during the run:\n{server.process.tail()}")
        return LoadResult(**json.loads(lines[-1]))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(process: Managed, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if process.proc.poll() is not None:
            raise ProcessFailed(f"{process.name} exited with {process.proc.returncode}")
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{process.name} not listening on {port} after {timeout:g} s")
        time.sleep(0.05)


@contextlib.contextmanager
def harness(pinning: Pinning, server_env: Mapping[str, str]) -> Iterator[Harness]:
    with Harness(pinning, server_env) as h:
        h.start()
        yield h
