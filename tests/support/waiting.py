"""Small helpers for tests that wait on state without a notification, or need a port nothing
listens on."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import pytest


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


def access_records(
    caplog: pytest.LogCaptureFixture, count: int, **fields: str
) -> list[logging.LogRecord]:
    """The access lines whose attributes match `fields`, once `count` of them have arrived (or
    after 5 s): the server writes each as its call ends, which may be just after the caller got
    its answer, and an MCP exchange holds more requests than its calls (initialize, tools/list)."""

    def matching() -> list[logging.LogRecord]:
        return [
            record
            for record in list(caplog.records)
            if record.name == "aiservices.access"
            and all(getattr(record, name, None) == value for name, value in fields.items())
        ]

    wait_until(lambda: len(matching()) >= count, 5.0)
    return matching()
