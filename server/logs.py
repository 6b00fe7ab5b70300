"""One JSON object per log line, so log pipelines need no parsing rules.

The access log writes a line per RPC, so the path is kept cheap: no caller lookup, process or
thread names in records, and lines logged on the event loop go out in batches, one write each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


# For lines orjson cannot write as ASCII: json.dumps with options would
# build a new encoder per call.
_JSON = json.JSONEncoder(default=str, separators=(",", ":"))
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def encode_line(entry: dict[str, Any]) -> str:
    """One compact, pure-ASCII JSON object; what JSON cannot hold is written as its str().

    orjson costs a quarter of the json module, and a line per RPC is on the hot path. It writes
    non-ASCII as is, and U+2028 or U+0085 would split the line for readers that honour them,
    so such lines (and what orjson refuses: lone surrogates, integers past 64 bits) take the
    json module's escaping path instead."""
    try:
        line = orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        return _JSON.encode(entry)
    # Re-encoding orjson's own output keeps its choices (NaN as null) and escapes the rest.
    return line if line.isascii() else _JSON.encode(orjson.loads(line))


class _Second:
    """The last formatted second, as one (second, text) pair so threads never mix two."""

    last: tuple[int, str] = (-1, "")


# ".000Z" to ".999Z": indexing costs a third of formatting the milliseconds on every line.
_MILLISECONDS = tuple(f".{millis:03d}Z" for millis in range(1000))


def timestamp(created: float) -> str:
    """ISO 8601 UTC with milliseconds."""
    second = int(created)
    cached_second, text = _Second.last
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _Second.last = (second, text)
    return text + _MILLISECONDS[int((created - second) * 1000)]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        return encode_line(entry)


# Lines logged on an event loop wait at most this long, or until this many are pending.
FLUSH_AFTER_SECONDS = 0.01
MAX_PENDING_LINES = 256


class LoopBatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines logged on an event loop in batches: one write per FLUSH_AFTER_SECONDS,
    or as soon as MAX_PENDING_LINES are pending.

    A write (a system call) per line, or even per loop iteration, was a tenth of a trivial
    RPC's cost under load. Outside a running loop, lines are written at once. Pending lines are
    written by flush() and close(), which logging runs at exit; only a process killed outright
    can lose them, at most FLUSH_AFTER_SECONDS' worth.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled: asyncio.AbstractEventLoop | None = None
        self._loops: dict[int, asyncio.AbstractEventLoop] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)

    def write_line(self, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_line(line)

    def _write_line(self, line: str) -> None:
        self._pending.append(line)
        loop = self._loop_of_thread()
        if loop is None or len(self._pending) >= MAX_PENDING_LINES:
            self.flush()
        elif self._scheduled is not loop:
            # Per loop: a flush scheduled on a loop that then stopped must not hold lines back.
            self._scheduled = loop
            loop.call_later(FLUSH_AFTER_SECONDS, self.flush)

    def _loop_of_thread(self) -> asyncio.AbstractEventLoop | None:
        """The running loop of this thread, remembered: get_running_loop makes a system call
        on Python 3.11, once per log line."""
        thread = threading.get_ident()
        loop = self._loops.get(thread)
        if loop is not None and loop.is_running():
            return loop
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loops.pop(thread, None)
            return None
        self._loops[thread] = loop
        return loop

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = None
            if self._pending:
                lines, self._pending = self._pending, []
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))


class _Direct:
    """Set by configure_logging: where emit_json writes without building a LogRecord."""

    handler: LoopBatchingHandler | None = None


def emit_json(logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
    """Log `msg` with `fields` at INFO, as JsonFormatter would render it.

    For the per-RPC access log: once configure_logging has run, the line is written straight
    to its handler, skipping LogRecord creation and formatting (the largest cost of a trivial
    RPC); otherwise (tests, embedding) it goes through logging as usual.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _Direct.handler
    if handler is None:
        logger.info(msg, extra=fields)
        return
    entry = {
        "ts": timestamp(time.time()),
        "level": "INFO",
        "logger": logger.name,
        "msg": msg,
        **fields,
    }
    handler.write_line(encode_line(entry))


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


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented switch: skip finding the caller of every log call
    handler = LoopBatchingHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _Direct.handler = handler
    # httpx logs every request at INFO; the access log already has the upstream status.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
