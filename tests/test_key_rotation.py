"""Key rotation without restart: a running server (a real `aiservices-server` process) reloads its
keys file on SIGHUP and when the file's content changes, once it holds still; a broken file keeps
the keys in use; calls in flight finish with the key they started with; a storm of signals costs
a reload per change, no more."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiservices import AsyncToolClient, ToolClient, ToolServiceError
from aiservices_server.auth import generate_key, hash_key
from aiservices_server.auth.keys import MAX_KEYS_FILE_BYTES
from aiservices_server.auth.reload import SETTLE, WATCH_INTERVAL
from tests.standin import Gate, Held, StandinUpstream
from tests.support.processes import ServerProcess, run_to_exit, upstream_settings
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
RELOADED = "API keys reloaded"
NOT_RELOADED = "API keys file not reloaded: the keys in use stay"
UNCHANGED = "API keys file unchanged: nothing to reload"


def keys_text(keys: dict[str, str]) -> str:
    """A keys file with one `edit_workflows` entry per (id, clear key)."""
    return "".join(
        f'[[keys]]\nid = "{key_id}"\nhash = "{hash_key(key)}"\npermissions = ["edit_workflows"]\n\n'
        for key_id, key in keys.items()
    )


def replace_file(path: Path, text: str) -> None:
    """Replace the file the way config management does: a new file renamed over the old one."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    temp.chmod(0o600)
    os.replace(temp, path)


def authenticates(target: str, key: str) -> bool:
    """Whether GetStatus with `key` is answered (False on UNAUTHENTICATED, raises otherwise)."""
    with ToolClient(target, api_key=key, timeout=5.0) as client:
        try:
            client.status()
        except ToolServiceError as exc:
            if exc.code is not grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
    return True


def is_msg(msg: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda record: (
        record.get("msg") == msg
        and all(record.get(name) == value for name, value in fields.items())
    )


def start_server(keys_file: Path, upstream: StandinUpstream | None = None) -> ServerProcess:
    env = {"API_KEYS_FILE": str(keys_file), "RATE_LIMIT_BURST": "100000"}
    if upstream is not None:
        env |= upstream_settings(upstream.url)
    return ServerProcess(env, name="rotation").start()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(keys_text({"old": OLD_KEY, "stays": STAYING_KEY}))
    path.chmod(0o600)
    return path


OLD_KEY = generate_key()
NEW_KEY = generate_key()
STAYING_KEY = generate_key()


def test_sighup_reloads_the_keys_file(keys_file: Path) -> None:
    with start_server(keys_file) as server:
        assert authenticates(server.target, OLD_KEY)
        assert not authenticates(server.target, NEW_KEY)

        # SIGHUP loads the file at once; the watcher would wait for it to hold still for SETTLE
        # after its next look, so the reload is the signal's.
        replace_file(keys_file, keys_text({"new": NEW_KEY, "stays": STAYING_KEY}))
        os.kill(server.pid, signal.SIGHUP)
        assert server.wait_for_record(is_msg(RELOADED, trigger="sighup"), 10.0), server.lines
        assert authenticates(server.target, NEW_KEY)
        assert not authenticates(server.target, OLD_KEY)
        assert authenticates(server.target, STAYING_KEY)
        assert server.running


def test_a_changed_file_is_picked_up_without_a_signal(keys_file: Path) -> None:
    with start_server(keys_file) as server:
        replace_file(keys_file, keys_text({"new": NEW_KEY, "stays": STAYING_KEY}))

        assert wait_until(
            lambda: authenticates(server.target, NEW_KEY), 10 * WATCH_INTERVAL, interval=0.05
        )
        assert not authenticates(server.target, OLD_KEY)
        assert authenticates(server.target, STAYING_KEY)

        reloads = [r for r in server.records if r.get("msg") == RELOADED]
        assert [(r["trigger"], r["keys"], r["added"], r["removed"]) for r in reloads] == [
            ("file_changed", 2, 1, 1)
        ]
        log = "\n".join(server.lines)
        for key in (OLD_KEY, NEW_KEY, STAYING_KEY):
            assert key not in log
            assert hash_key(key).removeprefix("sha256:") not in log


def test_a_file_edited_in_place_is_picked_up_too(keys_file: Path) -> None:
    with start_server(keys_file) as server:
        keys_file.write_text(keys_text({"new": NEW_KEY, "stays": STAYING_KEY, "more": OLD_KEY}))
        assert wait_until(
            lambda: authenticates(server.target, NEW_KEY), 10 * WATCH_INTERVAL, interval=0.05
        )


BROKEN = '[[keys]]\nid = "old"\nhash = "not a hash"\npermissions = ["edit_workflows"]\n'


def test_a_broken_file_keeps_the_old_keys_and_logs_one_error_line(
    keys_file: Path, tmp_path: Path
) -> None:
    with start_server(keys_file) as server:
        replace_file(keys_file, BROKEN)
        broken = is_msg(NOT_RELOADED, level="ERROR", trigger="file_changed")
        assert server.wait_for_record(broken, 10 * WATCH_INTERVAL), server.lines
        assert authenticates(server.target, OLD_KEY)
        assert authenticates(server.target, STAYING_KEY)

        # One line per broken version of the file, not one per look at it.
        seen = 0

        def second_error(record: dict[str, Any]) -> bool:
            nonlocal seen
            seen += broken(record)
            return seen > 1

        assert not server.wait_for_record(second_error, 3 * WATCH_INTERVAL)
        errors = [r for r in server.records if r.get("level") == "ERROR"]
        assert len(errors) == 1

        # The reason is the line start-up gives for the same file.
        refused = run_to_exit(
            tmp_path, {"API_KEYS_FILE": str(keys_file), "GRPC_ADDRESS": "127.0.0.1:0"}
        )
        assert refused.returncode == 2
        assert f"aiservices: {errors[0]['reason']}\n" == refused.stderr

        # Fixed, the file loads again.
        replace_file(keys_file, keys_text({"new": NEW_KEY}))
        assert server.wait_for_record(is_msg(RELOADED, keys=1, added=1, removed=2), 10.0)
        assert authenticates(server.target, NEW_KEY)
        assert not authenticates(server.target, OLD_KEY)


async def test_a_call_in_flight_during_a_reload_completes(
    keys_file: Path, upstream: StandinUpstream
) -> None:
    gate = Gate()
    upstream.push(Held(gate))
    server = await asyncio.to_thread(start_server, keys_file, upstream)
    try:
        async with AsyncToolClient(server.target, api_key=OLD_KEY, timeout=30) as client:
            held = asyncio.create_task(client.call_tool(TOOL, ARGUMENTS))
            assert await upstream.until_requests(1, timeout=10)

            replace_file(keys_file, keys_text({"new": NEW_KEY}))
            os.kill(server.pid, signal.SIGHUP)
            reloaded = await asyncio.to_thread(
                server.wait_for_record, lambda r: r.get("msg") == RELOADED, 10.0
            )
            assert reloaded
            assert not held.done(), "the call ended before the reload: nothing was tested"

            gate.open()
            result = await held
            assert not result.is_error
            assert result.structured_content

            with pytest.raises(ToolServiceError) as refused:
                await client.call_tool(TOOL, ARGUMENTS)
            assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    finally:
        await asyncio.to_thread(server.close)


def test_sighup_without_authentication_leaves_the_server_serving() -> None:
    with ServerProcess({"AUTH": "disabled"}, name="no-auth").start() as server:
        os.kill(server.pid, signal.SIGHUP)
        nothing = is_msg("nothing to reload: authentication is disabled")
        assert server.wait_for_record(nothing, 10.0), server.lines
        assert server.running
        assert authenticates(server.target, "any")


def test_sighup_with_the_file_unchanged_reloads_nothing(keys_file: Path) -> None:
    """The file holds the keys in use: SIGHUP reads it, says so in one line, and installs
    nothing."""
    with start_server(keys_file) as server:
        os.kill(server.pid, signal.SIGHUP)
        unchanged = is_msg(UNCHANGED, trigger="sighup", keys=2)
        assert server.wait_for_record(unchanged, 10.0), server.lines
        assert not [r for r in server.records if r.get("msg") in (RELOADED, NOT_RELOADED)]
        assert authenticates(server.target, OLD_KEY)


def test_an_edit_in_place_that_keeps_size_and_mtime_is_noticed(keys_file: Path) -> None:
    """The watcher compares content, not timestamps: revoking a key by an edit that keeps the
    file's size and restores its modification time still takes effect, without a signal."""
    with start_server(keys_file) as server:
        assert authenticates(server.target, OLD_KEY)
        before = keys_file.stat()
        keys_file.write_text(keys_file.read_text().replace(hash_key(OLD_KEY), hash_key(NEW_KEY)))
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = keys_file.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )

        assert wait_until(
            lambda: not authenticates(server.target, OLD_KEY), 10 * WATCH_INTERVAL, interval=0.05
        ), server.lines
        assert authenticates(server.target, NEW_KEY)
        assert authenticates(server.target, STAYING_KEY)
        reloads = [r for r in server.records if r.get("msg") == RELOADED]
        # The same id with another hash: no id came or went.
        assert [(r["trigger"], r["keys"], r["added"], r["removed"]) for r in reloads] == [
            ("file_changed", 2, 0, 0)
        ]


def test_a_file_written_in_pieces_is_loaded_only_once_finished(keys_file: Path) -> None:
    """A writer that rewrites the file in place, one entry at a time a few tens of ms apart,
    for longer than the watcher's interval: a look lands on a half-written file (valid TOML,
    fewer keys), which the watcher must not install; the last key of the file keeps working
    all along, and the finished file is installed once."""
    keys = {f"k{i:02d}": generate_key() for i in range(30)}
    last = keys["k29"]
    keys_file.write_text(keys_text(keys))
    with start_server(keys_file) as server:
        entries = [keys_text({key_id: key}) for key_id, key in {**keys, "added": NEW_KEY}.items()]
        pause = 0.04  # the writer's pace: well under SETTLE, and all of it over WATCH_INTERVAL
        assert pause < SETTLE
        assert pause * len(entries) > WATCH_INTERVAL
        refused = 0
        with (
            ToolClient(server.target, api_key=last, timeout=5.0) as client,
            keys_file.open("w") as writer,
        ):
            for entry in entries:
                writer.write(entry)
                writer.flush()
                try:
                    client.status()
                except ToolServiceError as exc:
                    if exc.code is not grpc.StatusCode.UNAUTHENTICATED:
                        raise
                    refused += 1
                time.sleep(pause)  # the slow writer itself, not a wait for the server

        finished = is_msg(RELOADED, keys=31)
        assert server.wait_for_record(finished, 10 * WATCH_INTERVAL), server.lines
        assert refused == 0
        reloads = [r for r in server.records if r.get("msg") in (RELOADED, NOT_RELOADED)]
        assert [(r["msg"], r["trigger"], r.get("keys")) for r in reloads] == [
            (RELOADED, "file_changed", 31)
        ]
        assert authenticates(server.target, NEW_KEY)
        assert authenticates(server.target, last)


FILLERS = 6700
"""Entries that make a keys file of about 980 KiB, just under the loader's 1 MiB bound: a
quarter of a second of parsing per reload."""


def big_keys_text(keys: dict[str, str]) -> str:
    """`keys_text(keys)` after FILLERS entries whose keys nobody holds."""
    filler = "".join(
        f'[[keys]]\nid = "filler-{i:05d}"\nhash = "{hash_key(f"filler-{i}")}"\n'
        'permissions = ["edit_workflows"]\n\n'
        for i in range(FILLERS)
    )
    return filler + keys_text(keys)


def reloads(server: ServerProcess) -> list[tuple[str, str, int | None]]:
    """Every reload line so far, as (msg, trigger, keys)."""
    return [
        (r["msg"], r["trigger"], r.get("keys"))
        for r in server.records
        if r.get("msg") in (RELOADED, NOT_RELOADED)
    ]


class StatusProbe:
    """Calls GetStatus every 10 ms on a thread of its own while in its `with` block, keeping how
    long each answer took (a call that fails raises when the block ends)."""

    def __init__(self, target: str, key: str) -> None:
        self.latencies: list[float] = []
        self._client = ToolClient(target, api_key=key, timeout=5.0)
        self._done = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="status-probe")

    def _run(self) -> None:
        try:
            while not self._done.wait(0.01):
                started = time.monotonic()
                self._client.status()
                self.latencies.append(time.monotonic() - started)
        except BaseException as exc:
            self._failure = exc

    def __enter__(self) -> StatusProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(10.0)
        self._client.close()
        if self._failure is not None:
            raise self._failure


def test_a_storm_of_sighups_runs_at_most_two_reloads(tmp_path: Path) -> None:
    """A key added to a big keys file, then hundreds of SIGHUPs (a few ms apart, so each reaches
    the server rather than merging with the one before), then one more key and a last SIGHUP:
    two reloads, one per change, and none left queued. The server keeps answering meanwhile."""
    stays, added, last = (generate_key() for _ in range(3))
    versions = {
        "first": big_keys_text({"stays": stays}),
        "second": big_keys_text({"stays": stays, "added": added}),
        "last": big_keys_text({"stays": stays, "added": added, "last": last}),
    }
    for text in versions.values():
        assert len(text.encode()) < MAX_KEYS_FILE_BYTES
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(versions["first"])
    keys_file.chmod(0o600)

    with start_server(keys_file) as server, StatusProbe(server.target, stays) as probe:
        replace_file(keys_file, versions["second"])
        for _ in range(300):
            os.kill(server.pid, signal.SIGHUP)
            time.sleep(0.002)  # the sender's pace, like a script in a loop
        replace_file(keys_file, versions["last"])
        os.kill(server.pid, signal.SIGHUP)

        assert server.wait_for_record(is_msg(RELOADED, keys=FILLERS + 3), 10.0), reloads(server)
        assert authenticates(server.target, last)
        during = reloads(server)

        # Two more changes, each with a SIGHUP, are the very next two reloads: nothing of the
        # storm was left queued to run after them, or between them.
        for keys in ({"stays": stays}, {"stays": stays, "last": last}):
            replace_file(keys_file, keys_text(keys))
            os.kill(server.pid, signal.SIGHUP)
            assert server.wait_for_record(is_msg(RELOADED, keys=len(keys)), 5.0), reloads(server)

    assert during == [
        (RELOADED, "sighup", FILLERS + 2),
        (RELOADED, "sighup", FILLERS + 3),
    ]
    assert [line[2] for line in reloads(server)[len(during) :]] == [1, 2], reloads(server)
    assert probe.latencies, "the probe made no call"
    assert max(probe.latencies) < 1.0, sorted(probe.latencies)[-5:]
