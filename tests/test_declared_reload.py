"""The tools file reloads while the server runs (a real `aiservices-server` process against the
stand-in's OpenAI-compatible endpoint): on SIGHUP and when the file changes, tools come and go
for gRPC and MCP callers alike; a file that does not load keeps the tools in use and logs one
line; calls in flight keep their tool; reloads under load fail no call."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiservices import ToolClient, ToolServiceError
from tests.standin import Gate, Held, StandinUpstream
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_client
from tests.support.processes import ServerProcess
from tests.support.waiting import wait_until

REFINE = "tools.agenta.api.refine_prompt"
SUMMARIZE = "tools.acme.text.summarize"
KEYWORDS = "tools.acme.text.keywords"
RELOADED = "tools file reloaded"
NOT_RELOADED = "tools file not reloaded: the tools in use stay"


def declared(name: str, *, title: str = "", permission: str | None = None) -> str:
    """One `[[tools]]` table: `summarize` answers a string, anything else a list of strings."""
    output = (
        {"type": "object", "required": ["summary"], "properties": {"summary": {"type": "string"}}}
        if name == SUMMARIZE
        else {
            "type": "object",
            "required": ["keywords"],
            "properties": {"keywords": {"type": "array", "items": {"type": "string"}}},
        }
    )
    lines = [
        "[[tools]]",
        f'name = "{name}"',
        f"title = {json.dumps(title or 'Tool ' + name)}",
        'description = "A declared tool."',
        "input_schema = "
        + json.dumps(
            json.dumps(
                {
                    "type": "object",
                    "required": ["text"],
                    "additionalProperties": False,
                    "properties": {"text": {"type": "string", "maxLength": 1000}},
                }
            )
        ),
        f"output_schema = {json.dumps(json.dumps(output))}",
        'messages = [{role = "system", content = "Work on the text."}, '
        '{role = "user", content = "{{text}}"}]',
    ]
    if permission is not None:
        lines.append(f'permission = "{permission}"')
    return "\n".join(lines) + "\n\n"


def replace_file(path: Path, text: str) -> None:
    """A new file renamed over the old one, as config management does."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(text)
    temp.chmod(0o644)
    os.replace(temp, path)


def count(server: ServerProcess, msg: str) -> int:
    return sum(1 for record in server.records if record.get("msg") == msg)


def reloads(server: ServerProcess, at_least: int) -> bool:
    return wait_until(lambda: count(server, RELOADED) >= at_least, timeout=15.0)


def names(target: str, key: str) -> set[str]:
    with ToolClient(target, api_key=key, timeout=10.0) as client:
        return {tool.name for tool in client.list_tools()}


def call(target: str, key: str, name: str, text: str = "Some text.") -> Any:
    with ToolClient(target, api_key=key, timeout=10.0) as client:
        return client.call_tool(name, {"text": text})


async def mcp_names_and_call(url: str, key: str, name: str) -> tuple[set[str], Any]:
    async with mcp_client(url, key, timeout=10.0) as client:
        listed = await client.list_tools()
        result = await client.call_tool(name, {"text": "Some text."})
    return {tool.name for tool in listed.tools}, result


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.toml"
    replace_file(path, declared(SUMMARIZE))
    return path


@pytest.fixture
def server(upstream: StandinUpstream, tools_file: Path, keys: TestKeys) -> Iterator[ServerProcess]:
    env = {
        "API_KEYS_FILE": str(keys.path),
        "TOOLS_FILE": str(tools_file),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": upstream.openai_url,
        "OPENAI_MODEL": "standin-model",
        "RATE_LIMIT_BURST": "100000",
        "MCP_ADDRESS": "127.0.0.1:0",
    }
    with ServerProcess(env, name="tools-reload").start() as process:
        yield process


def test_sighup_adds_a_tool_and_a_change_of_the_file_removes_one(
    server: ServerProcess, tools_file: Path, keys: TestKeys
) -> None:
    target, key = server.target, keys.full
    mcp_url = f"http://127.0.0.1:{server.port_of('mcp_port')}/mcp"
    assert names(target, key) == {REFINE, SUMMARIZE}

    replace_file(tools_file, declared(SUMMARIZE) + declared(KEYWORDS))
    os.kill(server.pid, signal.SIGHUP)
    assert reloads(server, 1), server.lines[-5:]
    record = next(r for r in server.records if r.get("msg") == RELOADED)
    assert (record["trigger"], record["tools"], record["added"], record["removed"]) == (
        "sighup",
        2,
        1,
        0,
    )
    assert names(target, key) == {REFINE, SUMMARIZE, KEYWORDS}
    result = call(target, key, KEYWORDS)
    assert not result.is_error, result.text
    assert all(isinstance(word, str) for word in result.structured_content["keywords"])
    listed, mcp_result = asyncio.run(mcp_names_and_call(mcp_url, key, KEYWORDS))
    assert listed == {REFINE, SUMMARIZE, KEYWORDS}
    assert not mcp_result.is_error
    assert isinstance(mcp_result.structured_content["keywords"], list)

    # No signal: the watcher sees the file change and loads it once it holds still.
    replace_file(tools_file, declared(KEYWORDS))
    assert reloads(server, 2), server.lines[-5:]
    assert names(target, key) == {REFINE, KEYWORDS}
    with pytest.raises(ToolServiceError) as refused:
        call(target, key, SUMMARIZE)
    assert refused.value.code is grpc.StatusCode.NOT_FOUND
    listed, mcp_result = asyncio.run(mcp_names_and_call(mcp_url, key, KEYWORDS))
    assert listed == {REFINE, KEYWORDS}


def test_a_file_that_does_not_load_keeps_the_tools_and_logs_one_line(
    server: ServerProcess, tools_file: Path, keys: TestKeys
) -> None:
    target, key = server.target, keys.full
    broken = declared(SUMMARIZE) + declared(KEYWORDS).replace(
        'description = "A declared tool."', 'description = "A declared tool."\ntemperature = 3'
    )
    replace_file(tools_file, broken)
    os.kill(server.pid, signal.SIGHUP)
    assert wait_until(lambda: count(server, NOT_RELOADED) >= 1, timeout=15.0)
    (record,) = [r for r in server.records if r.get("msg") == NOT_RELOADED]
    assert record["level"] == "ERROR"
    assert record["reason"] == (
        f"tools file {tools_file}: tool {KEYWORDS}: temperature: must be a number from 0 to 2"
    )
    assert names(target, key) == {REFINE, SUMMARIZE}
    assert not call(target, key, SUMMARIZE).is_error

    # The same broken file signalled again is not logged again; the next good one loads.
    os.kill(server.pid, signal.SIGHUP)
    replace_file(tools_file, declared(SUMMARIZE) + declared(KEYWORDS))
    os.kill(server.pid, signal.SIGHUP)
    assert reloads(server, 1), server.lines[-5:]
    assert count(server, NOT_RELOADED) == 1
    assert names(target, key) == {REFINE, SUMMARIZE, KEYWORDS}


def test_a_reload_changes_who_sees_a_tool(
    server: ServerProcess, tools_file: Path, keys: TestKeys
) -> None:
    """A permission that hides a tool, taken back by a reload."""
    target = server.target
    replace_file(tools_file, declared(SUMMARIZE, permission="support"))
    os.kill(server.pid, signal.SIGHUP)
    assert reloads(server, 1)
    assert names(target, keys.editor) == {REFINE}
    assert names(target, keys.full) == {REFINE, SUMMARIZE}
    with pytest.raises(ToolServiceError) as refused:
        call(target, keys.editor, SUMMARIZE)
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED

    replace_file(tools_file, declared(SUMMARIZE, permission="edit_workflows"))
    os.kill(server.pid, signal.SIGHUP)
    assert reloads(server, 2)
    assert names(target, keys.editor) == {REFINE, SUMMARIZE}
    assert not call(target, keys.editor, SUMMARIZE).is_error


def test_a_call_in_flight_keeps_the_tool_a_reload_removes(
    server: ServerProcess, upstream: StandinUpstream, tools_file: Path, keys: TestKeys
) -> None:
    target, key = server.target, keys.full
    replace_file(tools_file, declared(SUMMARIZE) + declared(KEYWORDS))
    os.kill(server.pid, signal.SIGHUP)
    assert reloads(server, 1)
    upstream.clear()
    gate = Gate()
    upstream.push(Held(gate))
    results: list[Any] = []
    caller = threading.Thread(target=lambda: results.append(call(target, key, KEYWORDS)))
    caller.start()
    try:
        assert upstream.wait_for_requests(1, timeout=10.0)
        replace_file(tools_file, declared(SUMMARIZE))
        os.kill(server.pid, signal.SIGHUP)
        assert reloads(server, 2)
        assert names(target, key) == {REFINE, SUMMARIZE}
    finally:
        gate.open()
        caller.join(timeout=15.0)
    (result,) = results
    assert not result.is_error, result.text
    assert isinstance(result.structured_content["keywords"], list)


def test_reloads_under_load_fail_no_call(
    server: ServerProcess, tools_file: Path, keys: TestKeys
) -> None:
    """Callers keep calling a tool every version declares (with another title each time) while
    the file swaps a second tool in and out: every call succeeds."""
    target, key = server.target, keys.full
    stop = threading.Event()
    outcomes: list[str] = []
    lock = threading.Lock()

    def keep_calling() -> None:
        with ToolClient(target, api_key=key, timeout=10.0) as client:
            while not stop.is_set():
                try:
                    result = client.call_tool(SUMMARIZE, {"text": "Some text."})
                    outcome = "error: " + result.text if result.is_error else "ok"
                except ToolServiceError as exc:
                    outcome = f"refused: {exc.code.name}"
                with lock:
                    outcomes.append(outcome)

    def calls_made(more: int) -> bool:
        with lock:
            wanted = len(outcomes) + more
        return wait_until(lambda: len(outcomes) >= wanted, timeout=15.0)

    callers = [threading.Thread(target=keep_calling) for _ in range(4)]
    for thread in callers:
        thread.start()
    try:
        for version in range(1, 7):
            text = declared(SUMMARIZE, title=f"Summarize, version {version}")
            if version % 2:
                text += declared(KEYWORDS)
            replace_file(tools_file, text)
            os.kill(server.pid, signal.SIGHUP)
            assert reloads(server, version), server.lines[-5:]
            # Calls run against each version before the next one.
            assert calls_made(4), outcomes[-5:]
    finally:
        stop.set()
        for thread in callers:
            thread.join(timeout=15.0)
    assert outcomes and set(outcomes) == {"ok"}, sorted(set(outcomes))
    with ToolClient(target, api_key=key, timeout=10.0) as client:
        titles = {tool.name: tool.title for tool in client.list_tools()}
    assert titles[SUMMARIZE] == "Summarize, version 6"
    assert KEYWORDS not in titles


def test_what_was_learned_of_the_endpoint_outlives_a_reload(
    tools_file: Path, keys: TestKeys
) -> None:
    """An endpoint that refuses the JSON Schema format is asked for json_object from then on,
    and a reload of the tools file does not make it be asked again."""
    standin = StandinUpstream(reject_json_schema=True).start_in_thread()
    env = {
        "API_KEYS_FILE": str(keys.path),
        "TOOLS_FILE": str(tools_file),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": standin.openai_url,
        "OPENAI_MODEL": "standin-model",
    }
    try:
        with ServerProcess(env, name="verdict").start() as server:
            assert not call(server.target, keys.full, SUMMARIZE).is_error
            assert len(standin.requests) == 2  # refused json_schema, then json_object
            replace_file(tools_file, declared(SUMMARIZE) + declared(KEYWORDS))
            os.kill(server.pid, signal.SIGHUP)
            assert reloads(server, 1), server.lines[-5:]
            assert not call(server.target, keys.full, SUMMARIZE).is_error
            formats = [r.body["response_format"]["type"] for r in standin.requests]
    finally:
        standin.stop_thread()
    assert formats == ["json_schema", "json_object", "json_object"]
