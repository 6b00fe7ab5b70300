"""The refine port on any OpenAI-compatible chat completions endpoint: OpenAI itself, a local
vLLM or Ollama, a LiteLLM gateway, a company proxy.

`POST {base_url}/chat/completions` with the service's own refine instructions as the system
message (`prompts/refine-v1.txt`, versioned with the package) and the template, guidelines and
context as the user message, a JSON object. The reply's first choice is the model's answer,
checked by the tool exactly as the Agenta runner's. The response format asks for the tool's
output JSON Schema; an endpoint that answers 400 to that gets `json_object` instead, from then
on.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

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
    UpstreamStatusError,
)

CHAT_PATH = "/chat/completions"
PROMPT_VERSION = "refine-v1"
SYSTEM_PROMPT = (Path(__file__).parent / "prompts" / f"{PROMPT_VERSION}.txt").read_text("utf-8")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class OpenAIRefiner:
    """Refines through `model` at `base_url`; `api_key`, when given, is sent as a Bearer token
    (local servers need none). `output_schema` is what the answer must match."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        limits: UpstreamLimits,
        *,
        base_url: str,
        model: str,
        output_schema: dict[str, Any],
        api_key: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self._endpoint = JsonEndpoint(
            transport,
            base_url.rstrip("/") + CHAT_PATH,
            limits,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        )
        self._model = model
        self._options: dict[str, Any] = {}
        if temperature is not None:
            self._options["temperature"] = temperature
        if max_tokens is not None:
            self._options["max_tokens"] = max_tokens
        self._json_schema = {
            "type": "json_schema",
            "json_schema": {"name": "refined_prompt", "strict": True, "schema": output_schema},
        }
        # Cleared for good once the endpoint refuses a JSON Schema response format.
        self.json_schema_accepted = True

    async def refine(
        self, request: RefineRequest, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        # One budget for the first request and, should it fall back, the second.
        timeout = self._endpoint.timeout
        deadline = time.monotonic() + (timeout if time_left is None else min(timeout, time_left))
        asked_for_schema = self.json_schema_accepted
        try:
            answer = await self._endpoint.post(
                self._body(request, json_schema=asked_for_schema),
                time_left=time_left,
                traceparent=traceparent,
            )
        except UpstreamStatusError as error:
            if not (asked_for_schema and _refuses_json_schema(error)):
                raise
            self.json_schema_accepted = False
            answer = await self._endpoint.post(
                self._body(request, json_schema=False),
                time_left=deadline - time.monotonic(),
                traceparent=traceparent,
            )
        try:
            return parse_chat_completion(answer.body, attempt=answer.attempt)
        except UpstreamError as error:
            error.attempt = answer.attempt
            raise

    def _body(self, request: RefineRequest, *, json_schema: bool) -> bytes:
        user = _JSON.encode(
            {
                "prompt_template_json": request.template_json,
                "guidelines": request.guidelines,
                "context": request.context,
            }
        )
        body = {
            "model": self._model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": user},
            ],
            "response_format": self._json_schema if json_schema else {"type": "json_object"},
            **self._options,
        }
        return _JSON.encode(body).encode()


def _refuses_json_schema(error: UpstreamStatusError) -> bool:
    """A 400 about the response format: servers name `response_format` or `json_schema` in
    their error (OpenAI in `error.param`, others in the message). Any other 400 (a context too
    long, an option the model does not take) is no reason to stop asking for the schema."""
    if error.status != 400:
        return False
    text = error.body.lower()
    return b"response_format" in text or b"json_schema" in text


def parse_chat_completion(body: bytes | bytearray, *, attempt: UpstreamAttempt) -> RefineReply:
    """The first choice's content as the model's answer, the response id as the trace id;
    raises only UpstreamBadReply (or a subclass). The values a parse would build are bounded
    first, for the envelope and for the content (the tool parses it again)."""
    reply = load_reply(body)
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamBadReply("the upstream reply has no choices")
    choice = choices[0]
    if choice.get("finish_reason") == "length":
        raise UpstreamBadReply(
            "the model ran out of tokens before it finished its answer (finish_reason length); "
            "a shorter template may fit, or the service's OPENAI_MAX_TOKENS is too low"
        )
    if choice.get("finish_reason") == "content_filter":
        raise UpstreamBadReply("the upstream's content filter stopped the model's answer")
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        if isinstance(message, dict) and message.get("refusal"):
            # The refusal's words are the model's: not passed on, like any other output.
            raise UpstreamBadReply("the model declined to answer")
        raise UpstreamBadReply("the upstream reply's first choice has no text content")
    check_value_count(content)
    tokens = _tokens(reply.get("usage"))
    if tokens is not None:
        attempt = replace(attempt, tokens=tokens)
    return RefineReply(content, trace_token(reply.get("id")), attempt)


# More tokens than any model's context holds is not a count this service believes.
_MAX_TOKENS_REPORTED = 100_000_000


def _tokens(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens from `usage`, when both are plausible counts."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if _is_count(prompt) and _is_count(completion):
        return prompt, completion
    return None


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _MAX_TOKENS_REPORTED
