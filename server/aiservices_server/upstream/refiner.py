"""The port refine_prompt calls, whichever upstream answers it: a template, guidelines,
context and test cases in; the model's raw answer, a trace id and the HTTP attempt out; or an
UpstreamError saying what went wrong, in words safe to show callers.

Adapters: `agenta.AgentaRefiner` (a prompt deployed on an Agenta completion runner) and
`openai.OpenAIRefiner` (OpenAI-compatible chat completions), beside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Self


@dataclass(frozen=True, slots=True)
class UpstreamAttempt:
    """What one HTTP attempt to an upstream came to, and how long it took.

    `status` is the HTTP status code ("200", "503"...) or, when no status was read, one of
    timeout, unavailable, cancelled, too_large, invalid or error. `tokens` is the model's usage
    (prompt, completion) when the upstream reported it.
    """

    status: str
    seconds: float
    tokens: tuple[int, int] | None = None


class UpstreamError(Exception):
    """Base of upstream failures; messages are safe to show callers (no keys, no payloads).

    `attempt` is the last HTTP attempt made for the call, or None when none was made (no time
    was left for one). An error is never changed once made: a layer that learns the attempt
    raises `with_attempt(attempt)`, the same error built anew (each subclass with another
    constructor rebuilds itself).
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        attempt: UpstreamAttempt | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.attempt = attempt

    def with_attempt(self, attempt: UpstreamAttempt | None) -> Self:
        """This error, built anew through its constructor, carrying `attempt`."""
        return type(self)(self.message, retry_after=self.retry_after, attempt=attempt)


class UpstreamUnavailable(UpstreamError):
    """Could not connect, or the connection broke before a reply arrived."""

    retryable = True

    def __init__(self, message: str, *, sent: bool, attempt: UpstreamAttempt | None = None) -> None:
        super().__init__(message, attempt=attempt)
        # False when the request never left: retrying cannot run the prompt twice.
        self.sent = sent

    def with_attempt(self, attempt: UpstreamAttempt | None) -> Self:
        return type(self)(self.message, sent=self.sent, attempt=attempt)


class UpstreamTimeout(UpstreamError):
    retryable = True


class UpstreamStatusError(UpstreamError):
    """A non-2xx reply. `body` holds its first bytes (at most 64 KiB), for an adapter to tell
    one refusal from another; it is never shown to callers or logged."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        body: bytes = b"",
        attempt: UpstreamAttempt | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, attempt=attempt)
        self.status = status
        self.body = body
        self.retryable = status in (408, 425, 429, 500, 502, 503, 504)

    def with_attempt(self, attempt: UpstreamAttempt | None) -> Self:
        return type(self)(
            self.status, self.message, retry_after=self.retry_after, body=self.body, attempt=attempt
        )


class UpstreamBadReply(UpstreamError):
    """A 2xx reply that is not the completion-runner JSON shape."""


class UpstreamReplyTooLarge(UpstreamBadReply):
    """A reply over the byte cap, or holding more JSON values than a parse may build.

    Not retryable: the same prompt would most likely answer the same way.
    """


@dataclass(frozen=True, slots=True)
class TestCase:
    """One case the refined template is asked to get right: the values of the template's
    variables (`inputs`, as name and value pairs, sent in this order), the output the caller
    expects, and, when given, the output the template gives today and a note on the case.
    A tuple rather than a dict, so the case cannot change once made."""

    inputs: tuple[tuple[str, str], ...]
    expected_output: str
    actual_output: str | None = None
    note: str | None = None

    def as_object(self) -> dict[str, Any]:
        """The case as the JSON object both adapters send: `inputs` and `expected_output`,
        then `actual_output` and `note` only when given, in that order."""
        found: dict[str, Any] = {
            "inputs": dict(self.inputs),
            "expected_output": self.expected_output,
        }
        if self.actual_output is not None:
            found["actual_output"] = self.actual_output
        if self.note is not None:
            found["note"] = self.note
        return found


@dataclass(frozen=True, slots=True)
class RefineRequest:
    """What a refine is asked: the caller's template as it came, guidelines and context (""
    when not given) and test cases (empty when none: each adapter then sends exactly what it
    sent before test cases existed)."""

    template_json: str
    guidelines: str = ""
    context: str = ""
    test_cases: tuple[TestCase, ...] = ()


@dataclass(frozen=True, slots=True)
class RefineReply:
    """`output` is the model's answer as the upstream gave it: a JSON text (perhaps fenced like a
    chat answer) or an already parsed object; the tool checks it."""

    output: Any
    trace_id: str
    attempt: UpstreamAttempt


class Refiner(Protocol):
    """Refines a prompt template within `time_left` seconds (None: the adapter's own timeout),
    passing `traceparent` on; raises UpstreamError."""

    async def refine(
        self, request: RefineRequest, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply: ...
