"""The client's first lines against the real server: the typed refine_prompt, from_env (the
environment the `aiservices` command reads, through the same reader), reads that retry by
default across a server restart, `__version__`, the JSON spelling, and the types of it all
under `mypy --strict`.

Both clients run every helper (ToolClient in a worker thread, so the event loop keeps serving).
Retry waits go through an injected sleep that records each wait, so tests assert what the
client waited for and let servers start in between, never how long the test took.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

import aiservices
from aiservices import (
    NO_RETRY,
    AsyncToolClient,
    Internal,
    InvalidArgument,
    PermissionDenied,
    PromptMessage,
    RefinedPrompt,
    SettingsError,
    TextContent,
    ToolClient,
    ToolError,
    ToolErrorInfo,
    ToolResult,
    Unavailable,
    as_json,
)
from aiservices.refine import refined_prompt
from aiservices.settings import DEFAULT_TARGET, MISSING_KEY, read_connection
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from tests.standin import Gate, Held, StandinUpstream, refine_template
from tests.standin import Status as UpstreamStatus
from tests.support.certs import TestCertificates
from tests.support.clients import Harness
from tests.support.keys import TestKeys
from tests.support.processes import REPO_ROOT, ServerProcess, upstream_settings
from tests.support.servers import ServerThread, make_settings
from tests.support.waiting import closed_port, wait_until
from tests.test_aiservices_cli import aiservices as run_command
from tests.test_aiservices_cli import command_env
from tests.test_client_resilience import Recorder

KINDS = ["sync", "aio"]
TOOL = "tools.agenta.api.refine_prompt"
TEMPLATE: dict[str, Any] = {
    "template_format": "curly",
    "llm_config": {"model": "gpt-4o-mini"},
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{company}}."},
        {"role": "user", "content": "{{question}}"},
    ],
}
EXAMPLE = Path(__file__).with_name("client_example.py")


def only_inputs(upstream: StandinUpstream) -> dict[str, Any]:
    (request,) = upstream.requests
    inputs: dict[str, Any] = request.body["inputs"]
    return inputs


# --- refine_prompt --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_refine_prompt_takes_the_template_as_an_object_and_returns_typed_messages(
    kind: str,
    no_upstream_retry_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    client = Harness(kind, no_upstream_retry_server.target, api_key=keys.editor)
    harnesses.append(client)

    refined = await client.call(
        "refine_prompt", TEMPLATE, guidelines="be concise", context="a help desk"
    )

    assert isinstance(refined, RefinedPrompt)
    expected = refine_template(json.dumps(TEMPLATE))
    assert refined.messages == tuple(PromptMessage(m["role"], m["content"]) for m in expected)
    assert refined.summary == "Tightened the wording."
    assert refined.trace_id and refined.request_id
    # Encoded once, by the client: the upstream gets the template itself, not a string of one.
    inputs = only_inputs(upstream)
    assert json.loads(inputs["__ag_prompt_template_json"]) == TEMPLATE
    assert (inputs["__ag_guidelines"], inputs["__ag_context"]) == ("be concise", "a help desk")
    assert refined.apply_to(TEMPLATE) == {**TEMPLATE, "messages": expected}
    with pytest.raises(AttributeError):
        refined.summary = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
async def test_refine_prompt_sends_a_string_template_as_written_and_its_test_cases(
    kind: str,
    no_upstream_retry_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    client = Harness(kind, no_upstream_retry_server.target, api_key=keys.editor)
    harnesses.append(client)
    text = json.dumps(TEMPLATE, indent=4)  # a file's text, spacing and all
    case = {"inputs": {"company": "Acme", "question": "Hours?"}, "expected_output": "9 to 5"}

    refined = await client.call("refine_prompt", text, test_cases=[case])

    assert [m.role for m in refined.messages] == ["system", "user"]
    inputs = only_inputs(upstream)
    assert inputs["__ag_prompt_template_json"] == text
    assert "9 to 5" in inputs["__ag_context"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_tool_error_raises_tool_error_where_call_tool_returns_it(
    kind: str,
    no_upstream_retry_server: ServerThread,
    upstream: StandinUpstream,
    keys: TestKeys,
    harnesses: list[Harness],
) -> None:
    client = Harness(kind, no_upstream_retry_server.target, api_key=keys.editor)
    harnesses.append(client)
    upstream.push(UpstreamStatus(503, headers={"Retry-After": "7"}))
    upstream.push(UpstreamStatus(503, headers={"Retry-After": "7"}))

    with pytest.raises(ToolError) as caught:
        await client.call("refine_prompt", TEMPLATE)
    result = await client.call("call_tool", TOOL, {"prompt_template_json": json.dumps(TEMPLATE)})

    failed = caught.value
    assert (failed.code, failed.retryable, failed.retry_after) == ("UPSTREAM_ERROR", True, 7.0)
    assert failed.message == "the upstream answered HTTP 503"
    assert str(failed) == "UPSTREAM_ERROR: the upstream answered HTTP 503"
    assert failed.request_id and failed.result.is_error
    assert not isinstance(failed, aiservices.ToolServiceError)  # the call itself was OK
    # call_tool stays the general path: the same failure is a result there.
    assert result.is_error and result.error is not None
    assert result.error.code == failed.code
    assert upstream.request_count == 2  # neither was retried: tool calls retry only when asked


@pytest.mark.parametrize("kind", KINDS)
async def test_refine_prompt_refusals_raise_what_call_tool_raises(
    kind: str, no_upstream_retry_server: ServerThread, keys: TestKeys, harnesses: list[Harness]
) -> None:
    editor = Harness(kind, no_upstream_retry_server.target, api_key=keys.editor)
    viewer = Harness(kind, no_upstream_retry_server.target, api_key=keys.viewer)
    harnesses.extend([editor, viewer])

    with pytest.raises(InvalidArgument) as invalid:
        await editor.call("refine_prompt", "not json")
    with pytest.raises(PermissionDenied):
        await viewer.call("refine_prompt", TEMPLATE)
    with pytest.raises(InvalidArgument) as bad_case:
        await editor.call("refine_prompt", TEMPLATE, test_cases=[{"inputs": {}}])

    assert [field for field, _ in invalid.value.field_violations] == [
        "arguments.prompt_template_json"
    ]
    assert bad_case.value.field_violations
    assert all(f.startswith("arguments.test_cases") for f, _ in bad_case.value.field_violations)


def test_a_template_json_cannot_carry_is_refused_before_sending(
    no_upstream_retry_server: ServerThread, upstream: StandinUpstream, keys: TestKeys
) -> None:
    with ToolClient(no_upstream_retry_server.target, api_key=keys.editor) as client:
        with pytest.raises(TypeError, match="template"):
            client.refine_prompt({"messages": {1, 2}})
        with pytest.raises(ValueError, match="template"):
            client.refine_prompt({"messages": [float("nan")]})
        with pytest.raises(TypeError, match="mapping or a str"):
            client.refine_prompt(b"{}")  # type: ignore[arg-type]
    assert upstream.request_count == 0


# --- from_env -------------------------------------------------------------------------------


def test_from_env_reads_the_target_and_key_and_refuses_without_a_key(
    no_upstream_retry_server: ServerThread, keys: TestKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"AISERVICES_TARGET": no_upstream_retry_server.target, "AISERVICES_API_KEY": keys.editor}
    with ToolClient.from_env(env) as client:
        assert client.status().tools[0].name == TOOL

    # Without a key: the same error, word for word, as the command's.
    with pytest.raises(SettingsError) as missing:
        ToolClient.from_env({"AISERVICES_TARGET": no_upstream_retry_server.target})
    with pytest.raises(SettingsError):
        AsyncToolClient.from_env({"AISERVICES_API_KEY": "  "})  # blank is unset
    assert str(missing.value) == MISSING_KEY
    ran = run_command("status", env=command_env(AISERVICES_TARGET=no_upstream_retry_server.target))
    assert (ran.returncode, ran.stderr) == (2, f"aiservices: {MISSING_KEY}\n")

    # Without a target: the command's default. From os.environ when no mapping is given.
    assert (
        read_connection({"AISERVICES_API_KEY": "k"}).target == DEFAULT_TARGET == "127.0.0.1:50051"
    )
    for name in [n for n in os.environ if n.startswith("AISERVICES_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AISERVICES_TARGET", no_upstream_retry_server.target)
    monkeypatch.setenv("AISERVICES_API_KEY", keys.viewer)
    with ToolClient.from_env(timeout=5.0) as client:
        assert client.status().tools == []  # the viewer's key: no tool it may call


async def test_async_from_env_passes_the_constructor_options_on(
    no_upstream_retry_server: ServerThread, keys: TestKeys
) -> None:
    env = {"AISERVICES_TARGET": no_upstream_retry_server.target, "AISERVICES_API_KEY": keys.editor}
    async with AsyncToolClient.from_env(env, metadata={"x-request-id": "from-env"}) as client:
        refined = await client.refine_prompt(TEMPLATE)
    assert refined.request_id == "from-env"


@pytest.fixture
def tls_servers(
    certs: TestCertificates, upstream: StandinUpstream
) -> Iterator[tuple[ServerThread, ServerThread]]:
    tls = make_settings(
        upstream.url, tls_cert_file=certs.server.cert_file, tls_key_file=certs.server.key_file
    )
    mtls = tls.model_copy(update={"tls_client_ca_file": certs.ca.cert_file})
    with ServerThread(tls) as one, ServerThread(mtls) as two:
        yield one, two


# Each case: which server, the TLS variables, and what both the client and the command do.
TLS_CASES = {
    "CA file": ("tls", {"AISERVICES_CA_FILE": "ca"}, "ok"),
    "no TLS variable": ("tls", {}, "unreachable"),
    "TLS with the system's CAs": ("tls", {"AISERVICES_TLS": "1"}, "unreachable"),
    "TLS to a plaintext server": ("plain", {"AISERVICES_TLS": "yes"}, "unreachable"),
    "TLS off": ("plain", {"AISERVICES_TLS": "0"}, "ok"),
    "client certificate": (
        "mtls",
        {"AISERVICES_CA_FILE": "ca", "AISERVICES_CERT_FILE": "cert", "AISERVICES_KEY_FILE": "key"},
        "ok",
    ),
    "no client certificate": ("mtls", {"AISERVICES_CA_FILE": "ca"}, "unreachable"),
    "a certificate without its key": (
        "mtls",
        {"AISERVICES_CA_FILE": "ca", "AISERVICES_CERT_FILE": "cert"},
        "AISERVICES_CERT_FILE and AISERVICES_KEY_FILE go together",
    ),
    "a missing CA file": (
        "tls",
        {"AISERVICES_CA_FILE": "/nonexistent/ca.pem"},
        "cannot read CA file /nonexistent/ca.pem (AISERVICES_CA_FILE): No such file or directory",
    ),
    "a switch that is neither": (
        "plain",
        {"AISERVICES_TLS": "maybe"},
        "AISERVICES_TLS must be 1, true, yes or on, or 0, false, no or off; got 'maybe'",
    ),
}


@pytest.mark.parametrize("case", list(TLS_CASES))
def test_from_env_and_the_command_read_the_tls_variables_alike(
    case: str,
    tls_servers: tuple[ServerThread, ServerThread],
    no_upstream_retry_server: ServerThread,
    certs: TestCertificates,
    keys: TestKeys,
) -> None:
    which, variables, expected = TLS_CASES[case]
    server = {"tls": tls_servers[0], "mtls": tls_servers[1], "plain": no_upstream_retry_server}[
        which
    ]
    files = {
        "ca": str(certs.ca.cert_file),
        "cert": str(certs.client.cert_file),
        "key": str(certs.client.key_file),
    }
    env = {
        "AISERVICES_TARGET": server.target,
        "AISERVICES_API_KEY": keys.editor,
        **{name: files.get(value, value) for name, value in variables.items()},
    }

    def library() -> str:
        try:
            with ToolClient.from_env(env, retry=NO_RETRY, timeout=5.0) as client:
                return "ok" if client.status().tools else "no tools"
        except Unavailable:
            return "unreachable"
        except SettingsError as exc:
            return str(exc)

    ran = run_command("status", env=command_env(**env))
    command = {0: "ok", 4: "unreachable"}.get(
        ran.returncode, ran.stderr.removeprefix("aiservices: ").strip()
    )

    assert library() == command == expected, ran.stderr


# --- reads retry by default -------------------------------------------------------------------


def _sigterm(process: ServerProcess) -> None:
    os.kill(process.pid, signal.SIGTERM)


@pytest.mark.parametrize("read", ["status", "list_tools", "list_tools_page"])
@pytest.mark.parametrize("kind", KINDS)
async def test_reads_retry_across_a_server_restart_without_a_policy(
    kind: str, read: str, upstream: StandinUpstream, keys: TestKeys, harnesses: list[Harness]
) -> None:
    """A replica restarts under a caller: while it drains it refuses new calls with
    UNAVAILABLE and a RetryInfo delay (SHUTTING_DOWN), then nothing listens, then a new process
    serves on the same port. A read the caller sends then, with no policy, waits the server's
    delay and gets its answer from the new process."""
    env = {"API_KEYS_FILE": str(keys.path), **upstream_settings(upstream.url)}
    first = ServerProcess(env, name="first").start()
    second = ServerProcess({**env, "GRPC_ADDRESS": f"127.0.0.1:{first.port}"}, name="second")
    gate = Gate()

    def restart() -> None:
        """The old process finishes its call and exits by itself (a second SIGTERM would cut
        its drain short); the new one starts."""
        gate.open()
        assert wait_until(lambda: not first.running, 15), "the old process never exited"
        assert first.terminate(15) == 0
        second.start()

    restarter = threading.Thread(target=restart, name="restart")

    def at_first_wait() -> None:
        # Off the caller's thread (and event loop), which goes on retrying meanwhile.
        if restarter.ident is None:
            restarter.start()

    sleep = Recorder(scale=1.0, before=at_first_wait)
    client = Harness(kind, first.target, api_key=keys.editor, **sleep.sleep_for(kind))
    harnesses.append(client)
    try:
        upstream.push(Held(gate))
        held = asyncio.ensure_future(
            client.call("call_tool", TOOL, {"prompt_template_json": json.dumps(TEMPLATE)})
        )
        assert await asyncio.to_thread(upstream.wait_for_requests, 1, 10)
        _sigterm(first)  # drains: the held call keeps the old process up, refusing new calls
        assert await asyncio.to_thread(
            first.wait_for_record, lambda r: r.get("msg") == "draining", 10
        )

        # No policy: the read's default, within a timeout that leaves a slow machine room.
        answer = await client.call(read, timeout=30.0)

        assert not (await held).is_error  # the call in flight finished on the old process
    finally:
        gate.open()
        if restarter.ident is not None:
            await asyncio.to_thread(restarter.join, 30)
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(second.close)
    tools = answer if read == "list_tools" else answer.tools
    assert [tool.name for tool in tools][:1] == [TOOL]
    assert second.port == first.port
    # The first wait is the drain's RetryInfo (1 s), not the shorter backoff.
    assert sleep.waits[0] >= 1.0
    served = [r for r in second.records if r.get("method", "").endswith(("GetStatus", "ListTools"))]
    assert served and served[-1].get("code") == "OK"


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_calls_and_no_retry_reads_are_sent_once(
    kind: str, keys: TestKeys, harnesses: list[Harness]
) -> None:
    sleep = Recorder()
    target = f"127.0.0.1:{closed_port()}"
    client = Harness(kind, target, api_key=keys.editor, **sleep.sleep_for(kind))
    harnesses.append(client)

    with pytest.raises(Unavailable):
        await client.call("call_tool", TOOL, {"prompt_template_json": "{}"})
    with pytest.raises(Unavailable):
        await client.call("refine_prompt", TEMPLATE)
    with pytest.raises(Unavailable):
        await client.call("status", retry=NO_RETRY)
    assert sleep.waits == []

    # A client-wide NO_RETRY turns the reads' default off too.
    once = Harness(kind, target, api_key=keys.editor, retry=NO_RETRY, **sleep.sleep_for(kind))
    harnesses.append(once)
    with pytest.raises(Unavailable):
        await once.call("list_tools")
    assert sleep.waits == []


@pytest.mark.parametrize("kind", KINDS)
async def test_a_read_that_finds_no_server_retries_within_its_timeout(
    kind: str, keys: TestKeys, harnesses: list[Harness]
) -> None:
    sleep = Recorder()  # records the waits without making them: the attempts come back to back
    client = Harness(
        kind, f"127.0.0.1:{closed_port()}", api_key=keys.editor, **sleep.sleep_for(kind)
    )
    harnesses.append(client)

    with pytest.raises(Unavailable):
        await client.call("status", timeout=2.0)

    assert len(sleep.waits) == aiservices.READ_RETRY.max_attempts - 1
    assert all(0 <= wait <= aiservices.READ_RETRY.max_backoff for wait in sleep.waits)


async def test_with_grpc_retries_the_client_adds_none_of_its_own(keys: TestKeys) -> None:
    sleep = Recorder()
    async with AsyncToolClient(
        f"127.0.0.1:{closed_port()}", api_key=keys.editor, grpc_retry_attempts=3, sleep=sleep.aio
    ) as client:
        with pytest.raises(Unavailable):
            await client.status(timeout=2.0)
    assert sleep.waits == []  # one retry layer, never two


# --- version and JSON ---------------------------------------------------------------------------


def test_the_version_is_the_distributions() -> None:
    declared = tomllib.loads((REPO_ROOT / "clients" / "pyproject.toml").read_text())
    assert aiservices.__version__ == version("aiservices-client")
    assert aiservices.__version__ == declared["project"]["version"]
    assert run_command("--version").stdout == f"aiservices {aiservices.__version__}\n"
    # Imported from a tree that was never installed, it still imports, with a version pip
    # would read as "not a release".
    not_installed = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "def version(name):\n"
        "    if name == 'aiservices-client':\n"
        "        raise m.PackageNotFoundError(name)\n"
        "    return real(name)\n"
        "m.version = version\n"
        "import aiservices\n"
        "print(aiservices.__version__)\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", not_installed], capture_output=True, text=True, check=True
    )
    assert ran.stdout == "0+unknown\n"


def test_json_field_names_are_protobufs_json_names(
    no_upstream_retry_server: ServerThread, keys: TestKeys
) -> None:
    """What the client and the command print for GetStatus is what protobuf's JSON mapping
    (grpcurl, buf curl) prints for the same response, key for key."""
    with grpc.insecure_channel(no_upstream_retry_server.target) as channel:
        response = pb_grpc.ToolServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), metadata=(("authorization", f"Bearer {keys.editor}"),)
        )
    by_protobuf = json_format.MessageToDict(response)
    with ToolClient(no_upstream_retry_server.target, api_key=keys.editor) as client:
        by_client = as_json(client.status())
    by_command = json.loads(
        run_command(
            "status",
            "--json",
            env=command_env(
                AISERVICES_TARGET=no_upstream_retry_server.target, AISERVICES_API_KEY=keys.editor
            ),
        ).stdout
    )
    assert by_client == by_protobuf == by_command
    assert "inputSchema" in by_client["tools"][0]
    # Data keeps its own keys: the schema's `additionalProperties` is not a field name.
    assert "additionalProperties" in by_client["tools"][0]["inputSchema"]


def test_a_refined_prompt_prints_in_the_same_spelling() -> None:
    refined = RefinedPrompt((PromptMessage("user", "Hi {{name}}"),), "Shorter.", "t-1", "r-1")
    assert as_json(refined) == {
        "messages": [{"role": "user", "content": "Hi {{name}}"}],
        "summary": "Shorter.",
        "traceId": "t-1",
        "requestId": "r-1",
    }


# --- types ---------------------------------------------------------------------------------------

MISUSES = """\
from aiservices import ToolClient

with ToolClient.from_env() as client:
    refined = client.refine_prompt({"messages": []})
    print(refined.messages[0].text)
    print(refined.summary + 1)
    client.refine_prompt({"messages": []}, guidelines=["a list"])
"""


def test_the_example_type_checks_strictly_and_runs(
    no_upstream_retry_server: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    misuse = tmp_path / "misuse.py"
    misuse.write_text(MISUSES)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(EXAMPLE),
            str(misuse),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = checked.stdout.splitlines()
    assert not [line for line in errors if line.startswith(str(EXAMPLE))], checked.stdout
    # The helpers are typed, not Any: each misuse is caught.
    found = "\n".join(errors)
    assert '"PromptMessage" has no attribute "text"' in found, found
    assert 'Unsupported operand types for + ("str" and "int")' in found, found
    assert 'Argument "guidelines" to "refine_prompt" of "ToolClient"' in found, found

    env = command_env(
        AISERVICES_TARGET=no_upstream_retry_server.target, AISERVICES_API_KEY=keys.editor
    )
    ran = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    shown = json.loads(ran.stdout)
    assert shown["version"] == aiservices.__version__
    assert shown["blocking"]["enabled"] is True
    assert shown["blocking"]["summary"] == "Tightened the wording."
    assert shown["blocking"]["kept"] == ["template_format"]
    assert shown["blocking"]["refused"] == [["arguments.prompt_template_json", "is not valid JSON"]]
    assert shown["blocking"]["sameAsCallTool"] is True
    assert shown["async"] == {
        "upstream": "agenta",
        "messages": 2,
        "traceId": True,
        "failure": "INVALID_ARGUMENT",
    }


# --- outside input: the environment and the server's result -----------------------------------

SECRET = "ais_secret-key-0123456789"
VARIABLES = (
    "AISERVICES_TARGET",
    "AISERVICES_TLS",
    "AISERVICES_CA_FILE",
    "AISERVICES_CERT_FILE",
    "AISERVICES_KEY_FILE",
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(VARIABLES), st.text(max_size=300)), st.booleans())
def test_any_environment_is_a_connection_or_one_line_naming_the_setting(
    variables: dict[str, str], with_key: bool
) -> None:
    env = {**variables, **({"AISERVICES_API_KEY": SECRET} if with_key else {})}
    try:
        connection = read_connection(env)
    except SettingsError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message and message.isprintable()
        assert SECRET not in message
        assert any(name in message for name in (*VARIABLES, "AISERVICES_API_KEY")), message
        return
    assert with_key and connection.api_key == SECRET
    assert SECRET not in repr(connection)
    assert connection.target == (variables.get("AISERVICES_TARGET", "").strip() or DEFAULT_TARGET)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
MESSAGE = st.fixed_dictionaries({"role": st.text(max_size=10), "content": st.text(max_size=30)})


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=10), JSON, max_size=4),
        st.fixed_dictionaries(
            {"messages": st.lists(MESSAGE | JSON, max_size=4), "summary": JSON | st.text()}
        ),
    ),
    st.booleans(),
)
def test_any_result_is_a_refined_prompt_a_tool_error_or_internal(
    structured: dict[str, Any] | None, is_error: bool
) -> None:
    result = ToolResult(
        content=[TextContent("text")],
        structured_content=structured,
        is_error=is_error,
        trace_id="t",
        request_id="r",
        error=ToolErrorInfo("UPSTREAM_ERROR", "down", True, 2.0) if is_error else None,
    )
    try:
        refined = refined_prompt(result)
    except ToolError as failed:
        assert is_error and failed.code == "UPSTREAM_ERROR" and failed.retry_after == 2.0
        return
    except Internal as broken:
        assert not is_error and "output schema" in broken.message
        return
    assert not is_error and structured is not None
    assert [m.__dict__ for m in refined.messages] == structured["messages"]
    assert refined.summary == structured["summary"]
