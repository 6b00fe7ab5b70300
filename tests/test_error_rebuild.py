"""An error is never changed once made: a layer that adds to one it caught raises the same error
built anew (`with_headers`, `with_attempt`, `with_upstream`). The rebuilt error is of the same
class and carries everything the original did, and the original is left as it was."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest

from aiservices_server import errors
from aiservices_server.errors import FieldViolation, InvalidArgument, RetryLater, ServiceError
from aiservices_server.faces.mcp import answers
from aiservices_server.tools.base import ToolErrorCode, ToolFailure
from aiservices_server.upstream.agenta import AgentaCompletionClient
from aiservices_server.upstream.http import UpstreamLimits
from aiservices_server.upstream.refiner import (
    UpstreamAttempt,
    UpstreamBadReply,
    UpstreamError,
    UpstreamStatusError,
    UpstreamUnavailable,
)

ATTEMPT = UpstreamAttempt("503", 0.25, tokens=(3, 4))
LATER = UpstreamAttempt("timeout", 1.5)


def subclasses(base: type[Any]) -> list[type[Any]]:
    """`base` and every class of this service derived from it."""
    found = [base]
    for cls in found:
        found += [sub for sub in cls.__subclasses__() if sub not in found]
    return [cls for cls in found if cls.__module__.startswith("aiservices_server.")]


def state(error: BaseException, *, but: str) -> dict[str, Any]:
    """What `error` carries (its attributes, class, args), all but the attribute `but`, copied
    deep: a rebuild that changed the original's mappings in place would show."""
    carried = {name: copy.deepcopy(value) for name, value in vars(error).items() if name != but}
    return {**carried, "class": type(error), "args": error.args, "text": str(error)}


def a_refusal(cls: type[ServiceError]) -> ServiceError:
    shown = {"tool": "refine_prompt"}
    if issubclass(cls, InvalidArgument):
        violations = [FieldViolation(f"arguments.f{n}", "bad") for n in range(25)]
        return cls(
            "bad input",
            violations,
            metadata=shown,
            key_id="key-1",
            more=7,
            more_is_exact=False,
            headers={"x-ratelimit-limit": "5"},
        )
    if issubclass(cls, RetryLater):
        return cls(
            "come back later",
            2.5,
            metadata=shown,
            key_id="key-1",
            headers={"x-ratelimit-limit": "5"},
        )
    return cls("refused", metadata=shown, key_id="key-1", headers={"x-ratelimit-limit": "5"})


REFUSALS = subclasses(ServiceError)


def test_every_refusal_class_is_covered() -> None:
    names = {cls.__name__ for cls in REFUSALS}
    assert {"InvalidArgument", "RateLimited", "Overloaded", "Internal"} <= names
    assert {"MethodNotAllowed", "HostNotAllowed", "BodyTooSlow"} <= names
    assert answers.MethodNotAllowed in REFUSALS and errors.ShuttingDown in REFUSALS


@pytest.mark.parametrize("cls", REFUSALS, ids=lambda cls: cls.__name__)
def test_a_refusal_rebuilt_with_headers_keeps_all_it_carried(cls: type[ServiceError]) -> None:
    original = a_refusal(cls)
    before = state(original, but="")

    rebuilt = original.with_headers({"x-ratelimit-remaining": "0", "x-ratelimit-limit": "6"})

    assert rebuilt is not original
    assert state(rebuilt, but="headers") == state(original, but="headers")
    assert dict(rebuilt.headers) == {"x-ratelimit-limit": "6", "x-ratelimit-remaining": "0"}
    assert rebuilt.reason == original.reason
    assert state(original, but="") == before


def test_invalid_argument_rebuilt_counts_the_same_violations_left_out() -> None:
    original = answers.MethodNotAllowed(
        "GET is not allowed", [FieldViolation("method", "use POST")] * 30, more=4
    )
    rebuilt = original.with_headers({"allow": "POST"})
    assert isinstance(rebuilt, answers.MethodNotAllowed)
    assert isinstance(rebuilt, answers.HttpRefusal)
    assert len(rebuilt.violations) == errors.MAX_VIOLATIONS
    assert (rebuilt.not_shown, rebuilt.not_shown_exact) == (14, True)
    assert answers.answer_for(rebuilt) == answers.answer_for(original)


def an_upstream_error(cls: type[UpstreamError]) -> UpstreamError:
    if issubclass(cls, UpstreamStatusError):
        return cls(429, "the upstream answered HTTP 429", retry_after=3.0, body=b"{}")
    if issubclass(cls, UpstreamUnavailable):
        return cls("could not connect to the upstream", sent=False)
    return cls("the upstream failed", retry_after=1.0)


@pytest.mark.parametrize("cls", subclasses(UpstreamError), ids=lambda cls: cls.__name__)
def test_an_upstream_error_rebuilt_with_an_attempt_keeps_all_it_carried(
    cls: type[UpstreamError],
) -> None:
    original = an_upstream_error(cls).with_attempt(LATER)
    before = state(original, but="")

    rebuilt = original.with_attempt(ATTEMPT)

    assert rebuilt is not original
    assert rebuilt.attempt == ATTEMPT
    assert state(rebuilt, but="attempt") == state(original, but="attempt")
    assert rebuilt.retryable == original.retryable
    assert state(original, but="") == before


def test_a_tool_failure_rebuilt_keeps_all_it_carried() -> None:
    original = ToolFailure(
        ToolErrorCode.UPSTREAM_TIMEOUT,
        "the upstream did not answer in time",
        retryable=True,
        retry_after=4.0,
        trace_id="trace-1",
        upstream=LATER,
        headers={"x-ratelimit-limit": "5"},
    )
    before = state(original, but="")

    with_upstream = original.with_upstream(ATTEMPT)
    with_headers = with_upstream.with_headers({"x-ratelimit-remaining": "2"})

    assert with_upstream.upstream == ATTEMPT
    assert state(with_upstream, but="upstream") == state(original, but="upstream")
    assert state(with_headers, but="headers") == state(with_upstream, but="headers")
    assert dict(with_headers.headers) == {
        "x-ratelimit-limit": "5",
        "x-ratelimit-remaining": "2",
    }
    assert state(original, but="") == before


# --- the errors out of an upstream call carry the attempt they came from -----------------------


async def run_against(reply: httpx.Response) -> UpstreamError:
    """The UpstreamError an Agenta client raises when its upstream answers `reply`."""

    def answer(request: httpx.Request) -> httpx.Response:
        return reply

    client = AgentaCompletionClient(
        httpx.MockTransport(answer),
        UpstreamLimits(timeout=5.0, max_retries=0),
        base_url="http://upstream.test",
        api_key="key",
        environment="production",
    )
    with pytest.raises(UpstreamError) as raised:
        await client.run("app", {})
    return raised.value


async def test_a_reply_that_does_not_parse_carries_its_attempt() -> None:
    error = await run_against(httpx.Response(200, stream=httpx.ByteStream(b"not json")))
    assert type(error) is UpstreamBadReply
    assert error.message == "the upstream reply is not JSON"
    assert error.attempt is not None and error.attempt.status == "200"
    assert error.__cause__ is None and error.__suppress_context__


async def test_an_error_status_carries_its_attempt() -> None:
    error = await run_against(httpx.Response(503, stream=httpx.ByteStream(b"busy")))
    assert isinstance(error, UpstreamStatusError)
    assert (error.status, error.body, error.retryable) == (503, b"busy", True)
    assert error.attempt is not None and error.attempt.status == "503"
