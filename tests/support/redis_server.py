"""A real, throwaway redis-server for tests: 127.0.0.1 only, no persistence, its own temp dir."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """Start with `start()`; `kill()` simulates an outage; `start()` again reuses the same port."""

    def __init__(self, *, password: str | None = None, startup_timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: install it (e.g. `apt-get install redis-server`, "
                "or `make redis`) to run the Redis rate-limit tests"
            )
        self._binary = binary
        self.password = password
        self._startup_timeout = startup_timeout
        self.port = _free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="aiservices-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> redis.Redis:
        """A synchronous client, for checks from tests."""
        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_timeout=2.0)

    def start(self) -> None:
        if self.running:
            raise RuntimeError("redis-server is already running")
        args = [
            self._binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        delay = 0.005
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self._process.returncode} on port {self.port}: "
                    f"{self._failure_details()}"
                )
            client = redis.Redis(
                host=HOST, port=self.port, password=self.password, socket_timeout=0.5
            )
            try:
                if client.ping():
                    return
            except redis.RedisError as exc:
                last_error = exc
            finally:
                client.close()
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self.kill()
        raise RuntimeError(
            f"redis-server on port {self.port} did not answer PING within "
            f"{self._startup_timeout} s ({last_error!r}): {self._failure_details()}"
        )

    def _failure_details(self) -> str:
        parts = []
        if self._process is not None and self._process.stderr is not None:
            try:
                if self._process.poll() is not None:
                    parts.append(self._process.stderr.read().decode(errors="replace"))
            except OSError:
                pass
        log = self._dir / "redis.log"
        if log.exists():
            parts.append("\n".join(log.read_text(errors="replace").splitlines()[-10:]))
        return "\n".join(p.strip() for p in parts if p.strip()) or "(no output)"

    def kill(self) -> None:
        """SIGKILL, like a crash: clients see connections reset and refused."""
        self._end(kill=True)

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after a few seconds)."""
        self._end(kill=False)

    def _end(self, *, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case it was paused
            if kill:
                process.kill()
            else:
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process.stderr is not None:
            process.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections but answers nothing (a hung Redis)."""
        assert self._process is not None, "redis-server is not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        assert self._process is not None, "redis-server is not running"
        self._process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop and remove the temp dir."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
