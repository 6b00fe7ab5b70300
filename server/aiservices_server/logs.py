"""One JSON object per log line, so log pipelines need no parsing rules.

Lines are formatted where they are logged and handed to a writer thread in batches, one per
event-loop turn, so a slow or blocked stderr does not hold the event loop (until megabytes of
lines wait); logging.shutdown() (which also runs at exit) writes every line logged before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from queue import SimpleQueue
from typing import Any, TextIO

import orjson

# Attributes every LogRecord has: the rest are the `extra` fields of the logging call.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# Pure ASCII (ensure_ascii), so U+2028 or U+0085 cannot split a line for readers that honour
# them; NaN and Infinity are refused, as JSON has no such numbers.
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"), allow_nan=False)
# orjson, about a tenth of the standard encoder's cost, writes the same JSON values as the
# standard one for a line of ASCII text, finite numbers and str()-able objects, which is nearly
# every line (a number may be spelled otherwise: 1e16 for 1e+16); it writes no \u escapes
# (its output is UTF-8), so any other line goes to _ENCODER.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _encode(entry: dict[str, Any]) -> str:
    """`entry` as compact, pure-ASCII JSON; TypeError or ValueError when JSON cannot hold it."""
    try:
        data = orjson.dumps(entry, default=str, option=_ORJSON_OPTIONS)
    except TypeError:  # a key that is no string, an int over 64 bits, a lone surrogate
        return _ENCODER.encode(entry)
    # orjson writes a NaN or an infinity as null: such a line takes the encoder that refuses it.
    if data.isascii() and b"null" not in data:
        return data.decode("ascii")
    return _ENCODER.encode(entry)


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class JsonFormatter(logging.Formatter):
    """`ts` (ISO 8601 UTC with milliseconds, truncated), `level`, `logger`, `msg`, the fields
    given for every line (a worker's number), then the record's extra fields, as one compact,
    pure-ASCII JSON object.

    A value JSON cannot hold is written as its str() (a non-finite number as null), so a log
    call never breaks the one-object-per-line shape. Exception text and stack traces are
    never written: they could carry prompt text or secrets.
    """

    converter = staticmethod(time.gmtime)
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self._fields,
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = _json_value(value)
        try:
            return _encode(entry)
        except (TypeError, ValueError):  # e.g. a NaN inside a list, a key JSON cannot hold
            return _ENCODER.encode({key: str(value) for key, value in entry.items()})


# How long the writer thread, woken by a batch, waits for more before it writes.
GATHER_SECONDS = 0.005


class BatchWriter(logging.Handler):
    """Formats each record where it is logged; a writer thread writes the lines to `stream` in
    batches, in the order they were logged.

    A line logged on a running event loop joins a batch that is handed to the writer thread at
    the end of the loop's turn (one `call_soon` per batch) or once it holds `batch_lines` lines;
    a line logged in a thread with no running loop (worker threads, the metrics server) is
    handed over at once. The writer thread, woken by a batch, waits GATHER_SECONDS for more and
    writes all it has in one write. So the loop pays one queue put per turn rather than one per
    line, and the thread wakes (and takes the GIL from the loop) at most about 200 times a
    second however busy the loop is.

    The loop does not wait for stderr while fewer than `max_pending` characters (lines are
    ASCII, so bytes) wait to be written. Only a stderr that takes nothing for seconds reaches
    that bound (4 MiB is about 3 s of 4,000 access lines a second); past it the thread that
    logs waits for the writer to catch up, so lines are neither dropped nor kept without limit.

    flush() returns once every line logged before it is written; close() (logging.shutdown()
    runs it, also at exit) writes them too and stops the thread. A line logged after close() is
    written at once by the thread that logs it.
    """

    def __init__(
        self, stream: TextIO, *, batch_lines: int = 64, max_pending: int = 4 << 20
    ) -> None:
        super().__init__()
        self.stream = stream
        self.batch_lines = batch_lines
        self.max_pending = max_pending
        # Under self.lock (Handler.handle() holds it around emit()): the batch being filled, the
        # loop whose turn ends it, and whether the writer thread runs.
        self._lines: list[str] = []
        self._turn_end: asyncio.AbstractEventLoop | None = None
        self._open = True
        # Batches for the writer thread, an Event to set once what precedes it is written, or
        # None to stop.
        self._queue: SimpleQueue[str | threading.Event | None] = SimpleQueue()
        # Characters handed over and not yet written, and whether a thread waits for fewer.
        self._written = threading.Condition(threading.Lock())
        self._pending = 0
        self._waiting = False
        self._writer = threading.Thread(target=self._write_batches, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        if len(self._lines) >= self.batch_lines or not self._open:
            self._hand_over()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread, so no turn to wait for
            self._hand_over()
            return
        if self._turn_end is loop:
            return
        if self._turn_end is None:
            try:
                loop.call_soon(self._end_turn)
            except RuntimeError:  # the loop is closing
                self._hand_over()
            else:
                self._turn_end = loop
            return
        # Another loop (in another thread, or one that has stopped) would end the batch: hand
        # it over now rather than wait for that loop's turn.
        self._hand_over()

    def _end_turn(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._hand_over()

    def _hand_over(self) -> None:
        """Hand the batch to the writer thread (write it here once the thread has stopped)."""
        self._turn_end = None
        lines, self._lines = self._lines, []
        if not lines:
            return
        batch = "".join(lines)
        if not self._open:
            self._write(batch)
            return
        with self._written:
            self._pending += len(batch)
            full = self._pending > self.max_pending
        self._queue.put(batch)
        if full:
            with self._written:
                while self._pending > self.max_pending and self._writer.is_alive():
                    self._waiting = True
                    self._written.wait(1.0)

    def _write_batches(self) -> None:
        queue = self._queue
        while True:
            items = [queue.get()]
            if isinstance(items[0], str):
                # Woken from idle by a batch: let batches gather before writing, so the thread
                # wakes, and takes the GIL from the loop, at most once per GATHER_SECONDS.
                time.sleep(GATHER_SECONDS)
            while not queue.empty():
                items.append(queue.get_nowait())
            texts: list[str] = []
            for item in items:
                if isinstance(item, str):
                    texts.append(item)
                    continue
                self._write_handed("".join(texts))
                texts = []
                if item is None:
                    return
                item.set()
            self._write_handed("".join(texts))

    def _write_handed(self, text: str) -> None:
        if not text:
            return
        self._write(text)
        with self._written:
            self._pending -= len(text)
            if self._waiting and self._pending <= self.max_pending:
                self._waiting = False
                self._written.notify_all()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # reported as StreamHandler reports a failed write
            lost = text.count("\n")
            self.handleError(logging.makeLogRecord({"msg": f"{lost} log lines not written"}))

    def flush(self) -> None:
        """Return once every line logged before is written."""
        with self.lock:  # type: ignore[union-attr]
            self._hand_over()
            if self._open:
                written = threading.Event()
                self._queue.put(written)
                written.wait()

    def close(self) -> None:
        """Write every line logged before and stop the writer thread."""
        with self.lock:  # type: ignore[union-attr]
            self._hand_over()
            if self._open:
                self._open = False
                self._queue.put(None)
                self._writer.join()
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


def configure_logging(
    level: str, stream: TextIO | None = None, fields: Mapping[str, Any] | None = None
) -> logging.Handler:
    """Send every record at `level` or above, as JsonFormatter lines (with `fields` in each),
    to `stream` (stderr by default) through a BatchWriter; returns the root logger's handler.

    Closing that handler, or logging.shutdown() (which also runs at exit), writes every line
    logged so far and stops its thread. Called again, it replaces the handler it set before.
    """
    # No line writes the thread or process of a record: logging need not look them up.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchWriter(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(fields))
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, BatchWriter):
            previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the access log already has the upstream status. uvicorn
    # (serving MCP) logs its start and stop at INFO with terminal colours; the server says both.
    for chatty in ("httpx", "uvicorn"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    return handler
