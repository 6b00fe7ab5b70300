"""`make demo` with either upstream: the demo run as a user runs it, in its own process, and every
command it prints run exactly as printed.

With `UPSTREAM=openai` the service calls the stand-in's OpenAI-compatible chat completions
instead of its Agenta completion runner; a completion's trace id is its response id
(`chatcmpl-...`), which only the chat endpoint gives, so the caller can see which one answered.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiservices import ToolClient
from aiservices_server.config import UpstreamKind
from aiservices_server.tools.refine_prompt import DEFINITION
from tests import demo
from tests.standin import CHAT_PATH, RUN_PATH, StandinUpstream
from tests.support.demo import RunningDemo, demo_environment
from tests.support.keys import TestKeys
from tests.support.processes import run_printed
from tests.support.servers import ServerThread, make_settings

ROOT = Path(__file__).resolve().parents[1]
INSPECTOR = ROOT / ".tools" / "node_modules" / ".bin" / "mcp-inspector"
TOOL = DEFINITION.name
# The example tools the demo serves (examples/tools.toml), in the order it prints their calls.
DECLARED = list(demo.DECLARED_EXAMPLE_ARGUMENTS)


@pytest.fixture
def openai_demo(tmp_path: Path) -> Iterator[RunningDemo]:
    """The demo with UPSTREAM=openai, on free ports, working in an empty directory."""
    if not INSPECTOR.exists():
        pytest.fail("the MCP Inspector is not installed: `make tools` installs it")
    env = demo_environment(
        tmp_path / "home", upstream="openai", grpc_address="127.0.0.1:0", mcp_address="127.0.0.1:0"
    )
    running = RunningDemo.start(tmp_path, env)
    try:
        yield running
    finally:
        running.stop()


def _printed_commands(lines: list[str]) -> list[str]:
    """Each command in the order printed: indented one-liners and the Python here-document."""
    commands: list[str] = []
    here_doc: list[str] | None = None
    for line in lines:
        if here_doc is not None:
            here_doc.append(line)
            if line == "EOF":
                commands.append("\n".join(here_doc))
                here_doc = None
        elif line.endswith("<<'EOF'"):
            here_doc = [line]
        elif line.startswith("  "):
            commands.append(line.strip())
    return commands


def test_demo_with_upstream_openai_answers_every_printed_command_through_chat_completions(
    openai_demo: RunningDemo, tmp_path: Path
) -> None:
    lines = openai_demo.instructions()
    assert lines[1].startswith("upstream: openai, a stand-in's OpenAI-compatible chat completions")
    assert lines[1].endswith(f"/v1, model {demo.DEMO_MODEL}")

    commands = _printed_commands(lines)
    assert len(commands) == 7 + len(DECLARED)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    listed, called, python, cli_status, cli_refine, status, call_tool, *declared = (
        run_printed(command, workdir, demo_environment(tmp_path / "home")) for command in commands
    )

    assert [tool["name"] for tool in json.loads(listed)["tools"]] == sorted([TOOL, *DECLARED])
    over_mcp: dict[str, Any] = json.loads(called)
    assert over_mcp["isError"] is False
    assert over_mcp["_meta"]["aiservices/trace_id"].startswith("chatcmpl-")
    assert python.splitlines()[0] == repr(sorted([TOOL, *DECLARED]))
    assert python.splitlines()[1].startswith("False {'messages': [")
    assert json.loads(status)["enabled"] is True
    over_grpc: dict[str, Any] = json.loads(call_tool)
    assert over_grpc["meta"]["traceId"].startswith("chatcmpl-")
    assert over_grpc["structuredContent"] == over_mcp["structuredContent"]
    assert "Be specific and concise." in over_grpc["structuredContent"]["messages"][0]["content"]
    assert cli_status.splitlines()[:2] == ["enabled   yes", "upstream  openai"]
    assert cli_refine.splitlines()[0] == "--- message 1 (system)"
    assert cli_refine.splitlines()[-1].startswith("summary: ")
    # The example tools, answered through chat completions with output that fits their schemas.
    # The command line prints the text block, then the structured content.
    classified, extracted, generated = declared
    assert classified.splitlines()[0] == "billing"
    assert json.loads(classified.partition("\n")[2])["label"] == "billing"
    assert json.loads(extracted.partition("\n")[2])["fields"][0]["found"] is True
    assert generated.splitlines()[0] == "example summary"

    assert openai_demo.stop() == 0


@pytest.mark.parametrize(
    ("kind", "path"), [(UpstreamKind.OPENAI, CHAT_PATH), (UpstreamKind.AGENTA, RUN_PATH)]
)
def test_demo_settings_send_the_stand_in_the_chosen_upstream_request(
    kind: UpstreamKind, path: str, keys: TestKeys
) -> None:
    """The settings the demo points the service with, against a stand-in started as the demo
    starts it (the same key for both endpoints), and what the stand-in then receives."""
    standin = StandinUpstream(
        api_key=demo.DEMO_UPSTREAM_KEY, openai_api_key=demo.DEMO_UPSTREAM_KEY
    ).start_in_thread()
    try:
        overrides: dict[str, Any] = demo.upstream_settings(kind, standin.url)
        settings = make_settings(upstream=kind, **overrides)
        with (
            ServerThread(settings) as running,
            ToolClient(running.target, api_key=keys.editor, timeout=10.0) as client,
        ):
            result = client.call_tool(TOOL, demo.EXAMPLE_ARGUMENTS)
        assert not result.is_error, result.error
        (sent,) = standin.requests
    finally:
        standin.stop_thread()
    assert sent.path == path
    if kind is UpstreamKind.OPENAI:
        assert sent.headers["authorization"] == f"Bearer {demo.DEMO_UPSTREAM_KEY}"
        assert sent.body["model"] == demo.DEMO_MODEL
        user = json.loads(sent.body["messages"][-1]["content"])
        assert user["prompt_template_json"] == demo.EXAMPLE_ARGUMENTS["prompt_template_json"]
        assert result.trace_id.startswith("chatcmpl-")
    else:
        assert sent.headers["authorization"] == f"ApiKey {demo.DEMO_UPSTREAM_KEY}"
        inputs = sent.body["inputs"]
        assert inputs["__ag_prompt_template_json"] == demo.EXAMPLE_ARGUMENTS["prompt_template_json"]


def test_a_bad_upstream_setting_stops_the_demo_with_one_line(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "tests.demo"],
        cwd=tmp_path,
        env=demo_environment(tmp_path / "home", upstream="opneai", grpc_address="127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 2
    assert ran.stderr.startswith("aiservices: invalid setting AGENTA_AI_SERVICES_UPSTREAM: ")
    assert len(ran.stderr.splitlines()) == 1
    assert "aiservices demo:" not in ran.stderr


@pytest.mark.parametrize(
    ("arguments", "recipe"),
    [
        (["UPSTREAM=openai"], "AGENTA_AI_SERVICES_UPSTREAM=openai .venv/bin/python -m tests.demo"),
        ([], ".venv/bin/python -m tests.demo"),
    ],
)
def test_make_demo_passes_upstream_on(arguments: list[str], recipe: str) -> None:
    """`make demo UPSTREAM=openai` sets the setting; without it the environment's own value (or
    the default) stands, so `AGENTA_AI_SERVICES_UPSTREAM=openai make demo` works too."""
    ran = subprocess.run(
        ["make", "-n", "demo", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    # Run under `make test`, make also prints the directories it enters and leaves.
    assert [line for line in ran.stdout.splitlines() if "tests.demo" in line] == [recipe]
