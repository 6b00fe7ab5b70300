"""The installed `aiservices` command against the real server, run as a person or a script would.

Every run goes through the console script next to this interpreter; a module-scoped server and
stand-in upstream serve the tests that do not need their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import grpc
import grpc.aio
import pytest

from aiservices import ToolClient, ToolServiceError, dict_to_struct
from aiservices._cli.output import refusal_line
from aiservices.cli import MAX_TOOLS_PAGE_BYTES
from aiservices.client import MAX_LISTING_BYTES, MAX_LISTING_TOOLS
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from tests.standin import Hang, Slow, StandinUpstream
from tests.standin import Status as UpstreamStatus
from tests.standin.app import refine_template
from tests.support.certs import TestCertificates
from tests.support.keys import TestKeys, load_test_keys
from tests.support.servers import UPSTREAM_KEY, ServerThread, make_settings
from tests.support.waiting import closed_port

AISERVICES = Path(sys.executable).parent / "aiservices"
TOOL = "tools.agenta.api.refine_prompt"
TEMPLATE = {
    "template_format": "curly",
    "llm_config": {"model": "gpt-4o-mini"},
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{company}}."},
        {"role": "user", "content": "{{question}}"},
    ],
}


@pytest.fixture(scope="module")
def standin() -> Iterator[StandinUpstream]:
    upstream = StandinUpstream(api_key=UPSTREAM_KEY)
    upstream.start_in_thread()
    yield upstream
    upstream.stop_thread()


@pytest.fixture(scope="module")
def service(standin: StandinUpstream) -> Iterator[ServerThread]:
    # One retry would turn a single queued upstream failure into a success.
    with ServerThread(make_settings(standin.url, upstream_retries=0)) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh_upstream(request: pytest.FixtureRequest) -> None:
    if "standin" in request.fixturenames:
        request.getfixturevalue("standin").clear()


def command_env(**values: str) -> dict[str, str]:
    """This environment without any AISERVICES_* setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AISERVICES_")}
    env.update(values)
    return env


def aiservices(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed command; no run may print a traceback or any test key."""
    ran = subprocess.run(
        [str(AISERVICES), *args],
        env=dict(env) if env is not None else command_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    keys = load_test_keys()
    secrets = [getattr(keys, name) for name in TestKeys.__dataclass_fields__ if name != "path"]
    for output in (ran.stdout, ran.stderr):
        assert "Traceback" not in output
        assert not any(secret in output for secret in secrets)
    return ran


def as_caller(
    service: ServerThread, key: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`aiservices ARGS` with the target and key from the environment, as a script sets them."""
    env = command_env(AISERVICES_TARGET=service.target, AISERVICES_API_KEY=key)
    return aiservices(*args, env=env, stdin=stdin)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def write_template(directory: Path) -> Path:
    path = directory / "prompt.json"
    path.write_text(json.dumps(TEMPLATE, indent=2))
    return path


# --- output -----------------------------------------------------------------------------------


def test_version_and_help_with_examples_and_exit_codes() -> None:
    shown = aiservices("--version")
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"aiservices {version('aiservices-client')}"
    helped = aiservices("refine", "--help")
    assert helped.returncode == 0
    assert "aiservices refine prompt.json -o prompt.refined.json" in helped.stdout
    assert "130  interrupted" in helped.stdout


def test_status_and_tools_for_people_and_as_json(service: ServerThread, keys: TestKeys) -> None:
    status = as_caller(service, keys.editor, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == ["enabled   yes", "upstream  agenta", f"tools     {TOOL}"]

    as_json = json.loads(as_caller(service, keys.editor, "status", "--json").stdout)
    assert as_json["enabled"] is True
    assert [tool["name"] for tool in as_json["tools"]] == [TOOL]

    table = as_caller(service, keys.editor, "tools").stdout.splitlines()
    assert table[0].split() == ["NAME", "TITLE", "HINTS"]
    assert table[1].startswith(f"{TOOL}  Refine prompt  read-only, open-world")

    tools = json.loads(as_caller(service, keys.editor, "--json", "tools").stdout)
    assert [(tool["name"], tool["title"]) for tool in tools] == [(TOOL, "Refine prompt")]
    # Field names as grpcurl, buf and MCP spell them; the schema itself is data, kept as sent.
    assert tools[0]["inputSchema"]["required"] == ["prompt_template_json"]
    assert tools[0]["annotations"]["readOnlyHint"] is True
    assert "input_schema" not in tools[0]


def test_flags_win_over_the_environment(
    service: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(keys.editor + "\n")
    # Both the environment's target (nothing listens) and key (no tool permission) are wrong.
    env = command_env(
        AISERVICES_TARGET=f"127.0.0.1:{closed_port()}", AISERVICES_API_KEY=keys.viewer
    )
    ran = aiservices("status", "--target", service.target, "--api-key-file", str(key_file), env=env)
    assert ran.returncode == 0, ran.stderr
    assert f"tools     {TOOL}" in ran.stdout

    on_argv = aiservices("--target", service.target, "--api-key", keys.editor, "tools", env=env)
    assert on_argv.returncode == 0, on_argv.stderr
    assert TOOL in on_argv.stdout


# --- call and refine --------------------------------------------------------------------------


def test_call_reads_arguments_from_a_file_or_stdin(
    service: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    arguments = {"prompt_template_json": json.dumps(TEMPLATE)}
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(arguments))
    refined = refine_template(json.dumps(TEMPLATE))

    ran = as_caller(service, keys.editor, "call", TOOL, "--args", f"@{args_file}")
    assert ran.returncode == 0, ran.stderr
    summary, _, structured = ran.stdout.partition("\n")
    assert summary == "Tightened the wording."
    assert json.loads(structured) == {"messages": refined, "summary": summary}

    piped = as_caller(
        service, keys.editor, "call", TOOL, "--args", "@-", "--json", stdin=json.dumps(arguments)
    )
    assert piped.returncode == 0, piped.stderr
    result = json.loads(piped.stdout)
    assert result["isError"] is False
    assert result["structuredContent"]["messages"] == refined
    assert result["content"] == [{"type": "text", "text": "Tightened the wording."}]
    assert result["traceId"] and result["requestId"]
    assert not any("_" in key for key in result)


def test_refine_prints_a_diff_per_message_and_the_summary(
    service: ServerThread, standin: StandinUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    ran = as_caller(service, keys.editor, "refine", str(template), "--guidelines", "be brief")
    assert ran.returncode == 0, ran.stderr
    [system, user] = refine_template(json.dumps(TEMPLATE))
    lines = ran.stdout.splitlines()
    assert lines[:2] == ["--- message 1 (system)", "+++ message 1 (system, refined)"]
    assert f"-{TEMPLATE['messages'][0]['content']}" in lines  # type: ignore[index]
    assert f"+{system['content']}" in lines
    assert "+++ message 2 (user, refined)" in lines
    assert f"+{user['content']}" in lines
    assert lines[-1] == "summary: Tightened the wording."
    [sent] = standin.requests
    assert sent.body["inputs"]["__ag_guidelines"] == "be brief"
    assert json.loads(sent.body["inputs"]["__ag_prompt_template_json"]) == TEMPLATE


def test_refine_writes_the_refined_template_and_prints_the_raw_result(
    service: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    output = tmp_path / "refined.json"
    ran = as_caller(service, keys.editor, "refine", str(template), "-o", str(output), "--json")
    assert ran.returncode == 0, ran.stderr
    refined = refine_template(json.dumps(TEMPLATE))
    assert json.loads(ran.stdout)["structuredContent"]["messages"] == refined
    assert json.loads(output.read_text()) == {**TEMPLATE, "messages": refined}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.json", "refined.json"]


def test_refine_output_gets_the_permissions_of_a_file_written_in_place(
    service: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    fresh, existing = tmp_path / "fresh.json", tmp_path / "existing.json"
    existing.write_text("{}")
    existing.chmod(0o640)
    umask = os.umask(0o022)  # what the command inherits
    try:
        for output in (fresh, existing):
            # The key no other test here uses, so the module's rate budgets stay as they were.
            ran = as_caller(service, keys.full, "refine", str(template), "-o", str(output))
            assert ran.returncode == 0, ran.stderr
    finally:
        os.umask(umask)
    # Readable by others as any new file is (umask 022), and an existing file keeps its mode.
    assert fresh.stat().st_mode & 0o777 == 0o644
    assert existing.stat().st_mode & 0o777 == 0o640


def test_refine_output_through_a_symbolic_link_replaces_the_file_it_points_to(
    service: ServerThread, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    target = tmp_path / "prompts" / "refined.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "current.json"
    link.symlink_to(target)
    ran = as_caller(service, keys.full, "refine", str(template), "-o", str(link))
    assert ran.returncode == 0, ran.stderr
    assert link.is_symlink()
    assert json.loads(target.read_text())["messages"] == refine_template(json.dumps(TEMPLATE))


def test_a_tool_error_exits_1_with_one_line(
    service: ServerThread, standin: StandinUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    output = tmp_path / "refined.json"
    standin.push(UpstreamStatus(503, headers={"Retry-After": "7"}))
    ran = as_caller(service, keys.editor, "refine", str(template), "-o", str(output))
    assert ran.returncode == 1
    assert ran.stdout == ""
    line = one_line(ran.stderr)
    assert line.startswith("aiservices: tool error UPSTREAM_ERROR: ")
    assert line.endswith("; retryable, retry after 7 s")
    assert not output.exists()

    standin.push(UpstreamStatus(400))
    as_json = as_caller(service, keys.editor, "refine", str(template), "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"]["code"] == "UPSTREAM_ERROR"
    # With --json the error on stderr is one JSON object too.
    assert json.loads(one_line(as_json.stderr)) == {
        "error": {
            "kind": "tool_error",
            "code": "UPSTREAM_ERROR",
            "message": "the upstream answered HTTP 400",
            "retryable": False,
            "exitCode": 1,
        }
    }


# --- refusals, unreachable, usage -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "args", "expected", "hint"),
    [
        (
            None,
            ["status"],
            "aiservices: UNAUTHENTICATED: ",
            "; check --api-key, --api-key-file or AISERVICES_API_KEY",
        ),
        (
            "viewer",
            ["call", TOOL, "--args", '{"prompt_template_json": "{}"}'],
            "aiservices: PERMISSION_DENIED: ",
            "; the key lacks the permission edit_workflows",
        ),
        (
            "editor",
            ["call", TOOL, "--args", '{"prompt_template_json": "not json"}'],
            "aiservices: INVALID_ARGUMENT: ",
            "; arguments.prompt_template_json: ",
        ),
        (
            "editor",
            ["call", "tools.nope"],
            "aiservices: NOT_FOUND (TOOL_NOT_FOUND): ",
            "tools.nope",
        ),
    ],
)
def test_a_refused_call_exits_3_with_one_line(
    service: ServerThread,
    keys: TestKeys,
    key: str | None,
    args: list[str],
    expected: str,
    hint: str,
) -> None:
    api_key = "ais_not-a-key-anyone-issued" if key is None else getattr(keys, key)
    ran = as_caller(service, api_key, *args)
    assert ran.returncode == 3
    line = one_line(ran.stderr)
    assert line.startswith(expected)
    assert hint in line


def test_a_key_a_header_cannot_carry_is_a_usage_error(
    service: ServerThread, tmp_path: Path
) -> None:
    # Two keys pasted into one file: sent as is, every call would fail as INTERNAL.
    key_file = tmp_path / "key"
    key_file.write_text("ais_first-key-of-two\nais_second-key-of-two\n")
    env = command_env(AISERVICES_TARGET=service.target)
    ran = aiservices("--api-key-file", str(key_file), "status", env=env)
    assert ran.returncode == 2
    line = one_line(ran.stderr)
    assert line.startswith("aiservices: api_key has characters a gRPC header cannot carry")
    assert "first-key" not in line


def test_a_rate_limited_call_says_when_to_retry(service: ServerThread, keys: TestKeys) -> None:
    arguments = {"prompt_template_json": json.dumps(TEMPLATE)}
    with ToolClient(service.target, api_key=keys.tiered, timeout=10) as client:
        for _ in range(3):  # the tiered key's burst
            assert not client.call_tool(TOOL, arguments).is_error
    ran = as_caller(service, keys.tiered, "call", TOOL, "--args", json.dumps(arguments))
    assert ran.returncode == 3
    line = one_line(ran.stderr)
    assert line.startswith("aiservices: RESOURCE_EXHAUSTED (RATE_LIMIT_EXCEEDED): ")
    assert line.endswith("; retry after 1 s")


def test_an_internal_error_shows_its_support_id() -> None:
    err = ToolServiceError(
        grpc.StatusCode.INTERNAL,
        "unexpected error (support id 4f2a)",
        reason="INTERNAL",
        error_metadata={"support_id": "4f2a"},
    )
    assert refusal_line(err, "x:1") == (
        "aiservices: INTERNAL: unexpected error (support id 4f2a); support id 4f2a"
    )


def test_an_unreachable_or_silent_service_exits_4(
    service: ServerThread, standin: StandinUpstream, keys: TestKeys
) -> None:
    down = aiservices(
        "--target", f"127.0.0.1:{closed_port()}", "--api-key", "k", "--timeout", "5", "status"
    )
    assert down.returncode == 4
    assert one_line(down.stderr).startswith("aiservices: cannot reach 127.0.0.1:")

    standin.push(Hang())
    arguments = json.dumps({"prompt_template_json": json.dumps(TEMPLATE)})
    late = as_caller(service, keys.editor, "--timeout", "0.5", "call", TOOL, "--args", arguments)
    assert late.returncode == 4
    assert one_line(late.stderr).startswith("aiservices: DEADLINE_EXCEEDED")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", TOOL, "--args", "{not json"], "aiservices: --args is not valid JSON: "),
        (["call", TOOL, "--args", "[1]"], "aiservices: --args must be a JSON object, not list"),
        (
            ["call", TOOL, "--args", '{"a": ' + "[" * 100_000],
            "aiservices: --args is not valid JSON: nested too deeply",
        ),
        (["call", TOOL, "--args", "@missing.json"], "aiservices: cannot read --args file "),
        (["refine", "missing.json"], "aiservices: cannot read template missing.json: "),
        (["refine", "-"], "aiservices: stdin is not valid JSON: "),
        (["--cert-file", "c.pem", "status"], "aiservices: --cert-file and --key-file go together"),
        (
            ["--api-key", "k", "status", "--api-key-file", "k.txt"],
            "aiservices: argument --api-key: not allowed with argument --api-key-file",
        ),
        (["--timeout", "0", "status"], "aiservices: argument --timeout: must be a positive"),
        (["frobnicate"], "aiservices: argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    # Nothing listens on the target: a usage error is found before any call is made.
    env = command_env(AISERVICES_TARGET=f"127.0.0.1:{closed_port()}", AISERVICES_API_KEY="k")
    ran = aiservices(*args, env=env, stdin="{'not': 'json'}")
    assert ran.returncode == 2
    assert one_line(ran.stderr).startswith(message)
    assert ran.stdout == ""


def test_test_cases_a_call_cannot_carry_are_a_usage_error(tmp_path: Path) -> None:
    env = command_env(AISERVICES_TARGET=f"127.0.0.1:{closed_port()}", AISERVICES_API_KEY="k")
    template = write_template(tmp_path)
    cases = tmp_path / "cases.json"
    cases.write_text('[{"inputs": {"n": 12345678901234567890}, "expected_output": "x"}]')
    ran = aiservices("refine", str(template), "--test-cases", str(cases), env=env)
    assert ran.returncode == 2
    assert one_line(ran.stderr) == (
        f"aiservices: --test-cases file {cases}: $.test_cases[0].inputs.n: integer "
        "12345678901234567890 is too large to send exactly (max 2**53)"
    )
    cases.write_text("[" * 100_000)
    ran = aiservices("refine", str(template), "--test-cases", str(cases), env=env)
    assert ran.returncode == 2
    assert one_line(ran.stderr) == (
        f"aiservices: --test-cases file {cases} is not valid JSON: nested too deeply"
    )


def test_no_api_key_is_refused_before_anything_is_sent() -> None:
    env = command_env(AISERVICES_TARGET=f"127.0.0.1:{closed_port()}")
    ran = aiservices("status", env=env)
    assert (ran.returncode, ran.stdout) == (2, "")
    assert one_line(ran.stderr) == (
        "aiservices: no API key: set AISERVICES_API_KEY (the aiservices command also takes "
        "--api-key or --api-key-file); a server with authentication disabled takes any key"
    )


def test_with_json_every_error_is_one_json_object(service: ServerThread) -> None:
    unreachable = f"127.0.0.1:{closed_port()}"
    usage = aiservices(
        "--json", "call", TOOL, "--args", "[1]", env=command_env(AISERVICES_API_KEY="k")
    )
    assert json.loads(usage.stderr) == {
        "error": {
            "kind": "usage",
            "message": "--args must be a JSON object, not list",
            "exitCode": 2,
        }
    }
    assert usage.returncode == 2
    bad_flag = aiservices("status", "--json", "--nope", env=command_env())
    assert json.loads(bad_flag.stderr)["error"]["kind"] == "usage"

    refused = as_caller(service, "ais_not-a-key-anyone-issued", "status", "--json")
    assert refused.returncode == 3
    error = json.loads(refused.stderr)["error"]
    assert (error["kind"], error["status"], error["exitCode"]) == ("refused", "UNAUTHENTICATED", 3)
    assert error["hints"] == ["check --api-key, --api-key-file or AISERVICES_API_KEY"]

    down = aiservices(
        "--target", unreachable, "--api-key", "k", "--timeout", "5", "--json", "status"
    )
    assert down.returncode == 4
    error = json.loads(down.stderr)["error"]
    assert (error["kind"], error["status"], error["exitCode"]) == ("unreachable", "UNAVAILABLE", 4)


# --- TLS --------------------------------------------------------------------------------------


def test_tls_and_mtls_flags(
    certs: TestCertificates, standin: StandinUpstream, keys: TestKeys
) -> None:
    tls = make_settings(
        standin.url, tls_cert_file=certs.server.cert_file, tls_key_file=certs.server.key_file
    )
    with ServerThread(tls) as server:
        trusted = as_caller(server, keys.editor, "--ca-file", str(certs.ca.cert_file), "status")
        assert trusted.returncode == 0, trusted.stderr
        assert "enabled   yes" in trusted.stdout
        plaintext = as_caller(server, keys.editor, "--timeout", "5", "status")
        assert plaintext.returncode == 4
        line = one_line(plaintext.stderr)
        assert line.startswith("aiservices: cannot reach ")
        assert line.endswith("; the server may expect TLS: add --tls (and --ca-file for its CA)")
        untrusted = as_caller(server, keys.editor, "--tls", "--timeout", "5", "status")
        assert untrusted.returncode == 4
        assert one_line(untrusted.stderr).endswith(
            "; the server's certificate is not trusted: pass --ca-file with the CA that signed it"
        )

    mtls = tls.model_copy(update={"tls_client_ca_file": certs.ca.cert_file})
    with ServerThread(mtls) as server:
        ran = as_caller(
            server,
            keys.editor,
            "--ca-file",
            str(certs.ca.cert_file),
            "--cert-file",
            str(certs.client.cert_file),
            "--key-file",
            str(certs.client.key_file),
            "tools",
        )
        assert ran.returncode == 0, ran.stderr
        assert TOOL in ran.stdout


# --- while a call runs ------------------------------------------------------------------------


def read_until_exit(process: subprocess.Popen[bytes], master: int) -> str:
    """Everything written to the pseudo-terminal until the process exits and closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every copy of the slave side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=30)
    return b"".join(chunks).decode(errors="replace")


def test_the_elapsed_line_shows_on_a_terminal_only(
    service: ServerThread, standin: StandinUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    env = command_env(AISERVICES_TARGET=service.target, AISERVICES_API_KEY=keys.editor)
    standin.push(Slow(2.0))
    master, slave = os.openpty()
    with subprocess.Popen(
        [str(AISERVICES), "refine", str(template)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=slave,
    ) as process:
        os.close(slave)
        terminal = read_until_exit(process, master)
        assert process.stdout is not None
        stdout = process.stdout.read().decode()
    os.close(master)
    assert process.returncode == 0
    assert "refining: 1." in terminal and " s elapsed" in terminal
    assert terminal.endswith("\r\x1b[2K")  # cleared when the call ended
    assert "summary: Tightened the wording." in stdout
    assert "elapsed" not in stdout

    standin.push(Slow(2.0))
    piped = aiservices("refine", str(template), env=env)
    assert piped.returncode == 0
    assert piped.stderr == ""


def spawn_in_the_foreground(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `command` as a shell starts a foreground command, with SIGINT at its default.

    A shell starts background jobs with SIGINT ignored (so Ctrl-C spares them), children inherit
    that, and Python then installs no KeyboardInterrupt handler: under `make test &` the command
    would never see the Ctrl-C this test sends. A handled signal is reset to its default by exec,
    so the child starts with SIGINT as a foreground command has it, whatever this process has.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_exits_130_with_one_line(
    service: ServerThread, standin: StandinUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    template = write_template(tmp_path)
    env = command_env(AISERVICES_TARGET=service.target, AISERVICES_API_KEY=keys.editor)
    standin.push(Hang())
    with spawn_in_the_foreground([str(AISERVICES), "refine", str(template)], env) as process:
        assert standin.wait_for_requests(1, timeout=30)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert (process.returncode, stderr, stdout) == (130, "aiservices: interrupted\n", "")


def test_a_reader_that_goes_away_is_not_an_error(service: ServerThread, keys: TestKeys) -> None:
    # `aiservices tools | head -0`: the read end is closed before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        ran = subprocess.run(
            [str(AISERVICES), "tools"],
            env=command_env(AISERVICES_TARGET=service.target, AISERVICES_API_KEY=keys.editor),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (ran.returncode, ran.stderr) == (0, "")


def test_a_hostile_message_cannot_reach_the_terminal_as_control_characters() -> None:
    error = ToolServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, "bad\x1b[2J\x1b]0;pwned\x07 input\r\nsecond line"
    )
    line = refusal_line(error, "127.0.0.1:50051")
    assert line.isprintable()
    assert line.endswith("bad [2J ]0;pwned input second line")


def test_a_field_name_echoed_in_an_error_cannot_break_its_line(
    service: ServerThread, keys: TestKeys
) -> None:
    arguments = {"prompt_template_json": "{}", "bad\nkey\x1b[31m": 1}
    ran = as_caller(service, keys.full, "call", TOOL, "--args", json.dumps(arguments))
    assert ran.returncode == 3
    line = one_line(ran.stderr)
    assert line.isprintable()
    assert "arguments.bad key [31m: unknown argument" in line


def test_model_output_cannot_drive_the_terminal(tmp_path: Path) -> None:
    # The real server refuses such model output (INVALID_MODEL_OUTPUT); one that does not must
    # still not reach the terminal through the command.
    hostile = "Done.\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil"
    template = write_template(tmp_path)
    service = HostileToolService(summary=hostile)

    with hostile_server(service) as target:
        shown = aiservices("--target", target, "--api-key", "k", "refine", str(template))
        raw = aiservices("--target", target, "--api-key", "k", "refine", str(template), "--json")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.isascii()
    assert shown.stdout.splitlines()[-1] == (
        "summary: Done.\\u001b]0;owned\\u0007\\u001b[2J\\u009b31m\\u202eevil"
    )
    # Machine output keeps the text exactly, as valid JSON.
    assert raw.stdout.isascii()
    assert json.loads(raw.stdout)["structuredContent"]["summary"] == hostile


def test_tls_against_a_plaintext_server_is_one_line_without_grpc_logs(
    service: ServerThread, keys: TestKeys
) -> None:
    ran = as_caller(service, keys.full, "--tls", "--timeout", "5", "status")
    assert ran.returncode == 4
    line = one_line(ran.stderr)
    assert line.startswith(f"aiservices: cannot reach {service.target}: ")
    assert line.endswith("; the server does not speak TLS: leave out --tls and --ca-file")


# --- a hostile server -------------------------------------------------------------------------

MiB = 1024 * 1024
# The command itself takes about 40 MB; before its listing was bounded, the listings below took
# 1 to 2.2 GB before they stopped.
PEAK_RSS_LIMIT = 150 * MiB


class HostileToolService(pb_grpc.ToolServiceServicer):
    """ListTools (and GetStatus): the same page, with a next cursor, forever. CallTool:
    `summary` as the result, the template's messages unchanged."""

    def __init__(self, page: list[pb.Tool] | None = None, summary: str = "") -> None:
        self.page = page or []
        self.summary = summary
        self.pages = 0

    async def GetStatus(
        self,
        request: pb.GetStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetStatusRequest, pb.GetStatusResponse],
    ) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(enabled=True, tools=self.page)

    async def ListTools(
        self,
        request: pb.ListToolsRequest,
        context: grpc.aio.ServicerContext[pb.ListToolsRequest, pb.ListToolsResponse],
    ) -> pb.ListToolsResponse:
        self.pages += 1
        return pb.ListToolsResponse(tools=self.page, next_cursor=f"page-{self.pages}")

    async def CallTool(
        self,
        request: pb.CallToolRequest,
        context: grpc.aio.ServicerContext[pb.CallToolRequest, pb.CallToolResponse],
    ) -> pb.CallToolResponse:
        messages = TEMPLATE["messages"]
        return pb.CallToolResponse(
            content=[pb.ContentBlock(text=pb.TextContent(text=self.summary))],
            structured_content=dict_to_struct({"messages": messages, "summary": self.summary}),
        )


@contextmanager
def hostile_server(service: HostileToolService) -> Iterator[str]:
    """`service` on a free loopback port, in a thread with its own event loop; yields its
    target."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 * MiB)])
        pb_grpc.add_ToolServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    try:
        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# Starts the command from a small process of its own and writes the command's peak RSS (KiB)
# to the file named first. Started from pytest itself, the command would report pytest's size
# at the least: a process keeps the peak of the one it was forked from across exec.
MEASURE = (
    "import os, sys; "
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
    "_, status, usage = os.wait4(pid, 0); "
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)


def run_measured(
    directory: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], int, float]:
    """Run the command; return what it printed, its peak RSS in bytes and the seconds taken."""
    peak = directory / "peak-rss-kib"
    started = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-I", "-c", MEASURE, str(peak), str(AISERVICES), *args],
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    took = time.monotonic() - started
    assert "Traceback" not in ran.stderr
    return ran, int(peak.read_text()) * 1024, took


def described(size: int) -> list[pb.Tool]:
    return [pb.Tool(name="tools.hostile.big", description="x" * size)]


BIG_PAGE = described(15 * MiB)
BIG_PAGE_BYTES = pb.ListToolsResponse(tools=BIG_PAGE, next_cursor="page-1").ByteSize()
HOSTILE_LISTINGS = {
    "pages over the page limit": (
        BIG_PAGE,
        1,
        f"CLIENT: Received message larger than max ({BIG_PAGE_BYTES} vs. {MAX_TOOLS_PAGE_BYTES})"
        "); the server's answer is larger than this command takes in one message",
    ),
    "pages under it, past the listing's bytes": (
        described(MAX_TOOLS_PAGE_BYTES - 1024),
        5,
        f"ListTools pages hold more than {MAX_LISTING_BYTES // MiB} MiB in all, by page 5; "
        "stopping",
    ),
    "pages of tiny tools, past the listing's count": (
        [pb.Tool()] * 3000,
        4,
        f"ListTools pages hold more than {MAX_LISTING_TOOLS} tools in all, by page 4; stopping",
    ),
}


@pytest.mark.parametrize(
    ("page", "pages", "message"), HOSTILE_LISTINGS.values(), ids=HOSTILE_LISTINGS.keys()
)
def test_a_listing_that_never_ends_stops_at_its_bounds(
    tmp_path: Path, page: list[pb.Tool], pages: int, message: str
) -> None:
    service = HostileToolService(page)
    with hostile_server(service) as target:
        # A deadline far off: the bounds, not the deadline, must end it.
        ran, peak, took = run_measured(
            tmp_path, "--target", target, "--api-key", "k", "--timeout", "60", "tools"
        )

    assert (ran.returncode, ran.stdout) == (3, "")
    line = one_line(ran.stderr)
    assert line.startswith("aiservices: RESOURCE_EXHAUSTED: ")
    assert line.endswith(message)
    assert service.pages == pages
    assert peak < PEAK_RSS_LIMIT, f"peak RSS {peak // MiB} MiB"
    assert took < 30


def test_a_listing_past_its_bounds_is_one_json_error(tmp_path: Path) -> None:
    service = HostileToolService(described(MAX_TOOLS_PAGE_BYTES - 1024))
    with hostile_server(service) as target:
        ran, peak, _ = run_measured(
            tmp_path, "--target", target, "--api-key", "k", "tools", "--json"
        )

    assert (ran.returncode, ran.stdout) == (3, "")
    assert json.loads(ran.stderr) == {
        "error": {
            "kind": "refused",
            "status": "RESOURCE_EXHAUSTED",
            "reason": None,
            "message": "ListTools pages hold more than 4 MiB in all, by page 5; stopping",
            "hints": [],
            "exitCode": 3,
        }
    }
    assert peak < PEAK_RSS_LIMIT
