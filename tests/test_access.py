"""Who may call, and how often: API keys, per-tool permissions and rate limits, through the real
interceptors of a real server (stand-in upstream on loopback), as a caller sees them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from aiservices import ToolClient, ToolServiceError
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from aiservices_server.app import AiServicesServer
from aiservices_server.auth import generate_key, hash_key
from aiservices_server.config import ENV_PREFIX
from aiservices_server.faces.envelope import log_suppressed_unauthenticated
from aiservices_server.logs import JsonFormatter, LineSampler
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.processes import run_to_exit
from tests.support.responsive import responsive_during
from tests.support.servers import UPSTREAM_KEY, ServerThread, make_settings
from tests.support.waiting import access_records

TOOL = "tools.agenta.api.refine_prompt"
SERVICE = "aiservices.v1.ToolService"
TEMPLATE = '{"messages": [{"role": "user", "content": "Greet {{name}}."}]}'
ARGUMENTS = {"prompt_template_json": TEMPLATE}
TIMEOUT = 10.0
USER = "x-agenta-user-id"
ORGANIZATION = "x-agenta-organization-id"
Metadata = Sequence[tuple[str, str]]


def one_char_changed(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def call_request() -> pb.CallToolRequest:
    request = pb.CallToolRequest(name=TOOL)
    request.arguments.update(ARGUMENTS)
    return request


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.ToolServiceStub]:
    """The generated stub, for what the thin client hides: trailers of successful calls."""
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ToolServiceStub(channel)


class Caller:
    """One caller (key plus metadata) of a server: counts admitted calls, unpacks refusals."""

    def __init__(self, target: str, key: str, metadata: Metadata = ()) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.ToolServiceStub(self._channel)
        self._metadata = (*bearer(key), *metadata)
        self._client = ToolClient(target, api_key=key, timeout=TIMEOUT, metadata=metadata)

    def close(self) -> None:
        self._channel.close()
        self._client.close()

    def call(self, metadata: Metadata = ()) -> dict[str, str]:
        """One admitted CallTool; returns its trailing metadata (raises grpc.RpcError if not)."""
        response, call = self._stub.CallTool.with_call(
            call_request(), metadata=(*self._metadata, *metadata), timeout=TIMEOUT
        )
        assert not response.is_error, response.content
        return {key: value for key, value in call.trailing_metadata() if isinstance(value, str)}

    def refusal(self, metadata: Metadata = ()) -> ToolServiceError:
        """The error of one CallTool that must be refused."""
        with pytest.raises(ToolServiceError) as caught:
            self._client.call_tool(TOOL, ARGUMENTS, metadata=metadata)
        return caught.value

    def budget(self, metadata: Callable[[int], Metadata] = lambda _: (), cap: int = 40) -> int:
        """Back-to-back calls admitted before the first RESOURCE_EXHAUSTED."""
        for admitted in range(cap):
            try:
                self.call(metadata(admitted))
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
                return admitted
        pytest.fail(f"more than {cap} calls admitted back to back")


@pytest.fixture
def caller(server: ServerThread) -> Iterator[Callable[..., Caller]]:
    made: list[Caller] = []

    def make(key: str, metadata: Metadata = (), target: str | None = None) -> Caller:
        made.append(Caller(target or server.target, key, metadata))
        return made[-1]

    yield make
    for each in made:
        each.close()


# --- authentication ------------------------------------------------------------------------------

RPCS: dict[str, Callable[[ToolClient], object]] = {
    "GetStatus": lambda client: client.status(),
    "ListTools": lambda client: client.list_tools(),
    "CallTool": lambda client: client.call_tool(TOOL, ARGUMENTS),
}

BAD_CREDENTIALS: dict[str, Callable[[TestKeys], Metadata]] = {
    "no metadata": lambda keys: (),
    "Bearer without a key": lambda keys: (("authorization", "Bearer"),),
    "Basic scheme": lambda keys: (("authorization", "Basic xyz"),),
    "Basic scheme with a real key": lambda keys: (("authorization", f"Basic {keys.editor}"),),
    "unknown key": lambda keys: bearer(generate_key()),
    "key with one char changed": lambda keys: bearer(one_char_changed(keys.editor)),
    "two tokens": lambda keys: (("authorization", f"Bearer {keys.editor} {keys.full}"),),
    "key without a scheme": lambda keys: (("authorization", keys.editor),),
    "empty value": lambda keys: (("authorization", ""),),
}


@pytest.mark.parametrize("rpc", list(RPCS))
@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS))
def test_bad_credentials_are_unauthenticated(
    server: ServerThread, keys: TestKeys, credentials: str, rpc: str
) -> None:
    metadata = BAD_CREDENTIALS[credentials](keys)
    with (
        ToolClient(server.target, timeout=TIMEOUT, metadata=metadata) as client,
        pytest.raises(ToolServiceError) as caught,
    ):
        RPCS[rpc](client)
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "UNAUTHENTICATED"
    assert caught.value.domain == "aiservices"


def test_a_key_that_authenticated_lets_no_near_miss_in_after_it(
    stub: pb_grpc.ToolServiceStub, keys: TestKeys
) -> None:
    """Accepted header values are remembered: only the exact value may skip the checks."""

    def status(header: str) -> grpc.StatusCode:
        try:
            stub.GetStatus(
                pb.GetStatusRequest(), metadata=(("authorization", header),), timeout=TIMEOUT
            )
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    valid = f"Bearer {keys.editor}"
    assert status(valid) is grpc.StatusCode.OK
    for near_miss in (
        f"Bearer {one_char_changed(keys.editor)}",
        f"Basic {keys.editor}",
        f"Bearer {keys.editor}x",
        f"Bearer {keys.editor[:-1]}",
    ):
        assert status(near_miss) is grpc.StatusCode.UNAUTHENTICATED, near_miss
    assert status(valid) is grpc.StatusCode.OK
    assert status(f"bearer {keys.editor}") is grpc.StatusCode.OK


@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_two_authorization_headers_are_unauthenticated(
    stub: pb_grpc.ToolServiceStub, keys: TestKeys, order: str
) -> None:
    headers = [*bearer(generate_key()), *bearer(keys.full)]
    if order == "valid first":
        headers.reverse()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetStatus(pb.GetStatusRequest(), metadata=tuple(headers), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("scheme", ["Bearer", "ApiKey"])
def test_both_schemes_are_accepted_on_every_rpc(
    server: ServerThread, keys: TestKeys, scheme: str
) -> None:
    metadata = (("authorization", f"{scheme} {keys.editor}"),)
    with ToolClient(server.target, timeout=TIMEOUT, metadata=metadata) as client:
        assert [tool.name for tool in client.status().tools] == [TOOL]
        assert [tool.name for tool in client.list_tools()] == [TOOL]
        assert not client.call_tool(TOOL, ARGUMENTS).is_error


def test_health_check_needs_no_key(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_needs_no_key(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE in database.get_services()
        service = DescriptorPool(database).FindServiceByName(SERVICE)
    assert {method.name for method in service.methods} == {"GetStatus", "ListTools", "CallTool"}


# --- permissions ---------------------------------------------------------------------------------


def test_a_key_without_the_tools_permission_sees_no_tools_and_may_not_call(
    server: ServerThread, keys: TestKeys
) -> None:
    with ToolClient(server.target, api_key=keys.viewer, timeout=TIMEOUT) as viewer:
        status = viewer.status()
        assert status.enabled
        assert status.tools == []
        assert viewer.list_tools() == []
        with pytest.raises(ToolServiceError) as caught:
            viewer.call_tool(TOOL, ARGUMENTS)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == "PERMISSION_DENIED"


@pytest.mark.parametrize("who", ["editor", "full", "gateway", "other_org"])
def test_keys_with_the_permission_see_and_call_the_tool(
    server: ServerThread, keys: TestKeys, who: str
) -> None:
    with ToolClient(server.target, api_key=getattr(keys, who), timeout=TIMEOUT) as client:
        assert [tool.name for tool in client.status().tools] == [TOOL]
        assert [tool.name for tool in client.list_tools()] == [TOOL]
        result = client.call_tool(TOOL, ARGUMENTS)
    assert not result.is_error, result.text
    assert result.structured_content is not None


@pytest.mark.parametrize("who", ["editor", "viewer"])
def test_an_unknown_tool_is_not_found_and_never_rate_limited(
    server: ServerThread, keys: TestKeys, who: str
) -> None:
    with ToolClient(server.target, api_key=getattr(keys, who), timeout=TIMEOUT) as client:
        for _ in range(15):
            with pytest.raises(ToolServiceError) as caught:
                client.call_tool("tools.nope", ARGUMENTS)
            assert caught.value.code is grpc.StatusCode.NOT_FOUND
            assert caught.value.reason == "TOOL_NOT_FOUND"


# --- rate limiting -------------------------------------------------------------------------------


def test_a_fresh_caller_gets_ten_calls_then_waits_the_advertised_retry_after(
    caller: Callable[..., Caller], keys: TestKeys
) -> None:
    editor = caller(keys.editor)
    trailers = [editor.call() for _ in range(10)]
    assert [t["x-ratelimit-remaining"] for t in trailers] == [str(n) for n in range(9, -1, -1)]
    assert {t["x-ratelimit-limit"] for t in trailers} == {"10"}

    refused = editor.refusal()
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.reason == "RATE_LIMIT_EXCEEDED"
    assert refused.domain == "aiservices"
    assert refused.retry_after is not None
    assert 1.5 < refused.retry_after <= 2.0
    assert refused.trailing_metadata["retry-after"] == "2"
    assert refused.trailing_metadata["x-ratelimit-limit"] == "10"
    assert refused.trailing_metadata["x-ratelimit-remaining"] == "0"

    time.sleep(refused.retry_after)  # the advertised delay is the behaviour under test

    assert editor.call()["x-ratelimit-remaining"] == "0"
    again = editor.refusal()  # one more call per 2 s, not a new burst
    assert again.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert again.retry_after is not None
    assert 1.5 < again.retry_after <= 2.0


def test_a_key_with_its_own_limit_gets_its_own_burst(
    caller: Callable[..., Caller], keys: TestKeys
) -> None:
    tiered = caller(keys.tiered)
    assert tiered.budget() == 3
    refused = tiered.refusal()
    assert refused.trailing_metadata["x-ratelimit-limit"] == "3"
    # 60 per minute: one call a second.
    assert refused.retry_after is not None
    assert 0.5 < refused.retry_after <= 1.0
    assert refused.trailing_metadata["retry-after"] == "1"


def test_status_and_list_tools_are_never_limited_nor_spend_the_budget(
    server: ServerThread, caller: Callable[..., Caller], keys: TestKeys
) -> None:
    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as client:
        for _ in range(30):
            assert client.status().tools
            assert client.list_tools()
    assert caller(keys.editor).budget() == 10


def test_the_burst_follows_the_settings(upstream: StandinUpstream, keys: TestKeys) -> None:
    with ServerThread(make_settings(upstream.url, rate_limit_burst=2)) as small:
        editor = Caller(small.target, keys.editor)
        try:
            assert editor.budget() == 2
            assert editor.refusal().trailing_metadata["x-ratelimit-limit"] == "2"
        finally:
            editor.close()


def test_two_keys_have_separate_budgets(caller: Callable[..., Caller], keys: TestKeys) -> None:
    editor, full = caller(keys.editor), caller(keys.full)
    assert editor.budget() == 10
    assert full.budget() == 10
    assert editor.refusal().code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_refused_key_can_still_call_other_rpcs(
    server: ServerThread, caller: Callable[..., Caller], keys: TestKeys
) -> None:
    assert caller(keys.editor).budget() == 10
    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as client:
        assert client.status().tools
        assert client.list_tools()


# --- delegation ----------------------------------------------------------------------------------


def test_a_gateway_gives_each_end_user_a_budget(
    caller: Callable[..., Caller], keys: TestKeys
) -> None:
    alice = caller(keys.gateway, ((USER, "alice"),))
    bob = caller(keys.gateway, ((USER, "bob"),))
    assert alice.budget() == 10
    assert bob.budget() == 10
    assert alice.refusal().code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The gateway's own budget (no user named) is untouched by its users'.
    assert caller(keys.gateway).budget() == 10


def test_the_same_user_in_two_organizations_has_two_budgets(
    caller: Callable[..., Caller], keys: TestKeys
) -> None:
    acme = caller(keys.gateway, ((USER, "alice"), (ORGANIZATION, "acme")))
    globex = caller(keys.gateway, ((USER, "alice"), (ORGANIZATION, "globex")))
    assert acme.budget() == 10
    assert globex.budget() == 10


@pytest.mark.parametrize(
    "metadata",
    [((USER, "alice"),), ((ORGANIZATION, "acme"),), ((USER, "not a user id " * 20),)],
    ids=["user", "organization", "any-value"],
)
def test_a_key_without_act_for_users_may_not_name_a_user(
    server: ServerThread,
    caller: Callable[..., Caller],
    keys: TestKeys,
    upstream: StandinUpstream,
    metadata: Metadata,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    editor = caller(keys.editor)
    refused = editor.refusal(metadata)
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert refused.reason == "PERMISSION_DENIED"
    assert refused.error_metadata == {"permission": "act_for_users"}
    assert "may not act for users" in refused.message
    assert metadata[0][0] in refused.message
    assert metadata[0][1] not in refused.message
    (record,) = access_records(caplog, 1)
    assert getattr(record, "code", None) == "PERMISSION_DENIED"
    assert getattr(record, "key_id", None) == "editor"
    assert upstream.request_count == 0
    # Refused before the rate limit: the key's own budget is untouched.
    assert editor.budget() == 10


def test_user_ids_are_compared_exactly_as_sent(
    caller: Callable[..., Caller], keys: TestKeys
) -> None:
    assert caller(keys.gateway, ((USER, "alice"),)).budget() == 10
    assert caller(keys.gateway, ((USER, "Alice"),)).budget() == 10


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (USER, "a" * 200),
        (USER, "alice smith"),
        (USER, "alice|acme"),
        (ORGANIZATION, "acme corp"),
        (ORGANIZATION, "o" * 129),
    ],
)
def test_a_malformed_delegation_header_is_an_invalid_argument_logged_with_its_key(
    server: ServerThread,
    caller: Callable[..., Caller],
    keys: TestKeys,
    header: str,
    value: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    gateway = caller(keys.gateway)
    refused = responsive_during(server, lambda: gateway.refusal(((header, value),)))
    assert refused.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.reason == "INVALID_ARGUMENT"
    assert [field for field, _ in refused.field_violations] == [f"metadata.{header}"]
    assert value not in str(refused)
    # The key authenticated before the header was refused: its line names it, not "anonymous".
    (record,) = access_records(caplog, 1)
    assert getattr(record, "code", None) == "INVALID_ARGUMENT"
    assert getattr(record, "key_id", None) == "gateway"
    assert value not in {str(v) for v in vars(record).values()}


# --- secrets in logs -----------------------------------------------------------------------------


def test_keys_never_reach_the_logs_but_key_ids_do(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    unknown = generate_key()
    wrong = one_char_changed(keys.editor)
    delegating = (("authorization", f"Bearer {keys.gateway}"), (USER, "alice"))
    not_a_gateway = (("authorization", f"ApiKey {keys.full}"), (USER, "mallory"))

    with ToolClient(server.target, api_key=keys.editor, timeout=TIMEOUT) as editor:
        editor.status()
        editor.list_tools()
        assert not editor.call_tool(TOOL, ARGUMENTS).is_error
    attempts: list[tuple[Metadata, str]] = [
        (bearer(unknown), TOOL),
        (bearer(wrong), TOOL),
        ((("authorization", f"Basic {keys.other_org}"),), TOOL),
        (bearer(keys.viewer), TOOL),  # PERMISSION_DENIED
        (delegating, TOOL),
        (not_a_gateway, TOOL),  # PERMISSION_DENIED: no act_for_users
        (delegating, "tools.nope"),
    ]
    for metadata, tool in attempts:
        with (
            ToolClient(server.target, timeout=TIMEOUT, metadata=metadata) as client,
            contextlib.suppress(ToolServiceError),
        ):
            client.call_tool(tool, ARGUMENTS)

    access = access_records(caplog, 10)
    formatter = JsonFormatter()
    everything = caplog.text + "\n".join(formatter.format(r) for r in caplog.records)
    secrets = {
        "editor": keys.editor,
        "full": keys.full,
        "gateway": keys.gateway,
        "viewer": keys.viewer,
        "other_org": keys.other_org,
        "unknown": unknown,
        "one char changed": wrong,
        "upstream": UPSTREAM_KEY,
        "editor hash": hash_key(keys.editor).removeprefix("sha256:"),
    }
    leaked = [name for name, secret in secrets.items() if secret in everything]
    assert leaked == []

    assert len(access) == 10
    key_ids = Counter(getattr(r, "key_id", None) for r in access)
    # Refused before a key was recognised, the other three calls name no configured key.
    assert {k: n for k, n in key_ids.items() if k in keys.__dataclass_fields__} == {
        "editor": 3,
        "viewer": 1,
        "gateway": 2,
        "full": 1,
    }


def test_the_access_log_names_the_end_user_a_gateway_acts_for(
    server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    metadata = ((USER, "alice-7f3a"), (ORGANIZATION, "globex-eu"))
    with ToolClient(server.target, api_key=keys.gateway, timeout=TIMEOUT, metadata=metadata) as c:
        assert not c.call_tool(TOOL, ARGUMENTS).is_error
    (record,) = access_records(caplog, 1)
    assert getattr(record, "key_id", None) == "gateway"
    values = {str(value) for value in vars(record).values()}
    assert "alice-7f3a" in values, "the delegated user is not in the access log"
    assert "globex-eu" in values, "the delegated organization is not in the access log"


# --- unauthenticated floods ----------------------------------------------------------------------

FLOOD = 1_000
IN_FLIGHT = 4
SAMPLED_LINES = 10
SUMMARY_EVERY = 0.05
SUPPRESSED = "suppressed unauthenticated calls"


@pytest.fixture
def flood_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    settings = make_settings(upstream.url)
    thread = ServerThread(settings)
    # A clock that never moves: the bucket never refills, so exactly its burst of lines is
    # written however long the flood takes on a loaded machine.
    lines = LineSampler(
        log_suppressed_unauthenticated,
        burst=SAMPLED_LINES,
        summary_every=SUMMARY_EVERY,
        clock=lambda: 0.0,
    )
    thread.server = AiServicesServer(settings, unauthenticated_lines=lines)
    with thread:
        yield thread


def test_an_unauthenticated_flood_is_refused_counted_and_logged_in_samples(
    flood_server: ServerThread, keys: TestKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiservices.access")
    credentials: dict[str, Metadata] = {
        "missing": (),
        "malformed": (("authorization", "Basic xyz"),),
        "unknown_key": bearer(generate_key()),
    }
    kinds = list(credentials.values())

    def flood() -> Counter[str]:
        """FLOOD calls, IN_FLIGHT at a time: one client hammering, not a load test."""
        codes: Counter[str] = Counter()
        with grpc.insecure_channel(flood_server.target) as channel:
            stub = pb_grpc.ToolServiceStub(channel)
            for first in range(0, FLOOD, IN_FLIGHT):
                calls = [
                    stub.CallTool.future(call_request(), metadata=tuple(kinds[n % 3]), timeout=30)
                    for n in range(first, min(first + IN_FLIGHT, FLOOD))
                ]
                for call in calls:
                    try:
                        call.result()
                        codes["OK"] += 1
                    except grpc.RpcError as error:
                        codes[error.code().name] += 1
        return codes

    began = time.monotonic()
    assert responsive_during(flood_server, flood) == {"UNAUTHENTICATED": FLOOD}

    registry = flood_server.server.metrics.registry
    counted = {
        reason: registry.get_sample_value(
            "aiservices_unauthenticated_refusals_total", {"reason": reason}
        )
        for reason in credentials
    }
    assert counted == {"missing": 334, "malformed": 333, "unknown_key": 333}

    def summaries() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == SUPPRESSED]

    deadline = time.monotonic() + 10
    while sum(getattr(r, "suppressed", 0) for r in summaries()) < FLOOD - SAMPLED_LINES:
        assert time.monotonic() < deadline, "the suppressed calls were never summarized"
        time.sleep(0.005)  # polling a condition, with a deadline
    elapsed = time.monotonic() - began
    lines = [r for r in caplog.records if r.name == "aiservices.access" and r.getMessage() == "rpc"]
    assert len(lines) == SAMPLED_LINES
    assert {getattr(r, "code", None) for r in lines} == {"UNAUTHENTICATED"}
    assert sum(getattr(r, "suppressed", 0) for r in summaries()) == FLOOD - SAMPLED_LINES
    assert len(summaries()) <= elapsed / SUMMARY_EVERY + 1

    # Callers with a key are never sampled away.
    with ToolClient(flood_server.target, api_key=keys.editor, timeout=TIMEOUT) as editor:
        editor.status()
    assert any(getattr(r, "key_id", None) == "editor" for r in access_records(caplog, 11))


# --- start-up ------------------------------------------------------------------------------------


SERVER = [sys.executable, "-m", "aiservices_server"]


def server_env(**settings: str) -> dict[str, str]:
    """The environment without any AGENTA_AI_SERVICES_* but the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env.update({ENV_PREFIX + name.upper(): value for name, value in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_server(cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`aiservices-server` that is expected to exit by itself."""
    return run_to_exit(cwd, settings)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def write_private(path: Path, text: str) -> None:
    """A keys file as an operator keeps it: readable by its owner only."""
    path.write_text(text)
    path.chmod(0o600)


def test_without_a_keys_file_the_server_refuses_to_start(tmp_path: Path) -> None:
    result = run_server(tmp_path, grpc_address="127.0.0.1:0")
    assert result.returncode != 0
    assert f"{ENV_PREFIX}API_KEYS_FILE" in one_line(result.stderr)


def test_a_malformed_keys_file_stops_start_up_with_one_line_naming_it(tmp_path: Path) -> None:
    pasted = generate_key()  # a clear key pasted where the hash belongs
    keys_file = tmp_path / "keys.toml"
    write_private(keys_file, f'[[keys]]\nid = "svc"\nhash = "{pasted}"\npermissions = ["*"]\n')
    result = run_server(tmp_path, grpc_address="127.0.0.1:0", api_keys_file=str(keys_file))
    assert result.returncode != 0
    line = one_line(result.stderr)
    assert str(keys_file) in line
    assert "hash" in line
    assert pasted not in result.stderr


def test_a_keys_file_that_is_not_toml_stops_start_up(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    write_private(keys_file, "[[keys]\nid = \n")
    result = run_server(tmp_path, grpc_address="127.0.0.1:0", api_keys_file=str(keys_file))
    assert result.returncode != 0
    assert str(keys_file) in one_line(result.stderr)


# Each once started, then failed every call of the key with UNKNOWN.
UNHOLDABLE_KEY_LIMITS = {
    "per_minute 1e-12": ("{ burst = 3, per_minute = 1e-12 }", "per_minute"),
    "per_minute 1e12": ("{ burst = 3, per_minute = 1e12 }", "per_minute"),
    "burst 2**62": (f"{{ burst = {2**62}, per_minute = 30 }}", "burst"),
    "burst 0": ("{ burst = 0, per_minute = 30 }", "burst"),
    "burst -5": ("{ burst = -5, per_minute = 30 }", "burst"),
    "per_minute 0": ("{ burst = 3, per_minute = 0 }", "per_minute"),
    "per_minute -1": ("{ burst = 3, per_minute = -1.0 }", "per_minute"),
    "per_minute nan": ("{ burst = 3, per_minute = nan }", "per_minute"),
    "per_minute inf": ("{ burst = 3, per_minute = inf }", "per_minute"),
}


@pytest.mark.parametrize("case", list(UNHOLDABLE_KEY_LIMITS))
def test_a_key_limit_the_limiter_cannot_hold_stops_start_up(tmp_path: Path, case: str) -> None:
    rate_limit, field = UNHOLDABLE_KEY_LIMITS[case]
    keys_file = tmp_path / "keys.toml"
    write_private(
        keys_file,
        f'[[keys]]\nid = "svc"\nhash = "{hash_key(generate_key())}"\npermissions = ["*"]\n'
        f"rate_limit = {rate_limit}\n",
    )
    result = run_server(tmp_path, grpc_address="127.0.0.1:0", api_keys_file=str(keys_file))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith(f"aiservices: API keys file {keys_file}: ")
    assert f'keys[0].rate_limit.{field} (key "svc"): ' in line


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"rate_limit_per_minute": "1e-7"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_per_minute": "1e12"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_per_minute": "0"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_per_minute": "-30"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_per_minute": "nan"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_per_minute": "inf"}, "RATE_LIMIT_PER_MINUTE"),
        ({"rate_limit_burst": str(2**62)}, "RATE_LIMIT_BURST"),
        ({"rate_limit_burst": "0"}, "RATE_LIMIT_BURST"),
        ({"rate_limit_burst": "1000", "rate_limit_per_minute": "1e-6"}, "RATE_LIMIT_PER_MINUTE"),
    ],
    ids=lambda value: (
        ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value
    ),
)
def test_a_default_limit_the_limiter_cannot_hold_stops_start_up(
    tmp_path: Path, settings: dict[str, str], setting: str
) -> None:
    result = run_server(tmp_path, grpc_address="127.0.0.1:0", auth="disabled", **settings)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("aiservices: invalid settings: ")
    assert f"{ENV_PREFIX}{setting} " in line


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"grpc_address": "0.0.0.0:0"}, "GRPC_ADDRESS"),
        # MCP on every address, plaintext behind a proxy, with gRPC on loopback: MCP would
        # serve tools to anyone without a key.
        (
            {
                "grpc_address": "127.0.0.1:0",
                "mcp_address": "0.0.0.0:0",
                "mcp_allow_plaintext": "true",
                "mcp_allowed_hosts": "*",
            },
            "MCP_ADDRESS",
        ),
        ({"grpc_address": "127.0.0.1:0", "mcp_address": "[::]:0"}, "MCP_ADDRESS"),
    ],
    ids=["grpc", "mcp-plaintext", "mcp-ipv6"],
)
def test_disabled_auth_refuses_any_listener_on_a_non_loopback_address(
    tmp_path: Path, settings: dict[str, str], setting: str
) -> None:
    result = run_server(tmp_path, auth="disabled", **settings)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("aiservices: invalid settings: ")
    assert f"AUTH=disabled serves only on loopback, but {ENV_PREFIX}{setting} is " in line


class StderrLines:
    """Reads a process's stderr in a thread so the test can wait for a line with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stderr is not None
        stream = process.stderr

        def pump() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no such log line within {timeout} s:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"stderr closed first:\n{''.join(self.lines)}")
            self.lines.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and predicate(entry):
                return entry


def test_disabled_auth_serves_loopback_with_a_loud_warning_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    process = subprocess.Popen(
        SERVER,
        cwd=tmp_path,
        env=server_env(grpc_address="127.0.0.1:0", auth="disabled"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stderr = StderrLines(process)
        serving = stderr.wait_for(lambda entry: entry.get("msg") == "serving", timeout=20)
        warnings = [line for line in stderr.lines if '"WARNING"' in line]
        assert any("DISABLED" in line for line in warnings), stderr.lines

        with ToolClient(f"127.0.0.1:{serving['port']}", timeout=TIMEOUT) as anyone:
            assert anyone.status().enabled is False  # no upstream configured, but no key needed
            with pytest.raises(ToolServiceError) as caught:
                anyone.call_tool(TOOL, ARGUMENTS)
            assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_a_key_made_by_the_cli_authenticates_against_a_real_server(
    upstream: StandinUpstream, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.toml"
    new_key = ("keys", "new", "--id", "svc", "--permission", "edit_workflows")
    made = subprocess.run(
        [*SERVER, *new_key, "--append", str(keys_file)],
        cwd=tmp_path,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    key = made.stdout.strip()
    assert made.stdout == f"{key}\n"
    assert key not in keys_file.read_text()

    with ServerThread(make_settings(upstream.url, api_keys_file=keys_file)) as running:
        with ToolClient(running.target, api_key=key, timeout=TIMEOUT) as svc:
            assert [tool.name for tool in svc.status().tools] == [TOOL]
            assert not svc.call_tool(TOOL, ARGUMENTS).is_error
        with (
            ToolClient(running.target, api_key=one_char_changed(key), timeout=TIMEOUT) as bad,
            pytest.raises(ToolServiceError) as caught,
        ):
            bad.status()
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
