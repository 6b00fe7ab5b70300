"""The MCP face through a client nobody here wrote: the MCP Inspector's CLI (npm, pinned by the
Makefile's `tools` target into .tools/), run as a user would, against the real server.

It also runs the commands `make demo` prints, exactly as printed, so a newcomer's first command
works. Nothing here needs the network: the Inspector is installed by `make tools`, and it only
talks to the server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from aiservices import ToolClient
from aiservices_server.tools.refine_prompt import DEFINITION
from tests import demo
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.processes import run_printed
from tests.support.servers import ServerThread

ROOT = Path(__file__).resolve().parents[1]
INSPECTOR = ROOT / ".tools" / "node_modules" / ".bin" / "mcp-inspector"
TOOL = DEFINITION.name
TEMPLATE = json.dumps({"messages": [{"role": "user", "content": "Summarise {{text}}"}]})


@pytest.fixture
def inspector_env(tmp_path: Path) -> dict[str, str]:
    """The environment the Inspector runs in: a home of its own (it keeps a catalog and a
    secret store there) and secrets in memory, so nothing outside the test is read or written."""
    if not INSPECTOR.exists():
        pytest.fail("the MCP Inspector is not installed: `make tools` installs it")
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": os.environ["PATH"], "HOME": str(home), "MCP_INSPECTOR_SECRET_STORE": "memory"}


def _url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.mcp_port}/mcp"


def _inspector(
    env: dict[str, str], server: ServerThread, key: str, *args: str
) -> subprocess.CompletedProcess[str]:
    command = [str(INSPECTOR), "--cli", _url(server), "--transport", "http"]
    command += ["--header", f"Authorization: Bearer {key}", "--stored-auth-only", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def _output(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


def test_inspector_lists_the_tools_the_key_may_call(
    mcp_server: ServerThread, keys: TestKeys, inspector_env: dict[str, str]
) -> None:
    listed = _inspector(inspector_env, mcp_server, keys.editor, "--method", "tools/list")
    assert listed.returncode == 0, listed.stderr
    (tool,) = _output(listed)["tools"]
    assert tool["name"] == TOOL
    assert tool["title"] == DEFINITION.title
    assert tool["description"] == DEFINITION.description
    assert tool["inputSchema"] == DEFINITION.input_schema
    assert tool["outputSchema"] == DEFINITION.output_schema
    assert tool["annotations"]["readOnlyHint"] is True

    hidden = _inspector(inspector_env, mcp_server, keys.viewer, "--method", "tools/list")
    assert hidden.returncode == 0, hidden.stderr
    assert _output(hidden)["tools"] == []


def test_inspector_call_returns_what_grpc_returns(
    mcp_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    inspector_env: dict[str, str],
) -> None:
    arguments = {"prompt_template_json": TEMPLATE, "guidelines": "be concise"}
    called = _inspector(
        inspector_env,
        mcp_server,
        keys.editor,
        *("--method", "tools/call", "--tool-name", TOOL),
        *("--tool-args-json", json.dumps(arguments)),
    )
    assert called.returncode == 0, called.stderr
    result = _output(called)
    assert result["isError"] is False
    sent = upstream.requests[-1].body["inputs"]
    assert sent["__ag_prompt_template_json"] == TEMPLATE
    assert sent["__ag_guidelines"] == "be concise"
    assert result["content"] == [{"type": "text", "text": result["structuredContent"]["summary"]}]
    assert result["_meta"]["aiservices/trace_id"]

    with ToolClient(mcp_server.target, api_key=keys.editor, timeout=10.0) as client:
        over_grpc = client.call_tool(TOOL, arguments)
    assert result["structuredContent"] == over_grpc.structured_content
    assert "Be specific and concise." in result["structuredContent"]["messages"][0]["content"]


def test_inspector_tool_arg_takes_a_template_only_as_a_json_string(
    mcp_server: ServerThread, keys: TestKeys, inspector_env: dict[str, str]
) -> None:
    """`--tool-arg name=value` parses a value that looks like JSON: a bare template arrives as
    an object, and the answer names the field so the caller can correct it; the template
    quoted as a JSON string arrives as the string the schema asks for."""
    call = ("--method", "tools/call", "--tool-name", TOOL, "--tool-arg")
    bare = _inspector(
        inspector_env, mcp_server, keys.editor, *call, f"prompt_template_json={TEMPLATE}"
    )
    assert bare.returncode != 0
    refused = _output(bare)
    assert refused["isError"] is True
    error = refused["_meta"]["aiservices/error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert [v["field"] for v in error["fieldViolations"]] == ["arguments.prompt_template_json"]

    quoted = _inspector(
        inspector_env,
        mcp_server,
        keys.editor,
        *call,
        f"prompt_template_json={json.dumps(TEMPLATE)}",
    )
    assert quoted.returncode == 0, quoted.stderr
    assert _output(quoted)["structuredContent"]["summary"]


def test_inspector_with_a_wrong_key_fails(
    mcp_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    inspector_env: dict[str, str],
) -> None:
    wrong = _inspector(inspector_env, mcp_server, keys.editor + "x", "--method", "tools/list")
    assert wrong.returncode != 0
    assert wrong.stdout == ""
    assert "unknown API key" in wrong.stderr
    assert keys.editor not in wrong.stderr

    called = _inspector(
        inspector_env,
        mcp_server,
        "not-a-key",
        *("--method", "tools/call", "--tool-name", TOOL),
        *("--tool-args-json", json.dumps({"prompt_template_json": TEMPLATE})),
    )
    assert called.returncode != 0
    assert upstream.request_count == 0


def test_the_commands_make_demo_prints_work_as_printed(
    mcp_server: ServerThread, keys: TestKeys, inspector_env: dict[str, str], tmp_path: Path
) -> None:
    """Each command, run by a shell in another directory, exactly as the demo prints it."""
    template = demo.write_example_template(tmp_path)
    text = demo.instructions(mcp_server.target, _url(mcp_server), keys.editor, template=template)
    listing, calling = demo.inspector_commands(_url(mcp_server), keys.editor)
    get_status, call_tool = demo.buf_commands(mcp_server.target, keys.editor)
    python = demo.python_command(_url(mcp_server), keys.editor)
    cli_status, cli_refine = demo.cli_commands(mcp_server.target, keys.editor, template)
    commands = [listing, calling, python, get_status, call_tool, cli_status, cli_refine]
    for command in commands:
        assert command in text
    assert text.index(listing) < min(text.index(command) for command in commands[1:])

    outputs = []
    for command in commands:
        outputs.append(run_printed(command, tmp_path, inspector_env))

    assert [tool["name"] for tool in json.loads(outputs[0])["tools"]] == [TOOL]
    refined = json.loads(outputs[1])
    assert refined["isError"] is False
    assert len(refined["structuredContent"]["messages"]) == 2
    assert outputs[2].splitlines()[0] == repr([TOOL])
    assert outputs[2].splitlines()[1].startswith("False {'messages': [")
    assert json.loads(outputs[3])["enabled"] is True
    assert json.loads(outputs[4])["structuredContent"] == refined["structuredContent"]
    assert outputs[5].splitlines()[0] == "enabled   yes"
    diff = outputs[6].splitlines()
    assert diff[0] == "--- message 1 (system)"
    refined_system = refined["structuredContent"]["messages"][0]["content"]
    assert f"+{refined_system}" in diff
    assert diff[-1] == f"summary: {refined['structuredContent']['summary']}"


def code_in(markdown: str) -> list[str]:
    """The code of a Markdown text: its fenced blocks and its inline `code` spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return fenced + [span for _, span in re.findall(r"(`+)(.+?)\1", prose, re.DOTALL)]


def test_every_npx_form_runs_the_versions_make_tools_installs() -> None:
    """An unpinned `npx` picks whatever it has cached (an old Inspector refuses the CLI's
    arguments): every `npx` line in the docs and the demo names the pinned version."""
    pinned = {demo.BUF_PACKAGE, demo.INSPECTOR_PACKAGE}
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    run_by_npx = set()
    for path in texts:
        for code in code_in(path.read_text()):
            words = code.split()
            for at, word in enumerate(words):
                package = next((w for w in words[at + 1 :] if not w.startswith("-")), None)
                if word == "npx" and package is not None:
                    run_by_npx.add((path.name, package))
    assert run_by_npx, "no npx line found: the check reads nothing"
    assert {package for _, package in run_by_npx} <= pinned, run_by_npx
    assert shlex.split(demo.inspector_commands("http://h/mcp", "k")[0])[0] == str(INSPECTOR)
