"""Tools as packages, as an operator installs them: a distribution with an entry point in group
`aiservices.tools`, built and installed for real (uv pip, with the checkout's own setuptools,
offline) into a directory on the server's import path, then served by a real server process
and called over both faces (the generated gRPC client and the MCP SDK's client) with the
stand-in upstream.

Besides the example in examples/aiservices-plugin-example, a test kit distribution written here
holds one entry point per way a plugin can go wrong; `AGENTA_AI_SERVICES_PLUGINS` picks which
are loaded, so each broken one is tried on its own and must stop the server with one line.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.shared.exceptions import MCPError

from aiservices import ToolClient, ToolServiceError
from aiservices_server.config import unknown_settings
from aiservices_server.tools.base import ToolAnnotations, ToolDefinition, ToolResult
from aiservices_server.tools.plugins import (
    MAX_PLUGIN_SETTINGS_BYTES,
    MAX_SHOWN_CHARS,
    _shown,
    check_tool,
    plugin_settings,
    settings_prefix,
)
from tests.standin import StandinUpstream
from tests.support.demo import RunningDemo, demo_environment
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_client
from tests.support.processes import (
    IMPORT_PATH,
    REPO_ROOT,
    SERVER_COMMAND,
    ServerProcess,
    clean_env,
    upstream_settings,
)

EXAMPLE_SOURCE = REPO_ROOT / "examples" / "aiservices-plugin-example"
UV = REPO_ROOT / ".tools" / "uv" / "bin" / "uv"
EXAMPLE = "tools.example.text.stats"
REFINE = "tools.agenta.api.refine_prompt"
CONTEXT_TOOL = "tools.testkit.context.show"
EXAMPLE_DIST = "aiservices-plugin-example 0.1.0"
TESTKIT_DIST = "aiservices-plugin-testkit 0.1.0"
TIMEOUT = 10.0
TEMPLATE = '{"messages": [{"role": "system", "content": "You greet {{name}}."}]}'
RETRY_LATER = -32000
INVALID_PARAMS = -32602


# --- installing ----------------------------------------------------------------------------------


def install(source: Path, target: Path) -> Path:
    """Build the project at `source` and install it into `target` as `pip install --target`
    does, with the checkout's uv and setuptools and no network. The build writes into the
    source tree (build/, *.egg-info), so `source` is a copy."""
    ran = subprocess.run(
        [
            UV,
            "pip",
            "install",
            "--quiet",
            "--offline",
            "--python",
            sys.executable,
            "--no-deps",
            "--no-build-isolation",
            "--target",
            target,
            source,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    return target


def copy_example(where: Path) -> Path:
    leave_out = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(EXAMPLE_SOURCE, where, ignore=leave_out)
    return where


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, installed: the directory to put on the import path."""
    root = tmp_path_factory.mktemp("example")
    return install(copy_example(root / "source"), root / "installed")


TESTKIT_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "aiservices-plugin-testkit"
version = "0.1.0"

[project.entry-points."aiservices.tools"]
testkit-context = "aiservices_plugin_testkit:context"
testkit-broken-import = "aiservices_plugin_testkit.broken:tools"
testkit-missing = "aiservices_plugin_testkit:no_such_factory"
testkit-raising = "aiservices_plugin_testkit:raising"
testkit-exits = "aiservices_plugin_testkit:exits"
testkit-async = "aiservices_plugin_testkit:asynchronous"
testkit-wrong-type = "aiservices_plugin_testkit:wrong_type"
testkit-single = "aiservices_plugin_testkit:single"
testkit-not-a-tool = "aiservices_plugin_testkit:not_a_tool"
testkit-bad-name = "aiservices_plugin_testkit:bad_name"
testkit-bad-schema = "aiservices_plugin_testkit:bad_schema"
testkit-array-schema = "aiservices_plugin_testkit:array_schema"
testkit-sync-call = "aiservices_plugin_testkit:sync_call"
testkit-star = "aiservices_plugin_testkit:star_permission"
testkit-twice = "aiservices_plugin_testkit:twice"
testkit-collides-builtin = "aiservices_plugin_testkit:collides_builtin"
testkit-collides-example = "aiservices_plugin_testkit:collides_example"
"""

TESTKIT_MODULE = '''\
"""Plugins for the tests: one that reports what it was given, and one per way to go wrong."""

from aiservices_server.tools.base import ToolDefinition, ToolResult
from aiservices_server.upstream.refiner import RefineRequest

TEMPLATE = '{"messages": [{"role": "system", "content": "You greet {{name}}."}]}'


class Kit:
    def __init__(self, name, input_schema=None, permission=None):
        self.definition = ToolDefinition(
            name=name,
            title="Test kit",
            description="A tool of the test kit.",
            input_schema=input_schema or {"type": "object", "properties": {}},
            output_schema={"type": "object"},
            permission=permission or name,
        )

    async def call(self, arguments, call):
        return ToolResult(text="ok", structured={})


class SyncCall(Kit):
    def call(self, arguments, call):
        return ToolResult(text="ok", structured={})


class ContextTool(Kit):
    """Reports the context its factory got; with `refine`, calls the refine port; with
    `explode`, raises what no tool should."""

    def __init__(self, context):
        super().__init__(
            "tools.testkit.context.show",
            {
                "type": "object",
                "additionalProperties": False,
                "properties": {"refine": {"type": "boolean"}, "explode": {"type": "boolean"}},
            },
            context.settings.get("PERMISSION"),
        )
        self.context = context

    async def call(self, arguments, call):
        context = self.context
        if arguments.get("explode"):
            raise RuntimeError("a secret the caller must not see")
        found = {
            "plugin": context.plugin,
            "settings": dict(context.settings),
            "upstream": context.upstream,
            "refiner": context.refiner is not None,
            "max_reply_bytes": context.limits.max_reply_bytes,
            "transport": type(context.transport).__name__,
        }
        if arguments.get("refine"):
            reply = await context.refiner.refine(
                RefineRequest(template_json=TEMPLATE),
                time_left=call.time_left(),
                traceparent=call.traceparent,
            )
            found["upstream_status"] = reply.attempt.status
        return ToolResult(text="context", structured=found)


def context(context):
    return [ContextTool(context)]


def raising(context):
    raise RuntimeError("no licence server\\n  at licence.internal " + "x" * 5000)


def exits(context):
    raise SystemExit(3)


async def asynchronous(context):
    return []


def wrong_type(context):
    return 42


def single(context):
    return Kit("tools.testkit.single.tool")


def not_a_tool(context):
    return ["tools.testkit.just.a.name"]


def bad_name(context):
    return [Kit("Tools With Spaces")]


def bad_schema(context):
    return [Kit("tools.testkit.bad.schema", {"type": "nonsense"})]


def array_schema(context):
    return [Kit("tools.testkit.array.schema", {"type": "array"})]


def sync_call(context):
    return [SyncCall("tools.testkit.sync.call")]


def star_permission(context):
    return [Kit("tools.testkit.star.permission", permission="*")]


def twice(context):
    return (Kit("tools.testkit.same.name") for _ in range(2))


def collides_builtin(context):
    return [Kit("tools.agenta.api.refine_prompt")]


def collides_example(context):
    return [Kit("tools.example.text.stats")]
'''

TWIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "aiservices-plugin-twin"
version = "2.0.0"

[project.entry-points."aiservices.tools"]
example = "aiservices_plugin_twin:tools"
"""


def write_project(where: Path, pyproject: str, modules: Mapping[str, str]) -> Path:
    where.mkdir(parents=True)
    (where / "pyproject.toml").write_text(pyproject)
    for name, text in modules.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return where


@pytest.fixture(scope="module")
def testkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("testkit")
    source = write_project(
        root / "source",
        TESTKIT_PYPROJECT,
        {
            "aiservices_plugin_testkit/__init__.py": TESTKIT_MODULE,
            "aiservices_plugin_testkit/broken.py": "import aiservices_no_such_module\n",
        },
    )
    return install(source, root / "installed")


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another distribution whose entry point is also named `example`."""
    root = tmp_path_factory.mktemp("twin")
    source = write_project(
        root / "source",
        TWIN_PYPROJECT,
        {"aiservices_plugin_twin/__init__.py": "def tools(context):\n    return []\n"},
    )
    return install(source, root / "installed")


# --- running -------------------------------------------------------------------------------------


def server_settings(keys: TestKeys, upstream: StandinUpstream, **settings: str) -> dict[str, str]:
    return {
        **upstream_settings(upstream.url),
        "API_KEYS_FILE": str(keys.path),
        "MCP_ADDRESS": "127.0.0.1:0",
        **settings,
    }


@pytest.fixture
def serve(keys: TestKeys, upstream: StandinUpstream) -> Iterator[Any]:
    """Starts servers with plugins on their import path; stops them after the test."""
    started: list[ServerProcess] = []

    def start(paths: list[Path], **settings: str) -> ServerProcess:
        server = ServerProcess(server_settings(keys, upstream, **settings), import_path=paths)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


def refusal(tmp_path: Path, paths: list[Path], keys: TestKeys, **settings: str) -> str:
    """The one line a server that must not start prints, once it has exited with status 2;
    nothing it printed is a traceback."""
    env = clean_env({"API_KEYS_FILE": str(keys.path), "GRPC_ADDRESS": "127.0.0.1:0", **settings})
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), IMPORT_PATH])
    ran = subprocess.run(
        SERVER_COMMAND,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 2, ran.stderr
    assert "Traceback" not in ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("aiservices:")]
    assert len(lines) == 1, ran.stderr
    return lines[0]


def mcp_url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port_of('mcp_port')}/mcp"


def tool_names(client: ToolClient) -> list[str]:
    return [tool.name for tool in client.status().tools]


async def mcp_tool_names(server: ServerProcess, key: str) -> list[str]:
    async with mcp_client(mcp_url(server), key, timeout=TIMEOUT) as client:
        return [tool.name for tool in (await client.list_tools()).tools]


TEXT = "Plugins add tools.\nA second line."
COUNTS = {"characters": 33, "words": 6, "lines": 2}


# --- the example, served -------------------------------------------------------------------------


async def test_the_example_tool_is_listed_and_called_over_both_faces(
    serve: Any, example: Path, keys: TestKeys, upstream: StandinUpstream
) -> None:
    server = serve([example], PLUGIN_EXAMPLE_WORDS_PER_MINUTE="120")
    loaded = [r for r in server.records if r.get("msg") == "plugin loaded"]
    assert [(r["plugin"], r["distribution"], r["tools"]) for r in loaded] == [
        ("example", EXAMPLE_DIST, [EXAMPLE])
    ]
    # Its settings are the plugin's, not misspelt server settings.
    assert not [r for r in server.records if r.get("msg") == "unknown setting ignored"]

    with ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client:
        assert tool_names(client) == [REFINE, EXAMPLE]
        [listed] = [tool for tool in client.list_tools() if tool.name == EXAMPLE]
        result = client.call_tool(EXAMPLE, {"text": TEXT})
    assert listed.title == "Text statistics"
    assert listed.input_schema["required"] == ["text"]
    assert listed.annotations.read_only_hint is True
    assert not result.is_error
    assert result.text == "6 words, 33 characters, 2 lines; about 3 s to read"
    assert result.structured_content == {**COUNTS, "reading_seconds": 3}

    async with mcp_client(mcp_url(server), keys.full, timeout=TIMEOUT) as mcp:
        tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
        answer = await mcp.call_tool(EXAMPLE, {"text": TEXT})
    assert tools[EXAMPLE].output_schema == listed.output_schema
    assert answer.is_error is False
    assert answer.structured_content == {**COUNTS, "reading_seconds": 3}
    assert [block.text for block in answer.content] == [result.text]  # type: ignore[union-attr]
    assert upstream.request_count == 0  # the example calls no upstream


async def test_a_key_without_the_permission_neither_sees_nor_calls_the_example(
    serve: Any, example: Path, keys: TestKeys
) -> None:
    server = serve([example])
    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as client:
        assert tool_names(client) == [REFINE]
        assert [tool.name for tool in client.list_tools()] == [REFINE]
        with pytest.raises(ToolServiceError) as caught:
            client.call_tool(EXAMPLE, {"text": TEXT})
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert await mcp_tool_names(server, keys.editor) == [REFINE]
    async with mcp_client(mcp_url(server), keys.editor, timeout=TIMEOUT) as mcp:
        with pytest.raises(MCPError) as refused:
            await mcp.call_tool(EXAMPLE, {"text": TEXT})
    assert refused.value.code == INVALID_PARAMS
    assert refused.value.data["reason"] == "PERMISSION_DENIED"


async def test_the_example_has_a_rate_limit_budget_of_its_own_across_both_faces(
    serve: Any, example: Path, keys: TestKeys
) -> None:
    # Its PERMISSION setting lets the keys that may refine prompts call it too.
    server = serve(
        [example],
        PLUGIN_EXAMPLE_PERMISSION="edit_workflows",
        RATE_LIMIT_BURST="3",
        RATE_LIMIT_PER_MINUTE="1",
    )
    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as client:
        assert tool_names(client) == [REFINE, EXAMPLE]
        for _ in range(2):
            assert not client.call_tool(EXAMPLE, {"text": TEXT}).is_error
        async with mcp_client(mcp_url(server), keys.editor, timeout=TIMEOUT) as mcp:
            assert (await mcp.call_tool(EXAMPLE, {"text": TEXT})).is_error is False
            with pytest.raises(MCPError) as refused:
                await mcp.call_tool(EXAMPLE, {"text": TEXT})
        with pytest.raises(ToolServiceError) as caught:
            client.call_tool(EXAMPLE, {"text": TEXT})
        # The budget is per tool: refine_prompt's is untouched.
        assert not client.call_tool(REFINE, {"prompt_template_json": TEMPLATE}).is_error
    assert refused.value.code == RETRY_LATER
    assert refused.value.data["reason"] == "RATE_LIMIT_EXCEEDED"
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after is not None and caught.value.retry_after >= 50


async def test_arguments_that_break_the_example_schema_are_refused_with_the_field(
    serve: Any, example: Path, keys: TestKeys
) -> None:
    server = serve([example])
    with (
        ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        client.call_tool(EXAMPLE, {"text": "x" * 100_001})
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.field_violations] == ["arguments.text"]


# --- which plugins, and what they get -----------------------------------------------------------


def test_the_plugins_setting_selects_which_are_loaded(
    serve: Any, example: Path, testkit: Path, keys: TestKeys
) -> None:
    # Every broken plugin of the kit is installed too: only the one named is loaded.
    server = serve([example, testkit], PLUGINS="testkit-context")
    with ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client:
        assert tool_names(client) == [REFINE, CONTEXT_TOOL]
    none = serve([example, testkit], PLUGINS="")
    with ToolClient(none.target, api_key=keys.full, timeout=TIMEOUT) as client:
        assert tool_names(client) == [REFINE]
    assert not [r for r in none.records if r.get("msg") == "plugin loaded"]


def test_without_an_upstream_plugins_load_but_no_tool_is_served(
    example: Path, keys: TestKeys
) -> None:
    env = {"API_KEYS_FILE": str(keys.path), "PLUGIN_EXAMPLE_PERMISSION": "edit_workflows"}
    with ServerProcess(env, import_path=[example]) as server:
        assert [r["plugin"] for r in server.records if r.get("msg") == "plugin loaded"] == [
            "example"
        ]
        with ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client:
            status = client.status()
            with pytest.raises(ToolServiceError) as caught:
                client.call_tool(EXAMPLE, {"text": TEXT})
    assert (status.enabled, status.tools) == (False, [])
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION


def test_a_plugin_that_is_not_installed_is_a_bad_setting(
    tmp_path: Path, example: Path, keys: TestKeys
) -> None:
    line = refusal(tmp_path, [example], keys, PLUGINS="example, exmaple")
    assert line == (
        "aiservices: invalid setting AGENTA_AI_SERVICES_PLUGINS: no plugin named 'exmaple' is "
        "installed (installed: example)"
    )


async def test_a_plugin_gets_its_own_settings_the_refine_port_and_the_shared_transport(
    serve: Any, testkit: Path, keys: TestKeys, upstream: StandinUpstream
) -> None:
    server = serve(
        [testkit],
        PLUGINS="testkit-context",
        PLUGIN_TESTKIT_CONTEXT_GREETING="hello",
        PLUGIN_TESTKIT_CONTEXT_PERMISSION="edit_workflows",
        # No plugin testkit-context-v2 is installed: this one is testkit-context's.
        PLUGIN_TESTKIT_CONTEXT_V2_COLOUR="blue",
        PLUGIN_EXAMPLE_PERMISSION="never seen by the kit",
    )
    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as client:
        result = client.call_tool(CONTEXT_TOOL, {"refine": True})
    assert not result.is_error
    assert result.structured_content == {
        "plugin": "testkit-context",
        "settings": {"GREETING": "hello", "PERMISSION": "edit_workflows", "V2_COLOUR": "blue"},
        "upstream": "agenta",
        "refiner": True,
        "max_reply_bytes": 4 * 1024 * 1024,
        "transport": "AiohttpTransport",
        "upstream_status": "200",
    }
    [sent] = upstream.requests
    assert sent.path == "/services/completion/run"
    assert sent.body["inputs"]["__ag_prompt_template_json"] == TEMPLATE


async def test_a_plugin_tool_that_raises_is_internal_to_the_caller_with_no_detail(
    serve: Any, testkit: Path, keys: TestKeys
) -> None:
    server = serve([testkit], PLUGINS="testkit-context")
    with (
        ToolClient(server.target, api_key=keys.full, timeout=TIMEOUT) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        client.call_tool(CONTEXT_TOOL, {"explode": True})
    assert caught.value.code is grpc.StatusCode.INTERNAL
    assert "secret" not in caught.value.message
    async with mcp_client(mcp_url(server), keys.full, timeout=TIMEOUT) as mcp:
        answer = await mcp.call_tool(CONTEXT_TOOL, {})
    assert answer.is_error is False
    assert answer.structured_content is not None
    assert answer.structured_content["upstream"] == "agenta"


def test_a_plugin_with_settings_too_large_stops_the_server(
    tmp_path: Path, testkit: Path, keys: TestKeys
) -> None:
    big = "x" * MAX_PLUGIN_SETTINGS_BYTES
    line = refusal(
        tmp_path, [testkit], keys, PLUGINS="testkit-context", PLUGIN_TESTKIT_CONTEXT_BIG=big
    )
    assert line == (
        f"aiservices: plugin testkit-context ({TESTKIT_DIST}): its settings "
        "(AGENTA_AI_SERVICES_PLUGIN_TESTKIT_CONTEXT_*) hold more than 65,536 bytes"
    )


# --- a plugin that cannot be served --------------------------------------------------------------

KIT = f"aiservices: plugin {{name}} ({TESTKIT_DIST}): "
BROKEN = {
    "testkit-broken-import": "failed to load aiservices_plugin_testkit.broken:tools: "
    "ModuleNotFoundError: No module named 'aiservices_no_such_module'",
    "testkit-missing": "failed to load aiservices_plugin_testkit:no_such_factory: "
    "AttributeError: module 'aiservices_plugin_testkit' has no attribute 'no_such_factory'",
    "testkit-raising": "the factory raised RuntimeError: no licence server at licence.internal "
    + "x" * 159
    + "...",
    "testkit-exits": "the factory raised SystemExit: 3",
    "testkit-async": "the factory is async: it must return its tools directly",
    "testkit-wrong-type": "the factory returned int, not an iterable of tools",
    "testkit-single": "the factory returned Kit, not an iterable of tools",
    "testkit-not-a-tool": "tool #1: str has no definition: not a tool",
    "testkit-bad-name": "tool #1: name: must be 1 to 128 characters: two or more dot-separated "
    "parts of a-z 0-9 _ -, each starting with a letter or digit (like tools.acme.text.summarize)",
    "testkit-bad-schema": "tool tools.testkit.bad.schema: input_schema: not a valid JSON Schema: "
    "'nonsense' is not valid under any of the given schemas",
    "testkit-array-schema": 'tool tools.testkit.array.schema: input_schema.type: must be "object"',
    "testkit-sync-call": "tool tools.testkit.sync.call: call: must be an async method: "
    "async def call(self, arguments, call)",
    "testkit-star": "tool tools.testkit.star.permission: permission: '*' is no tool's permission",
    "testkit-twice": "tool tools.testkit.same.name: name: already taken by plugin testkit-twice "
    f"({TESTKIT_DIST})",
    "testkit-collides-builtin": "tool tools.agenta.api.refine_prompt: name: already taken by a "
    "built-in tool",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plugin_stops_the_server_with_one_line_naming_it(
    tmp_path: Path, testkit: Path, keys: TestKeys, name: str
) -> None:
    line = refusal(tmp_path, [testkit], keys, PLUGINS=name)
    assert line == KIT.format(name=name) + BROKEN[name]


def test_a_broken_plugin_stops_the_server_even_with_no_upstream_configured(
    tmp_path: Path, testkit: Path, keys: TestKeys
) -> None:
    # refusal() passes no upstream settings: the service would serve disabled.
    line = refusal(tmp_path, [testkit], keys, PLUGINS="testkit-wrong-type")
    assert line.endswith("the factory returned int, not an iterable of tools")


def test_two_plugins_may_not_serve_one_tool_name(
    tmp_path: Path, example: Path, testkit: Path, keys: TestKeys
) -> None:
    line = refusal(tmp_path, [example, testkit], keys, PLUGINS="example,testkit-collides-example")
    assert line == (
        f"aiservices: plugin testkit-collides-example ({TESTKIT_DIST}): tool "
        f"tools.example.text.stats: name: already taken by plugin example ({EXAMPLE_DIST})"
    )


def test_an_entry_point_name_two_distributions_declare_is_refused(
    tmp_path: Path, example: Path, twin: Path, keys: TestKeys
) -> None:
    line = refusal(tmp_path, [example, twin], keys)
    assert line == (
        f"aiservices: plugin example: installed twice, by {EXAMPLE_DIST} and "
        "aiservices-plugin-twin 2.0.0: uninstall one, or leave it out of "
        "AGENTA_AI_SERVICES_PLUGINS"
    )


def test_a_declared_tool_may_not_take_a_plugin_tool_name(
    tmp_path: Path, example: Path, keys: TestKeys
) -> None:
    tools_file = tmp_path / "tools.toml"
    tools_file.write_text(f'[[tools]]\nname = "{EXAMPLE}"\n')
    tools_file.chmod(0o600)
    line = refusal(tmp_path, [example], keys, TOOLS_FILE=str(tools_file))
    assert line.startswith(f"aiservices: tools file {tools_file}: tool {EXAMPLE}: name: ")


# --- the example's own tests, and the documented commands ---------------------------------------


def test_the_example_passes_its_own_tests_installed(tmp_path: Path, example: Path) -> None:
    project = copy_example(tmp_path / "example")
    shutil.rmtree(project / "src")  # what is tested is the installed package
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(example), IMPORT_PATH])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout[-3000:]
    assert " passed" in ran.stdout and "failed" not in ran.stdout


def documented_blocks() -> list[str]:
    """The `sh` blocks of the "Tools as packages" section of docs/tools.md, as printed there."""
    text = (REPO_ROOT / "docs" / "tools.md").read_text()
    section = text[text.index("\n## Tools as packages\n") :]
    blocks = []
    while "```sh\n" in section:
        section = section[section.index("```sh\n") + len("```sh\n") :]
        blocks.append(section[: section.index("```")])
        section = section[section.index("```") + 3 :]
    return blocks


def scratch_checkout(where: Path) -> Path:
    """What `make demo` reads, laid out like a checkout: the projects' files (their times kept,
    so make finds the virtualenv up to date), the example, and .venv, .tools and tests linked."""
    for name in ("Makefile", "pyproject.toml", "uv.lock", "clients/pyproject.toml"):
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, where / name)
    for name in (".venv", ".tools", "tests"):
        (where / name).symlink_to(REPO_ROOT / name)
    copy_example(where / "examples" / "aiservices-plugin-example")
    return where


def test_the_documented_commands_serve_the_example_with_the_demo(tmp_path: Path) -> None:
    serve_block, call_block = documented_blocks()
    checkout = scratch_checkout(tmp_path / "checkout")
    env = demo_environment(tmp_path / "home", grpc_address="127.0.0.1:0", mcp_address="127.0.0.1:0")
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", serve_block],
        cwd=checkout,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    demo = RunningDemo(process)
    try:
        grpc_address, _ = demo.addresses()
        assert (checkout / ".dev" / "plugins" / "aiservices_plugin_example").is_dir()
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", call_block],
            cwd=checkout,
            env={**env, "AISERVICES_TARGET": grpc_address},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert "6 words, 33 characters, 2 lines; about 2 s to read" in ran.stdout


# --- the checks, in-process ----------------------------------------------------------------------


class Probe:
    """A tool built from a definition's fields, for the start-up checks."""

    def __init__(self, **fields: Any) -> None:
        values: dict[str, Any] = {
            "name": "tools.probe.check.me",
            "title": "Probe",
            "description": "A probe.",
            "input_schema": {"type": "object"},
            "output_schema": {"type": "object"},
            "permission": "probe",
        }
        self.definition = ToolDefinition(**{**values, **fields})

    async def call(self, arguments: dict[str, Any], call: Any) -> ToolResult:
        return ToolResult(text="", structured={})


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"name": "refine_prompt"}, "name: must be 1 to 128 characters"),
        ({"name": "tools." + "a" * 200}, "name: must be 1 to 128 characters"),
        ({"title": "  "}, "title: must be a string of 1 to 200 characters"),
        ({"description": "d" * 10_001}, "description: must be a string of 1 to 10,000"),
        ({"permission": "edit workflows"}, "permission: must be a name of 1 to 128"),
        ({"permission": "act_for_users"}, "permission: 'act_for_users' is no tool's permission"),
        ({"annotations": {"read_only_hint": True}}, "annotations: must be a ToolAnnotations"),
        ({"input_schema": nested(40)}, "input_schema: nested deeper than 32"),
        (
            {"input_schema": {"type": "object", "enum": list(range(20_000))}},
            "input_schema: holds more than 10,000 values",
        ),
        (
            {"output_schema": {"type": "object", "maximum": math.inf}},
            "output_schema: numbers must be finite",
        ),
        (
            {"output_schema": {"type": "object", "maximum": 2**60}},
            "output_schema: an integer beyond 2**53",
        ),
        (
            {"output_schema": {"type": "object", "enum": (1, 2)}},
            "output_schema: holds tuple, which is no JSON",
        ),
        (
            {"output_schema": {"type": "object", 1: "x"}},
            "output_schema: every key must be a string",
        ),
        ({"output_schema": "{}"}, "output_schema: must be a dict (a JSON object), not str"),
        ({"output_schema": {"type": "string"}}, 'output_schema.type: must be "object"'),
        (
            {"input_schema": {"type": "object", "properties": {"a": {"pattern": "(a+)+$"}}}},
            "input_schema.properties.a.pattern: regular expressions are not accepted",
        ),
        (
            {"input_schema": {"type": "object", "properties": {"a": {"maxLen": 3}}}},
            "input_schema.properties.a.maxLen: not a JSON Schema draft 2020-12 keyword",
        ),
    ],
)
def test_the_start_up_checks_refuse_a_bad_definition(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(problem)):
        check_tool(Probe(**fields))


def test_the_start_up_checks_accept_a_good_tool_as_it_is() -> None:
    probe = Probe(
        annotations=ToolAnnotations(read_only_hint=True),
        # A property named like a keyword is a property.
        input_schema={"type": "object", "properties": {"pattern": {"type": "string"}}},
    )
    assert check_tool(probe) is probe


NAME_CHARACTERS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_", min_size=1, max_size=12)
# Keys of acme-tools' own that are not plugin acme-tools.v2's, and keys of plugin acme's that
# are not acme-tools' settings.
OWN_KEYS = NAME_CHARACTERS.filter(lambda key: not key.startswith("V2_"))
OTHER_KEYS = NAME_CHARACTERS.filter(lambda key: not key.startswith("TOOLS_"))


def random_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(ch.lower() if flip else ch for ch, flip in zip(text, flips, strict=True))


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], dict[str, str]]:
    """An environment holding plugin acme-tools' settings (names in any case), a longer-named
    plugin's, another's and unrelated variables; and the settings acme-tools must get."""
    own = draw(st.dictionaries(OWN_KEYS, st.text(max_size=30), max_size=8))
    environ: dict[str, str] = {}
    for key, value in own.items():
        environ[random_case(draw, "AGENTA_AI_SERVICES_PLUGIN_ACME_TOOLS_" + key)] = value
    for key, value in draw(st.dictionaries(OTHER_KEYS, st.text(max_size=30), max_size=8)).items():
        environ["AGENTA_AI_SERVICES_PLUGIN_ACME_TOOLS_V2_" + key] = value
        environ["AGENTA_AI_SERVICES_PLUGIN_ACME_" + key] = value
        environ["AGENTA_AI_SERVICES_" + key] = value
        environ[key] = value
    return environ, {key.upper(): value for key, value in own.items()}


@settings(max_examples=200, deadline=None)
@given(environments())
def test_a_plugin_gets_exactly_its_own_settings(
    case: tuple[dict[str, str], dict[str, str]],
) -> None:
    environ, expected = case
    got = plugin_settings("acme-tools", environ, others=["acme-tools.v2", "acme", "acme-tools"])
    assert dict(got) == expected
    with pytest.raises(TypeError):
        got["NEW"] = "x"  # type: ignore[index]
    # None of them is reported as an unknown server setting.
    plugins = "AGENTA_AI_SERVICES_PLUGIN_"
    assert [name for name, _ in unknown_settings(environ) if name.upper().startswith(plugins)] == []


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_a_plugin_name_becomes_a_variable_prefix(name: str) -> None:
    prefix = settings_prefix(name)
    assert prefix.startswith("AGENTA_AI_SERVICES_PLUGIN_") and prefix.endswith("_")
    assert all(ch.isascii() and (ch.isupper() or ch.isdigit() or ch == "_") for ch in prefix)
    assert len(prefix) == len("AGENTA_AI_SERVICES_PLUGIN__") + len(name)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_what_a_failure_line_quotes_is_one_short_printable_line(text: str) -> None:
    shown = _shown(text)
    assert len(shown) <= MAX_SHOWN_CHARS
    assert shown.isprintable() and shown == shown.strip()
    if len(text) <= MAX_SHOWN_CHARS and text.isprintable():
        assert shown == " ".join(text.split())  # short and printable: only spaces change


def test_a_setting_set_twice_in_different_case_is_refused() -> None:
    environ = {"AGENTA_AI_SERVICES_PLUGIN_X_KEY": "a", "agenta_ai_services_plugin_x_key": "b"}
    with pytest.raises(ValueError, match="AGENTA_AI_SERVICES_PLUGIN_X_KEY is set twice"):
        plugin_settings("x", environ)
