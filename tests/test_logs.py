"""Log lines as operators read them: one JSON object per line, pure ASCII, none lost."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from aiservices_server import logs
from aiservices_server.faces.envelope import log_suppressed_unauthenticated


class Output:
    """The stream configure_logging writes to, and its handler: closing the handler writes
    every line queued before."""

    def __init__(self, stream: io.StringIO, handler: logging.Handler) -> None:
        self.stream = stream
        self.handler = handler

    def written(self) -> list[dict[str, object]]:
        self.handler.close()
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def output() -> Iterator[Output]:
    with _configured(io.StringIO()) as output:
        yield output


@contextmanager
def _configured(stream: io.StringIO) -> Iterator[Output]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logs.configure_logging("INFO", stream)
    try:
        yield Output(stream, handler)
    finally:
        handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)


def test_a_line_holds_ts_level_logger_msg_and_the_extra_fields(output: Output) -> None:
    before = time.time()
    logging.getLogger("aiservices.server").info("serving on %s", "loopback", extra={"port": 1})
    after = time.time()
    [line] = output.written()
    assert list(line) == ["ts", "level", "logger", "msg", "port"]
    assert (line["level"], line["logger"], line["msg"], line["port"]) == (
        "INFO",
        "aiservices.server",
        "serving on loopback",
        1,
    )
    # ISO 8601 UTC with milliseconds, truncated, at the time of the call.
    ts = str(line["ts"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
    logged = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    assert int(before * 1000) / 1000 <= logged <= after


def test_lines_are_compact_pure_ascii_json(output: Output) -> None:
    access = logging.getLogger("aiservices.access")
    access.info("rpc", extra={"request_id": "abc", "duration_ms": 1.5, "user_id": "zo\u00eb"})
    output.written()
    text = output.stream.getvalue()
    assert text.isascii()
    assert text == text.strip() + "\n"
    assert '"request_id":"abc","duration_ms":1.5,"user_id":"zo\\u00eb"}' in text


def test_values_json_cannot_hold_still_make_one_valid_line(output: Output) -> None:
    """A log call never raises and never breaks the one-object-per-line shape."""
    access = logging.getLogger("aiservices.access")
    access.info("rpc", extra={"huge": 2**70, "lone_surrogate": "a\udc80b", "when": {1, 2}})
    access.info("rpc", extra={"ratio": float("nan"), "note": "line\u2028break\x85"})
    access.info("rpc", extra={"ratios": [float("inf")], "keyed": {(1, 2): "tuple key"}})
    first, second, third = output.written()
    assert first["huge"] == 2**70
    assert first["lone_surrogate"] == "a\udc80b"
    assert first["when"] == "{1, 2}"
    assert second["ratio"] is None
    assert second["note"] == "line\u2028break\x85"
    assert (third["msg"], third["ratios"]) == ("rpc", "[inf]")
    assert len(output.stream.getvalue().splitlines()) == 3


def test_exception_text_and_stacks_are_never_written(output: Output) -> None:
    log = logging.getLogger("aiservices.server")
    try:
        raise ValueError("prompt text: the secret recipe")
    except ValueError:
        log.exception("call failed", extra={"support_id": "s1"}, stack_info=True)
    [line] = output.written()
    assert line["msg"] == "call failed"
    assert line["support_id"] == "s1"
    text = output.stream.getvalue()
    assert "secret recipe" not in text
    assert "Traceback" not in text and "Stack" not in text


def test_the_access_log_obeys_the_level(output: Output) -> None:
    logging.getLogger().setLevel("WARNING")
    logging.getLogger("aiservices.access").info("rpc", extra={"request_id": "x"})
    logging.getLogger("aiservices.server").warning("kept")
    assert [line["msg"] for line in output.written()] == ["kept"]


class BlockedStream(io.StringIO):
    """A stream whose first write blocks until released, like a full pipe to stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.first_write_done = threading.Event()

    def write(self, text: str) -> int:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=5.0)
            self.first_write_done.set()
        return super().write(text)


@pytest.fixture
def blocked() -> Iterator[tuple[BlockedStream, Output]]:
    stream = BlockedStream()
    try:
        with _configured(stream) as output:
            yield stream, output
    finally:
        stream.release.set()


async def test_a_blocked_stream_does_not_block_logging_on_the_event_loop(
    blocked: tuple[BlockedStream, Output],
) -> None:
    stream, output = blocked
    access = logging.getLogger("aiservices.access")
    access.info("rpc", extra={"request_id": "r0"})
    assert stream.entered.wait(timeout=5.0)
    for index in range(1, 500):
        access.info("rpc", extra={"request_id": f"r{index}"})
        await asyncio.sleep(0)
    assert not stream.first_write_done.is_set(), "a log call waited for the write"
    stream.release.set()
    written = output.written()
    assert [line["request_id"] for line in written] == [f"r{i}" for i in range(500)]


def test_every_line_is_written_when_the_process_exits() -> None:
    script = (
        "import logging; from aiservices_server.logs import configure_logging; "
        "configure_logging('INFO'); log = logging.getLogger('aiservices.access')\n"
        "for i in range(5000): log.info('rpc', extra={'request_id': i})"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ids = [json.loads(line)["request_id"] for line in result.stderr.splitlines()]
    assert ids == list(range(5000))


# --- sampled lines ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_sampler_writes_its_burst_then_its_rate_and_counts_the_rest() -> None:
    clock, summaries = Clock(), list[int]()
    sampler = logs.LineSampler(summaries.append, per_second=10.0, burst=5, clock=clock)
    assert [sampler.admit() for _ in range(8)] == [True] * 5 + [False] * 3
    clock.now += 0.25  # two and a half lines' worth
    assert [sampler.admit() for _ in range(4)] == [True, True, False, False]
    clock.now += 3600.0  # refills to the burst, not beyond
    assert sum(sampler.admit() for _ in range(100)) == 5
    sampler.flush()
    assert summaries == [3 + 2 + 95]
    sampler.flush()
    assert summaries == [100], "a summary is written once, and only when lines were left out"


async def test_a_sampler_summarizes_once_per_interval_on_the_loop() -> None:
    clock, summaries = Clock(), list[int]()
    summarized = asyncio.Event()

    def summarize(count: int) -> None:
        summaries.append(count)
        summarized.set()

    sampler = logs.LineSampler(summarize, burst=1, summary_every=0.05, clock=clock)
    began = asyncio.get_running_loop().time()
    assert [sampler.admit() for _ in range(1000)] == [True] + [False] * 999
    assert summaries == []  # not one summary per line left out
    async with asyncio.timeout(5.0):
        await summarized.wait()
    assert asyncio.get_running_loop().time() - began >= 0.05
    assert summaries == [999]
    # The next line left out opens the next interval.
    summarized.clear()
    assert not sampler.admit()
    async with asyncio.timeout(5.0):
        await summarized.wait()
    assert summaries == [999, 1]


def test_an_unauthenticated_summary_is_one_access_line(output: Output) -> None:
    log_suppressed_unauthenticated(990)
    [line] = output.written()
    assert (line["logger"], line["msg"], line["suppressed"]) == (
        "aiservices.access",
        "suppressed unauthenticated calls",
        990,
    )
