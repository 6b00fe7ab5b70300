"""Log lines as operators read them: one JSON object per line, none lost, none delayed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from server import logs
from server.transport.interceptors.request_context import log_suppressed_unauthenticated


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = asyncio.Event()  # set by writes made on the event loop

    def write(self, text: str) -> int:
        self.writes += 1
        self.written.set()
        return super().write(text)


@pytest.fixture
def stream() -> Iterator[CountingStream]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = CountingStream()
    logs.configure_logging("INFO", out)
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)
    logs._Direct.handler = None


def lines(stream: CountingStream) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_lines_outside_an_event_loop_are_written_at_once(stream: CountingStream) -> None:
    logging.getLogger("aiservices.server").info("serving", extra={"port": 50051})
    [line] = lines(stream)
    assert line["msg"] == "serving"
    assert line["port"] == 50051
    assert line["level"] == "INFO"
    assert str(line["ts"]).endswith("Z")


@pytest.mark.parametrize(
    ("created", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1795638000.0429, "2026-11-25T20:20:00.042Z"),
        (1795638000.9999, "2026-11-25T20:20:00.999Z"),
        (1795638001.5, "2026-11-25T20:20:01.500Z"),
    ],
)
def test_timestamps_are_iso_utc_with_milliseconds_truncated(created: float, text: str) -> None:
    assert logs.timestamp(created) == text


async def test_lines_logged_across_loop_iterations_go_out_in_one_write(
    stream: CountingStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough that a slow machine cannot flush early between the iterations below.
    monkeypatch.setattr(logs, "FLUSH_AFTER_SECONDS", 0.3)
    access = logging.getLogger("aiservices.access")
    logged_at = asyncio.get_running_loop().time()
    for index in range(50):
        logs.emit_json(access, "rpc", {"request_id": f"r{index}", "code": "OK"})
        await asyncio.sleep(0)  # other calls run in between, as under load
    logging.getLogger("aiservices.server").warning("mixed in")
    assert stream.getvalue() == ""  # held back for one write
    async with asyncio.timeout(2.0):
        await stream.written.wait()
    waited = asyncio.get_running_loop().time() - logged_at
    written = lines(stream)
    assert stream.writes == 1
    assert 0.25 < waited < 2.0
    assert [line.get("request_id") for line in written[:50]] == [f"r{i}" for i in range(50)]
    assert written[50]["msg"] == "mixed in"
    assert {line["logger"] for line in written[:50]} == {"aiservices.access"}


async def test_a_full_batch_is_written_without_waiting(stream: CountingStream) -> None:
    access = logging.getLogger("aiservices.access")
    for index in range(logs.MAX_PENDING_LINES):
        logs.emit_json(access, "rpc", {"request_id": f"r{index}"})
    assert stream.writes == 1
    assert len(lines(stream)) == logs.MAX_PENDING_LINES


def test_direct_lines_match_the_formatter(stream: CountingStream) -> None:
    access = logging.getLogger("aiservices.access")
    logs.emit_json(access, "rpc", {"request_id": "abc", "duration_ms": 1.5})
    access.info("rpc", extra={"request_id": "abc", "duration_ms": 1.5})
    direct, formatted = lines(stream)
    assert direct.keys() == formatted.keys()
    assert {k: v for k, v in direct.items() if k != "ts"} == {
        k: v for k, v in formatted.items() if k != "ts"
    }


def test_the_access_log_obeys_the_level(stream: CountingStream) -> None:
    logging.getLogger().setLevel("WARNING")
    logs.emit_json(logging.getLogger("aiservices.access"), "rpc", {"request_id": "x"})
    assert stream.getvalue() == ""


def test_a_loop_that_stops_before_flushing_does_not_hold_later_lines(
    stream: CountingStream,
) -> None:
    log = logging.getLogger("aiservices.server")
    loop = asyncio.new_event_loop()
    loop.call_soon(log.info, "inside")  # schedules a flush behind the stop below
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()  # the scheduled flush never runs
    log.info("after")  # no loop now: written at once, with what was pending
    assert [line["msg"] for line in lines(stream)] == ["inside", "after"]


def test_values_json_cannot_hold_still_make_one_valid_line(stream: CountingStream) -> None:
    """A log call never raises and never breaks the one-object-per-line shape."""
    access = logging.getLogger("aiservices.access")
    logs.emit_json(access, "rpc", {"huge": 2**70, "lone_surrogate": "a\udc80b", "when": {1, 2}})
    logs.emit_json(access, "rpc", {"ratio": float("nan"), "note": "line\u2028break\x85"})
    first, second = lines(stream)
    assert first["huge"] == 2**70
    assert first["lone_surrogate"] == "a\udc80b"
    assert first["when"] == "{1, 2}"
    assert second["ratio"] is None
    assert second["note"] == "line\u2028break\x85"
    assert len(stream.getvalue().splitlines()) == 2


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


def test_an_unauthenticated_summary_is_one_access_line(stream: CountingStream) -> None:
    log_suppressed_unauthenticated(990)
    [line] = lines(stream)
    assert (line["logger"], line["msg"], line["suppressed"]) == (
        "aiservices.access",
        "suppressed unauthenticated calls",
        990,
    )
