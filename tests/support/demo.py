"""`make demo` as a user runs it: `python -m tests.demo` in its own process, reading what it
prints, and an environment like a user's shell (a home of its own, the Inspector's secrets in
memory, nothing of this test process's settings)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.processes import IMPORT_PATH

LAST_LINE = "Stop with Ctrl-C."
_WHERE = re.compile(r"aiservices demo: gRPC on (\S+)(?:, MCP at (\S+))?")


class RunningDemo:
    """The demo process; its stderr read by a thread, line by line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, cwd: Path, env: dict[str, str]) -> RunningDemo:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.demo"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        return cls(process)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def instructions(self, timeout: float = 30.0) -> list[str]:
        """The lines the demo prints for the user, from its first to `Stop with Ctrl-C.`"""
        deadline = time.monotonic() + timeout
        while LAST_LINE not in self.seen:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                state = "running" if self.process.poll() is None else "exited"
                pytest.fail(f"the demo ({state}) printed no more in {timeout} s:\n" + self._seen())
            if line is None:
                pytest.fail("the demo exited before it was ready:\n" + self._seen())
            self.seen.append(line)
        first = next(i for i, line in enumerate(self.seen) if line.startswith("aiservices demo:"))
        return self.seen[first : self.seen.index(LAST_LINE) + 1]

    def _seen(self) -> str:
        return "\n".join(self.seen)

    def addresses(self) -> tuple[str, str | None]:
        """Where the demo serves: gRPC's host:port, and MCP's host:port when it serves MCP."""
        where = _WHERE.fullmatch(self.instructions()[0])
        assert where is not None, self.seen
        mcp = where[2]
        return where[1], None if mcp is None else mcp.removeprefix("http://").removesuffix("/mcp")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return code


def demo_environment(home: Path, **settings: str) -> dict[str, str]:
    """A clean environment: no AGENTA_AI_SERVICES_* but `settings`, a home of its own (the
    Inspector keeps a catalog there) and its secrets in memory."""
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": IMPORT_PATH,  # `python -m tests.demo` from outside the checkout
        "HOME": str(home),
        "MCP_INSPECTOR_SECRET_STORE": "memory",
    }
    env.update({f"AGENTA_AI_SERVICES_{name.upper()}": value for name, value in settings.items()})
    return env
