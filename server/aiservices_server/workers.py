"""Worker processes: `AGENTA_AI_SERVICES_WORKERS` servers sharing the gRPC and MCP ports, under
one supervisor.

The supervisor binds each port first (SO_REUSEPORT, not listening: port 0 becomes one port all
workers share), then starts every worker as `python -m aiservices_server` with WORKERS=1 and the
link below, and says "serving" once all of them do. The kernel spreads new connections over the
workers. The supervisor serves the metrics of all workers as one Prometheus endpoint
(prometheus-client's multiprocess mode), restarts a worker that exits (after 0.5 s, doubling to
10 s while they keep exiting; after MAX_EXITS exits within EXIT_WINDOW seconds it stops them all
and exits 1), passes SIGHUP on, and on SIGINT, SIGTERM or SIGQUIT has every worker drain within
SHUTDOWN_GRACE (a second signal: at once).

Workers run in sessions of their own, so a terminal's Ctrl-C reaches them once, through the
supervisor; each watches a pipe the supervisor holds open (the lifeline) and drains when it
closes, so no worker outlives a supervisor that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiservices_server.app import DRAINING_SIGNALS, IGNORED_SIGNALS, StartupError
from aiservices_server.config import ENV_PREFIX, Settings, split_host_port

log = logging.getLogger("aiservices.server")

WORKER_ENV = "AISERVICES_WORKER"  # "<number> <ready fd> <lifeline fd>", set by the supervisor
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_EXITS = 5
EXIT_WINDOW = 60.0
FIRST_DELAY, MAX_DELAY = 0.5, 10.0
# Past the grace period, this long for the workers' own closing before they are killed.
STOP_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker gets from its supervisor: its number, the pipe to say it serves, and the
    pipe whose end means the supervisor is gone."""

    number: int
    ready_fd: int
    lifeline_fd: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerLink | None:
        value = environ.get(WORKER_ENV)
        if not value:
            return None
        number, ready, lifeline = (int(part) for part in value.split())
        return cls(number, ready, lifeline)

    def serving(self) -> None:
        """Tell the supervisor this worker serves."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"1")
        os.close(self.ready_fd)

    def on_supervisor_gone(self, drain: Callable[[], None]) -> None:
        """Call `drain` once the supervisor is gone (its lifeline, never written, closes)."""
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(self.lifeline_fd)
            log.warning("the supervisor is gone: draining")
            drain()

        loop.add_reader(self.lifeline_fd, gone)


def _reserve(address: str, setting: str) -> tuple[socket.socket, str]:
    """A socket bound to `address` with SO_REUSEPORT, held (not listening) so that port 0
    becomes one port for every worker; and the address with that port."""
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"invalid setting {ENV_PREFIX}{setting}: cannot listen on {address}: {exc.strerror}"
        ) from None
    bound = sock.getsockname()[1]
    return sock, f"[{host}]:{bound}" if family == socket.AF_INET6 else f"{host}:{bound}"


class Worker:
    """One worker process, started again by `start()` after it exits."""

    def __init__(self, number: int, env: dict[str, str], lifeline_fd: int) -> None:
        self.number = number
        self._env = env
        self._lifeline_fd = lifeline_fd
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> bool:
        """Start it; True once it serves, False when it exited first."""
        ready_read, ready_write = os.pipe()
        link = f"{self.number} {ready_write} {self._lifeline_fd}"
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aiservices_server",
                env={**self._env, WORKER_ENV: link},
                pass_fds=(ready_write, self._lifeline_fd),
                start_new_session=True,
            )
        finally:
            os.close(ready_write)
        said = asyncio.StreamReader()
        pipe = os.fdopen(ready_read, "rb", buffering=0)
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(said), pipe
        )
        try:  # one byte once it serves; the end of the pipe when it exits first
            return await said.read(1) == b"1"
        finally:
            transport.close()

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)


class Supervisor:
    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._exits: deque[float] = deque(maxlen=MAX_EXITS)
        self._stopping = False

    async def run(self) -> int:
        """Serve until a draining signal (0 once every worker exited cleanly), or until the
        workers keep exiting (1), or a worker cannot start (its exit code)."""
        from prometheus_client import CollectorRegistry  # noqa: PLC0415
        from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

        from aiservices_server.metrics import close_listener, serve_registry  # noqa: PLC0415

        settings = self.settings
        held: list[socket.socket] = []
        metrics_dir = tempfile.mkdtemp(prefix="aiservices-metrics-")
        lifeline_read, lifeline_write = os.pipe()
        metrics_server = None
        try:
            env = {k: v for k, v in os.environ.items() if k != f"{ENV_PREFIX}METRICS_ADDRESS"}
            env |= {f"{ENV_PREFIX}WORKERS": "1", MULTIPROC_ENV: metrics_dir}
            if settings.api_keys_file is not None:  # --dev-keys may have made it
                env[f"{ENV_PREFIX}API_KEYS_FILE"] = str(settings.api_keys_file)
            ports: dict[str, int | None] = {"mcp_port": None, "metrics_port": None}
            grpc, env[f"{ENV_PREFIX}GRPC_ADDRESS"] = _reserve(settings.grpc_address, "GRPC_ADDRESS")
            held.append(grpc)
            ports["port"] = grpc.getsockname()[1]
            if settings.mcp_address is not None:
                mcp, env[f"{ENV_PREFIX}MCP_ADDRESS"] = _reserve(settings.mcp_address, "MCP_ADDRESS")
                held.append(mcp)
                ports["mcp_port"] = mcp.getsockname()[1]
            if settings.metrics_address is not None:
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
                host, port = split_host_port(settings.metrics_address)
                try:
                    metrics_server = serve_registry(
                        registry, host, port, serving=lambda: not self._stopping
                    )
                except OSError as exc:
                    raise StartupError(
                        f"invalid setting {ENV_PREFIX}METRICS_ADDRESS: cannot listen on "
                        f"{settings.metrics_address}: {exc.strerror}"
                    ) from None
                ports["metrics_port"] = metrics_server.server_port
            workers = [Worker(n, env, lifeline_read) for n in range(1, self.count + 1)]
            self._handle_signals()
            # The first alone: a setting or file no worker can start with is said once, by it.
            started = [await workers[0].start()]
            if started[0]:
                started += await asyncio.gather(*(worker.start() for worker in workers[1:]))
            if not all(started):
                failed = workers[started.index(False)]
                await self._stop(workers)
                code = failed.process.returncode if failed.process is not None else None
                return code or 1
            pids = [worker.process.pid for worker in workers if worker.process is not None]
            log.info("serving", extra={**ports, "workers": self.count, "pids": pids})
            return await self._supervise(workers, metrics_dir)
        finally:
            os.close(lifeline_write)
            os.close(lifeline_read)
            for sock in held:
                sock.close()
            if metrics_server is not None:
                close_listener(metrics_server)
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (*DRAINING_SIGNALS, signal.SIGHUP):
            loop.add_signal_handler(signum, self._signals.put_nowait, signum)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    async def _supervise(self, workers: list[Worker], metrics_dir: str) -> int:
        from prometheus_client.multiprocess import mark_process_dead  # noqa: PLC0415

        exits: dict[asyncio.Future[Any], Worker] = {
            asyncio.ensure_future(self._exit_of(w)): w for w in workers
        }
        signalled: asyncio.Future[Any] = asyncio.ensure_future(self._signals.get())
        while True:
            done, _ = await asyncio.wait({signalled, *exits}, return_when=asyncio.FIRST_COMPLETED)
            if signalled in done:
                signum = signalled.result()
                if signum != signal.SIGHUP:
                    for task in exits:
                        task.cancel()
                    return await self._drain(workers)
                log.info("reloading the keys file in every worker")
                for worker in workers:
                    worker.signal(signal.SIGHUP)
                signalled = asyncio.ensure_future(self._signals.get())
            for task in (task for task in done if task in exits):
                worker = exits.pop(task)
                pid, code = task.result()
                mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
                now = time.monotonic()
                self._exits.append(now)
                if len(self._exits) == MAX_EXITS and now - self._exits[0] < EXIT_WINDOW:
                    log.error(
                        "workers keep exiting: stopping",
                        extra={"exits": MAX_EXITS, "seconds": EXIT_WINDOW},
                    )
                    signalled.cancel()
                    for other in exits:
                        other.cancel()
                    await self._stop(workers)
                    return 1
                recent = sum(1 for t in self._exits if now - t < EXIT_WINDOW)
                delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (recent - 1))
                log.warning(
                    "worker exited: starting it again",
                    extra={"worker": worker.number, "code": code, "pid": pid, "delay": delay},
                )
                exits[asyncio.ensure_future(self._restart(worker, delay))] = worker

    async def _exit_of(self, worker: Worker) -> tuple[int, int]:
        assert worker.process is not None
        return worker.process.pid, await worker.process.wait()

    async def _restart(self, worker: Worker, delay: float) -> tuple[int, int]:
        """Wait `delay`, start `worker` again, and return when it exits."""
        await asyncio.sleep(delay)
        if await worker.start():
            assert worker.process is not None
            log.info("worker serving", extra={"worker": worker.number, "pid": worker.process.pid})
        return await self._exit_of(worker)

    async def _drain(self, workers: list[Worker]) -> int:
        """Every worker drains (a second signal: at once); 0 when all exited with 0."""
        grace = self.settings.shutdown_grace
        log.info("draining", extra={"grace_seconds": grace, "workers": len(workers)})
        self._stopping = True
        for worker in workers:
            worker.signal(signal.SIGTERM)
        stopping = asyncio.ensure_future(self._stop(workers, signalled=False))
        again = asyncio.ensure_future(self._signals.get())
        await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
        if again.done() and not stopping.done():
            log.warning("second signal: the workers stop at once")
            for worker in workers:
                worker.signal(signal.SIGTERM)
        again.cancel()
        codes = await stopping
        log.info("stopped", extra={"codes": codes})
        return 0 if all(code == 0 for code in codes) else 1

    async def _stop(self, workers: list[Worker], *, signalled: bool = True) -> list[int | None]:
        """SIGTERM each worker (unless `signalled` already), wait for the grace period and the
        margin, then kill what is left; their exit codes."""
        self._stopping = True
        if signalled:
            for worker in workers:
                worker.signal(signal.SIGTERM)
        running = [w.process for w in workers if w.process is not None]
        waits = [asyncio.ensure_future(process.wait()) for process in running]
        if waits:
            await asyncio.wait(waits, timeout=self.settings.shutdown_grace + STOP_MARGIN)
        for process in running:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return [await process.wait() for process in running]
