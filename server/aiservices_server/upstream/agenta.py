"""A prompt deployed on an Agenta completion runner: `POST {base_url}/services/completion/run`,
and the refine port on it.

It speaks HTTP only (through `aiservices_server.upstream.http.JsonEndpoint`) and reports failures as
`UpstreamError`s, classified so callers can tell "could not reach it" from "it was slow" from
"it answered badly".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from aiservices_server.upstream.http import (
    JsonEndpoint,
    UpstreamLimits,
    check_value_count,
    load_reply,
    trace_token,
)
from aiservices_server.upstream.refiner import (
    RefineReply,
    RefineRequest,
    TestCase,
    UpstreamAttempt,
    UpstreamBadReply,
    UpstreamError,
)

RUN_PATH = "/services/completion/run"
# json, not orjson: orjson's buffer per call fragments the heap while calls wait (peak RSS).
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# The line that starts the test cases in `__ag_context`, worded for the deployed prompt's model,
# which is told nothing else about them. Its first character occurs nowhere else in it and it
# holds no backslash, so quoting it (see `refine_context`) can always be undone.
TEST_CASES_HEADER = (
    "[Test cases: refine the template so that, filled in with each case's inputs, it makes the "
    "model more likely to answer the case's expected_output. One JSON object per line: inputs, "
    "expected_output and, when known, actual_output (what the template gives now) and note.]"
)
_QUOTED_HEADER = "\\" + TEST_CASES_HEADER
# Line breaks that JSON leaves as they are but some readers split lines at: escaped, so each
# test case stays on one line whatever a reader counts as one.
_LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass(frozen=True)
class CompletionReply:
    """A completion runner's answer: its `data`, its trace id ("" when unsafe or absent), and
    the HTTP attempt that brought it."""

    data: Any
    trace_id: str
    attempt: UpstreamAttempt


def parse_completion(body: bytes | bytearray, *, attempt: UpstreamAttempt) -> CompletionReply:
    """A 2xx body as a CompletionReply; raises only UpstreamBadReply (or its subclass).

    The values a parse would build are bounded first, for the envelope and for `data` when it
    is a string (the tool parses that string again), so no body within the byte cap holds the
    event loop for long.
    """
    reply = load_reply(body)
    if not isinstance(reply, dict) or "data" not in reply:
        raise UpstreamBadReply("the upstream reply has no data field")
    data = reply["data"]
    if isinstance(data, str):
        check_value_count(data)
    return CompletionReply(
        data, trace_token(reply.get("trace_id") or reply.get("traceId")), attempt
    )


class AgentaCompletionClient:
    """Runs a deployed prompt on the completion runner at `base_url`."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        limits: UpstreamLimits,
        *,
        base_url: str,
        api_key: str,
        environment: str,
    ) -> None:
        self._endpoint = JsonEndpoint(
            transport,
            base_url.rstrip("/") + RUN_PATH,
            limits,
            headers={"Authorization": f"ApiKey {api_key}"},
            # The runner's reply names no model nor usage: its own spans, joined by the
            # traceparent sent, hold them.
            span_attributes={"gen_ai.operation.name": "chat", "gen_ai.provider.name": "agenta"},
        )
        self._environment = environment

    async def run(
        self,
        app: str,
        inputs: dict[str, str],
        *,
        time_left: float | None = None,
        traceparent: str | None = None,
    ) -> CompletionReply:
        """The reply, within the smaller of `time_left` and the configured timeout."""
        body = _JSON.encode({"inputs": inputs, "environment": self._environment, "app": app})
        answer = await self._endpoint.post(
            body.encode(), time_left=time_left, traceparent=traceparent
        )
        try:
            return parse_completion(answer.body, attempt=answer.attempt)
        except UpstreamError as error:
            raise error.with_attempt(answer.attempt) from None


def refine_context(context: str, test_cases: tuple[TestCase, ...]) -> str:
    """`__ag_context` for the caller's `context` and `test_cases`, in one pass over each.

    Every occurrence of TEST_CASES_HEADER in the context gets a backslash before it, so the only
    header without one is the service's. With no test cases that is all: a context that does not
    hold the header is sent exactly as it came. With test cases, a blank line follows the context
    (none when it is empty), then the header on its own line, then one JSON object per line
    (`TestCase.as_object`). Reading it back: the context is everything before the first header
    not preceded by a backslash (less the blank line), with one backslash taken from before each
    header it holds; each line after the header is one test case.
    """
    quoted = context.replace(TEST_CASES_HEADER, _QUOTED_HEADER)
    if not test_cases:
        return quoted
    lines = [TEST_CASES_HEADER]
    for case in test_cases:
        line = _JSON.encode(case.as_object())
        for character, escaped in _LINE_BREAKS.items():
            line = line.replace(character, escaped)
        lines.append(line)
    block = "\n".join(lines)
    return f"{quoted}\n\n{block}" if quoted else block


class AgentaRefiner:
    """The refine port on a prompt deployed on an Agenta completion runner: the template,
    guidelines and context go in as the deployed prompt's inputs, the test cases after the
    context (`refine_context`), and its `data` is the model's answer."""

    def __init__(self, client: AgentaCompletionClient, *, app: str) -> None:
        self._client = client
        self._app = app

    async def refine(
        self, request: RefineRequest, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        inputs = {
            "__ag_prompt_template_json": request.template_json,
            "__ag_guidelines": request.guidelines,
            "__ag_context": refine_context(request.context, request.test_cases),
        }
        reply = await self._client.run(
            self._app, inputs, time_left=time_left, traceparent=traceparent
        )
        return RefineReply(reply.data, reply.trace_id, reply.attempt)
