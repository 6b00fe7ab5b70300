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
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiservices import AsyncToolClient
from aiservices_server import logs
from aiservices_server.faces.envelope import log_suppressed_unauthenticated
from tests.support.processes import ServerProcess


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
    await asyncio.sleep(0)  # the end of the turn hands the line to the writer
    assert await asyncio.to_thread(stream.entered.wait, 5.0)
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


class CountingStream(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def counted() -> Iterator[tuple[CountingStream, Output]]:
    stream = CountingStream()
    with _configured(stream) as output:
        yield stream, output


def ids(text: str) -> list[object]:
    return [json.loads(line)["request_id"] for line in text.splitlines()]


def wait_for_lines(stream: io.StringIO, count: int, timeout: float = 5.0) -> list[object]:
    """The request ids written once `count` lines are (polling, as a reader of stderr would)."""
    deadline = time.monotonic() + timeout
    while len(stream.getvalue().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    return ids(stream.getvalue())


def test_lines_from_a_thread_without_a_loop_are_written_complete_and_in_order(
    counted: tuple[CountingStream, Output],
) -> None:
    stream, _ = counted
    access = logging.getLogger("aiservices.access")
    for index in range(1000):
        access.info("rpc", extra={"request_id": index, "note": "x" * (index % 97)})
    # Written without a flush: no loop's turn to wait for.
    assert wait_for_lines(stream, 1000) == list(range(1000))
    assert stream.getvalue().endswith("\n")


async def test_lines_logged_on_the_loop_are_written_at_the_end_of_its_turn_in_one_write(
    counted: tuple[CountingStream, Output],
) -> None:
    stream, output = counted
    access = logging.getLogger("aiservices.access")
    for index in range(10):
        access.info("rpc", extra={"request_id": index})
    time.sleep(0.05)  # noqa: ASYNC251 - the turn goes on, so nothing is handed over yet
    assert stream.getvalue() == ""
    await asyncio.sleep(0)
    assert await asyncio.to_thread(wait_for_lines, stream, 10) == list(range(10))
    assert stream.writes == 1
    assert [line["request_id"] for line in output.written()] == list(range(10))


async def test_a_burst_on_the_loop_is_written_whole_in_few_writes(
    counted: tuple[CountingStream, Output], monkeypatch: pytest.MonkeyPatch
) -> None:
    """5,000 lines in one turn go over in batches of 64, then 200 turns of 3 lines in one
    batch each, and the writer thread writes what gathered while it waited (0.2 s here, so
    the count does not depend on how busy the machine is)."""
    monkeypatch.setattr(logs, "GATHER_SECONDS", 0.2)
    stream, output = counted
    access = logging.getLogger("aiservices.access")
    for index in range(5000):
        access.info("rpc", extra={"request_id": index})
    for turn in range(200):
        for index in range(3):
            access.info("rpc", extra={"request_id": 5000 + 3 * turn + index})
        await asyncio.sleep(0)
    assert [line["request_id"] for line in output.written()] == list(range(5600))
    assert stream.writes <= 10


async def test_a_line_from_another_thread_is_written_after_the_loop_lines_before_it(
    counted: tuple[CountingStream, Output],
) -> None:
    """Lines keep the order they were logged in, whichever thread logged them; a line from
    a thread without a loop (or on another loop) takes the loop's pending batch with it."""
    stream, _ = counted
    access = logging.getLogger("aiservices.access")
    access.info("rpc", extra={"request_id": "loop-1"})

    def in_a_thread() -> None:
        access.info("rpc", extra={"request_id": "thread-1"})

    async def on_another_loop() -> None:
        access.info("rpc", extra={"request_id": "other-loop-1"})

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    access.info("rpc", extra={"request_id": "loop-2"})
    other = threading.Thread(target=asyncio.run, args=(on_another_loop(),))
    other.start()
    other.join()
    # Written while this loop's turn still runs.
    expected = ["loop-1", "thread-1", "loop-2", "other-loop-1"]
    assert wait_for_lines(stream, 4) == expected


async def test_closing_writes_the_lines_of_the_current_turn_and_later_lines_at_once(
    counted: tuple[CountingStream, Output],
) -> None:
    stream, output = counted
    access = logging.getLogger("aiservices.access")
    for index in range(100):
        access.info("rpc", extra={"request_id": index})
    output.handler.close()  # as logging.shutdown() does, before the turn ends
    assert ids(stream.getvalue()) == list(range(100))
    access.info("rpc", extra={"request_id": "after close"})
    assert ids(stream.getvalue())[-1] == "after close"


async def test_flush_returns_once_every_line_is_written(
    counted: tuple[CountingStream, Output],
) -> None:
    stream, output = counted
    access = logging.getLogger("aiservices.access")
    for index in range(300):
        access.info("rpc", extra={"request_id": index})
        if index % 7 == 0:
            await asyncio.sleep(0)
    output.handler.flush()
    assert ids(stream.getvalue()) == list(range(300))


def test_past_the_bound_a_log_call_waits_for_the_writer_and_drops_nothing() -> None:
    stream = BlockedStream()
    handler = logs.BatchWriter(stream, max_pending=2000)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("tests.bounded")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel("INFO")
    try:
        log.info("rpc", extra={"request_id": 0})
        assert stream.entered.wait(timeout=5.0)

        def log_more() -> None:
            for index in range(1, 100):
                log.info("rpc", extra={"request_id": index})

        logger_thread = threading.Thread(target=log_more)
        logger_thread.start()
        logger_thread.join(0.5)
        assert logger_thread.is_alive(), "2,000 characters waiting and the log calls went on"
        stream.release.set()
        logger_thread.join(5.0)
        handler.close()
        assert ids(stream.getvalue()) == list(range(100))
    finally:
        stream.release.set()
        log.removeHandler(handler)
        handler.close()


def test_lines_of_the_last_turn_are_written_by_logging_shutdown() -> None:
    """The loop stops in the turn that logged the last lines, so that turn never ends: the
    entry point's logging.shutdown() writes them."""
    script = """
import asyncio, logging
from aiservices_server.logs import configure_logging
configure_logging("INFO")
log = logging.getLogger("aiservices.access")

async def main():
    for i in range(3000):
        log.info("rpc", extra={"request_id": i})
        if i % 7 == 0:
            await asyncio.sleep(0)
    asyncio.get_running_loop().stop()
    log.info("rpc", extra={"request_id": 3000})

loop = asyncio.new_event_loop()
task = loop.create_task(main())
try:
    loop.run_forever()
finally:
    logging.shutdown()
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ids(result.stderr) == list(range(3001))


async def test_a_server_stopped_by_sigterm_right_after_a_burst_logs_every_call() -> None:
    calls = 300
    with ServerProcess({"AUTH": "disabled"}, name="log-burst") as process:
        async with AsyncToolClient(process.target, api_key="unused", timeout=30) as client:
            await asyncio.gather(*(client.status() for _ in range(calls)))
        assert await asyncio.to_thread(process.terminate) == 0
    access = [
        r
        for r in process.records
        if r.get("logger") == "aiservices.access" and r.get("msg") == "rpc"
    ]
    assert sum(r.get("transport") == "grpc" for r in access) == calls, process.lines[-5:]
    assert process.records[-1].get("msg") == "stopped"


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


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), _JSON_VALUES, max_size=6))
def test_any_entry_is_one_line_of_pure_ascii_json_with_the_values_the_standard_encoder_writes(
    entry: dict[str, Any],
) -> None:
    try:
        standard = json.loads(logs._ENCODER.encode(entry))
    except (TypeError, ValueError):  # what the formatter then writes as str() values
        with pytest.raises((TypeError, ValueError)):
            logs._encode(entry)
        return
    line = logs._encode(entry)
    assert line.isascii() and "\n" not in line
    assert json.loads(line) == standard
