"""The real server as a separate process (`aiservices-server`), for tests that need several
replicas, signals (SIGTERM drain) or the exact log lines an operator would see.

The child runs in a temp dir (so no `.env` is picked up) with a clean environment: PATH, the
import path of this checkout, and only the `AGENTA_AI_SERVICES_*` settings the test passes.
Its stderr (one JSON object per line) is read on a background thread and kept in full.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiservices_server.config import ENV_PREFIX
from tests.support.servers import APP, ENVIRONMENT, UPSTREAM_KEY

REPO_ROOT = Path(__file__).resolve().parents[2]
# The version both distributions declare (the server's pyproject.toml; the client's must agree).
PROJECT_VERSION: str = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
    "version"
]
# The checkout's packages, as a child process started with a clean environment imports them.
IMPORT_PATH = os.pathsep.join(str(REPO_ROOT / part) for part in ("", "server", "clients"))
HOST = "127.0.0.1"


def upstream_settings(upstream_url: str) -> dict[str, str]:
    """The four settings (names without the prefix) that point a server at the stand-in."""
    return {
        "API_KEY": UPSTREAM_KEY,
        "API_URL": upstream_url,
        "ENVIRONMENT_SLUG": ENVIRONMENT,
        "REFINE_PROMPT_KEY": APP,
    }


def run_printed(command: str, cwd: Path, env: Mapping[str, str]) -> str:
    """A shell command as a person would paste it: its stdout, once it has exited 0."""
    ran = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, (command, ran.stderr)
    return ran.stdout


# This checkout's server, as a child process runs it.
SERVER_COMMAND = (sys.executable, "-m", "aiservices_server")


def with_open_files_limit(soft: int, hard: int, *, command: Sequence[str]) -> tuple[str, ...]:
    """`command`, run with RLIMIT_NOFILE set to (`soft`, `hard`), as a systemd `LimitNOFILE=`
    or a container's ulimit sets it: the process may raise the soft limit up to the hard one."""
    exec_with_limit = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execvp(sys.argv[1], sys.argv[1:])"
    )
    return (sys.executable, "-c", exec_with_limit, *command)


def clean_env(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with PATH, this checkout's import path and `settings` only: nothing the
    test process inherited can change what a child does. Setting names may leave out the
    `AGENTA_AI_SERVICES_` prefix (`{"REDIS_URL": ...}` is `AGENTA_AI_SERVICES_REDIS_URL`)."""
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": IMPORT_PATH,
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in (settings or {}).items():
        name = key if key.upper().startswith(ENV_PREFIX) else ENV_PREFIX + key
        env[name.upper()] = value
    return env


def run_to_exit(
    cwd: Path, settings: Mapping[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """`aiservices-server ARGS` with a clean environment, for a run that is expected to end by
    itself: a refusal to start, or a command."""
    return subprocess.run(
        [*SERVER_COMMAND, *args],
        cwd=cwd,
        env=clean_env(settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def parse_json_line(line: str) -> dict[str, Any] | None:
    """The JSON object on one log line, or None for anything else (tracebacks, plain text)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _is_serving_record(record: dict[str, Any]) -> bool:
    return record.get("msg") == "serving" and "port" in record


def _is_serving(line: str) -> bool:
    record = parse_json_line(line)
    return record is not None and _is_serving_record(record)


class ServerProcess:
    """One `aiservices-server` child process.

    `env` maps setting names to values; names without the `AGENTA_AI_SERVICES_` prefix get it
    (`{"REDIS_URL": ...}` and `{"AGENTA_AI_SERVICES_REDIS_URL": ...}` are the same). The gRPC
    address defaults to `127.0.0.1:0`; the bound port is read from the "serving" log line.

    `start()` = `spawn()` + `wait_until_serving()`; spawn several first and then wait for each
    to start replicas in parallel. Any failure to start kills the child before raising, and so
    do `kill()`, `close()` and leaving the `with` block, so no process outlives a test.

    By default the child is this checkout's server; `command` runs another installation of it
    (an `aiservices-server` script), with nothing of the checkout on its import path.
    `open_files` sets the child's open-file limit (soft, hard). `import_path` puts directories
    before the checkout's on the child's import path (packages installed with `--target`).
    `variables` are set as named, no prefix added (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        name: str = "server",
        command: Sequence[str] | None = None,
        open_files: tuple[int, int] | None = None,
        import_path: Sequence[str | os.PathLike[str]] = (),
        variables: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.startup_timeout = startup_timeout
        self._command = SERVER_COMMAND if command is None else tuple(command)
        if open_files is not None:
            self._command = with_open_files_limit(*open_files, command=self._command)
        self._args = list(args)
        self._env = {**self._child_env(env or {}), **(variables or {})}
        if command is not None:
            del self._env["PYTHONPATH"]
        if import_path:
            first = os.pathsep.join(os.fspath(path) for path in import_path)
            rest = self._env.get("PYTHONPATH")
            self._env["PYTHONPATH"] = first if rest is None else first + os.pathsep + rest
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self.port = 0

    @staticmethod
    def _child_env(overrides: Mapping[str, str]) -> dict[str, str]:
        env = clean_env({"GRPC_ADDRESS": f"{HOST}:0", **overrides})
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def spawn(self) -> Self:
        """Start the child without waiting for it to serve."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._dir = Path(tempfile.mkdtemp(prefix="aiservices-server-"))
        self._process = subprocess.Popen(
            [*self._command, *self._args],
            cwd=self._dir,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C goes to pytest, not to the child
        )
        self._reader = threading.Thread(
            target=self._read_stderr, name=f"{self.name}-stderr", daemon=True
        )
        self._reader.start()
        return self

    def wait_until_serving(self, timeout: float | None = None) -> int:
        """Wait for the "serving" line and return the bound port; kill the child on failure."""
        timeout = self.startup_timeout if timeout is None else timeout
        try:
            if not self.wait_for_line(_is_serving, timeout):
                if self._eof:
                    raise RuntimeError(
                        f"{self.name} exited with {self._wait_exit(5.0)} before serving:\n"
                        f"{self._tail()}"
                    )
                raise RuntimeError(
                    f"{self.name} did not log 'serving' within {timeout:g} s:\n{self._tail()}"
                )
            record = next(r for r in self.records if _is_serving_record(r))
            self.port = int(record["port"])
            if self.port <= 0:
                raise RuntimeError(f"{self.name} logged an unusable port: {record}")
        except BaseException:
            self.kill()
            raise
        return self.port

    def start(self) -> Self:
        self.spawn()
        self.wait_until_serving()
        return self

    def port_of(self, listener: str) -> int:
        """The port its "serving" line gives `listener` (`port`, `mcp_port`, `metrics_port`)."""
        value = next(r for r in self.records if _is_serving_record(r))[listener]
        if not isinstance(value, int):
            raise RuntimeError(f"{self.name} serves no {listener}")
        return value

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), wait up to `timeout` s and return the exit code.

        A child still running after `timeout` is killed and TimeoutError is raised. The stderr
        reader is joined, so `lines` is complete afterwards.
        """
        process = self._require_process()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"{self.name} did not exit within {timeout:g} s of SIGTERM:\n{self._tail()}"
            ) from None
        self._finish()
        return code

    def kill(self) -> None:
        """SIGKILL if still running; wait for it and collect the rest of stderr."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # a SIGKILLed child exits
            process.wait(5.0)
        self._finish()

    def close(self) -> None:
        """Stop the child if it still runs (SIGTERM, SIGKILL after 5 s) and remove its dir."""
        try:
            if self.running:
                with contextlib.suppress(TimeoutError):  # terminate() has killed it
                    self.terminate(5.0)
            else:
                self.kill()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------
    # State

    @property
    def target(self) -> str:
        if not self.port:
            raise RuntimeError(f"{self.name} is not serving yet")
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self._require_process().pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def lines(self) -> list[str]:
        """Every stderr line so far (without the newline); a copy."""
        with self._changed:
            return list(self._lines)

    @property
    def records(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON objects (log records), parsed."""
        return [r for r in map(parse_json_line, self.lines) if r is not None]

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float) -> bool:
        """True as soon as some stderr line (past or future) satisfies `predicate`; False after
        `timeout` seconds or when stderr closes (the child exited) without one."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                while checked < len(self._lines):
                    if predicate(self._lines[checked]):
                        return True
                    checked += 1
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return False
                self._changed.wait(remaining)

    def wait_for_record(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """`wait_for_line` over the JSON log records."""

        def matches(line: str) -> bool:
            record = parse_json_line(line)
            return record is not None and predicate(record)

        return self.wait_for_line(matches, timeout)

    # ---------------------------------------------------------------------------------------
    # Internals

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._process

    def _read_stderr(self) -> None:
        process = self._require_process()
        assert process.stderr is not None
        try:
            for raw in process.stderr:
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def _finish(self) -> None:
        if self._reader is not None:
            self._reader.join(5.0)
        process = self._process
        if process is not None and process.stderr is not None and not self._reader_alive():
            process.stderr.close()

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def _wait_exit(self, timeout: float) -> int | None:
        try:
            return self._require_process().wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _tail(self, count: int = 20) -> str:
        return "\n".join(self.lines[-count:]) or "(no output)"
