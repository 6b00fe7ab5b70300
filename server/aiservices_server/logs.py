"""One JSON object per log line, so log pipelines need no parsing rules.

Records go through a queue to a writer thread, so a write to a slow or blocked stderr never
holds the event loop; logging.shutdown() (which also runs at exit) writes every queued line.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener
from queue import SimpleQueue
from typing import Any, TextIO

# Attributes every LogRecord has: the rest are the `extra` fields of the logging call.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# Pure ASCII (ensure_ascii), so U+2028 or U+0085 cannot split a line for readers that honour
# them; NaN and Infinity are refused, as JSON has no such numbers.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), allow_nan=False)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JsonFormatter(logging.Formatter):
    """`ts` (ISO 8601 UTC with milliseconds, truncated), `level`, `logger`, `msg`, then the
    record's extra fields, as one compact, pure-ASCII JSON object.

    A value JSON cannot hold is written as its str() (a non-finite number as null), so a log
    call never breaks the one-object-per-line shape. Exception text and stack traces are
    never written: they could carry prompt text or secrets.
    """

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = _json_value(value)
        try:
            return _ENCODER.encode(entry)
        except (TypeError, ValueError):  # e.g. a NaN inside a list, a key JSON cannot hold
            return _ENCODER.encode({key: str(value) for key, value in entry.items()})


class _QueueToWriter(QueueHandler):
    """Queues records for a writer thread that hands them to `handler`.

    Closing it (logging.shutdown() does, at exit) stops the thread once every record queued
    before is written.
    """

    def __init__(self, handler: logging.Handler) -> None:
        queue: SimpleQueue[logging.LogRecord | None] = SimpleQueue()
        super().__init__(queue)
        self._listener = QueueListener(queue, handler)
        self._listener.start()
        self._writing = True

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """A copy with the message merged with its arguments, and without exception or stack
        information, which are never written (the base class would format them into `msg`)."""
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return record

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._writing:
                self._writing = False
                self._listener.stop()
        super().close()


class LineSampler:
    """Decides which lines of a kind to write: a token bucket of `burst` lines refilled at
    `per_second`, so a flood costs a few lines a second however fast it comes.

    Lines left out are counted, and their number is handed to `summarize` once, at most
    `summary_every` seconds after the first of them (a timer on the running event loop), and by
    `flush()`, which the server runs when it stops. So a flood costs at most one summary line
    per `summary_every`. `clock` is injectable so tests need not wait for the bucket.
    """

    def __init__(
        self,
        summarize: Callable[[int], None],
        *,
        per_second: float = 10.0,
        burst: int = 10,
        summary_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._summarize = summarize
        self._per_second = per_second
        self._burst = burst
        self._summary_every = summary_every
        self._clock = clock
        self._tokens = float(burst)
        self._refilled = clock()
        self._timer: asyncio.TimerHandle | None = None
        self.suppressed = 0

    def admit(self) -> bool:
        """Whether to write this line; if not, it is counted for the next summary."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._per_second)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.suppressed += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return False  # no loop to wait on: flush() reports them
            self._timer = loop.call_later(self._summary_every, self.flush)
        return False

    def flush(self) -> None:
        """Hand the count of lines left out since the last summary to `summarize`, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        count, self.suppressed = self.suppressed, 0
        if count:
            self._summarize(count)


def configure_logging(level: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every record at `level` or above, as JsonFormatter lines, to `stream` (stderr by
    default) through a writer thread; returns the root logger's handler.

    Closing that handler, or logging.shutdown() (which also runs at exit), writes every line
    queued so far and stops the thread. Called again, it replaces the handler it set before.
    """
    # No line writes the caller, thread or process of a record: logging need not look them up.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    writer = logging.StreamHandler(sys.stderr if stream is None else stream)
    writer.setFormatter(JsonFormatter())
    handler = _QueueToWriter(writer)
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, _QueueToWriter):
            previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the access log already has the upstream status. uvicorn
    # (serving MCP) logs its start and stop at INFO with terminal colours; the server says both.
    for chatty in ("httpx", "uvicorn"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    return handler
