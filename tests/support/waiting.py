"""Small helpers for tests that wait on state without a notification, or need a port nothing
listens on."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float, *, interval: float = 0.01) -> bool:
    """Bounded polling for state that has no notification (gauges, counters, log records):
    whether `predicate` held within `timeout` seconds, checked every `interval` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
