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
    UpstreamAttempt,
    UpstreamBadReply,
    UpstreamError,
)

RUN_PATH = "/services/completion/run"
# json, not orjson: orjson's buffer per call fragments the heap while calls wait (peak RSS).
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


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


class AgentaRefiner:
    """The refine port on a prompt deployed on an Agenta completion runner: the template,
    guidelines and context go in as the deployed prompt's inputs, and its `data` is the model's
    answer."""

    def __init__(self, client: AgentaCompletionClient, *, app: str) -> None:
        self._client = client
        self._app = app

    async def refine(
        self, request: RefineRequest, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        inputs = {
            "__ag_prompt_template_json": request.template_json,
            "__ag_guidelines": request.guidelines,
            "__ag_context": request.context,
        }
        reply = await self._client.run(
            self._app, inputs, time_left=time_left, traceparent=traceparent
        )
        return RefineReply(reply.data, reply.trace_id, reply.attempt)
