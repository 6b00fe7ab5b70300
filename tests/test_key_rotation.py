"""Key rotation without restart: a running server (a real `aiservices-server` process) reloads its
keys file on SIGHUP and when the file changes; a broken file keeps the keys in use; calls in
flight finish with the key they started with."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiservices import AsyncToolClient, ToolClient, ToolServiceError
from aiservices_server.auth import generate_key, hash_key
from aiservices_server.auth.reload import WATCH_INTERVAL
from tests.standin import Gate, Held, StandinUpstream
from tests.support.processes import ServerProcess, run_to_exit, upstream_settings
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
RELOADED = "API keys reloaded"
NOT_RELOADED = "API keys file not reloaded: the keys in use stay"


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

        # Swap the key in place, same size and modification time: the watcher cannot tell the
        # file changed, so only SIGHUP can bring the new key in.
        before = keys_file.stat()
        keys_file.write_text(keys_file.read_text().replace(hash_key(OLD_KEY), hash_key(NEW_KEY)))
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert keys_file.stat().st_size == before.st_size

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
