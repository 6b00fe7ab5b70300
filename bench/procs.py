"""Processes the harness starts: pinned with taskset, logs to files, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPU the servers get and which the load side (generator, upstream, harness) gets."""

    server_cpu: int | None
    load_cpu: int | None
    note: str

    @classmethod
    def detect(cls) -> Pinning:
        if shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
            return cls(None, None, "no pinning: taskset is not installed")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, f"no pinning: only CPU {cpus} available")
        return cls(
            cpus[0],
            cpus[1],
            f"server under test on CPU {cpus[0]} (taskset -c {cpus[0]}); load generator, "
            f"stand-in upstream and harness on CPU {cpus[1]} (taskset -c {cpus[1]})",
        )

    def prefix(self, cpu: int | None) -> list[str]:
        return [] if cpu is None else ["taskset", "-c", str(cpu)]


class ProcessFailed(RuntimeError):
    """A process the harness needs exited or never became ready."""


class Managed:
    """A child process in its own session (Ctrl-C reaches only the harness, which stops it),
    stdout and stderr to files so no pipe ever fills up and blocks it."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        logs: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        self._out: IO[bytes] = open(self.stdout_path, "wb")  # noqa: SIM115
        self._err: IO[bytes] = open(self.stderr_path, "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                list(cmd),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                start_new_session=True,
            )
        except BaseException:
            self._out.close()
            self._err.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 5) -> str:
        text = ""
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_for(self, find: Callable[[str], str | None], timeout: float = 30.0) -> str:
        """Poll the output files until ``find`` returns a value for one of their lines."""
        deadline = time.monotonic() + timeout
        while True:
            for path in (self.stdout_path, self.stderr_path):
                try:
                    with open(path, errors="replace") as f:
                        for line in f:
                            found = find(line)
                            if found is not None:
                                return found
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not ready after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._out.close()
            self._err.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def json_port(line: str) -> str | None:
    """The port of a JSON ``{"msg": "serving", "port": N}`` log line."""
    if '"serving"' not in line:
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if isinstance(entry, dict) and entry.get("msg") == "serving" and entry.get("port"):
        return str(entry["port"])
    return None


_URL = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")


def standin_url(line: str) -> str | None:
    found = _URL.search(line)
    return found.group(1) if found else None


def python() -> str:
    return sys.executable
