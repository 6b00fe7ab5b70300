"""The refine port on any OpenAI-compatible chat completions endpoint: OpenAI itself, a local
vLLM or Ollama, a LiteLLM gateway, a company proxy.

`POST {base_url}/chat/completions` with the service's own refine instructions as the system
message (`prompts/refine-v1.txt`, versioned with the package; `refine-v2.txt` for a call with
test cases) and the template, guidelines and context (and the test cases, when there are any)
as the user message, a JSON object. The reply's first choice is the model's answer,
checked by the tool exactly as the Agenta runner's. The response format asks for the tool's
output JSON Schema; when the endpoint refuses that format, the call is made again with
`json_object`, and so is every call for the next FORMAT_VERDICT_SECONDS. Only what no caller
can write decides that the format was refused: the error's structured fields, or a probe of the
service's own (see `SchemaFormat`, which the declared tools' adapter in `upstream.chat` shares).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeGuard

import httpx

from aiservices_server.tracing import Attributes, AttributeValue
from aiservices_server.upstream.http import (
    MAX_SPAN_TEXT,
    Answer,
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
# The refine instructions, versioned with the package. A call with test cases is sent the newest,
# which tells the model what test cases are for; a call without them is sent the one before it,
# the same words without the test cases, so its request is what it was before they existed.
PROMPT_VERSION = "refine-v2"
PROMPT_VERSION_WITHOUT_TEST_CASES = "refine-v1"
_PROMPTS = Path(__file__).parent / "prompts"
SYSTEM_PROMPT = (_PROMPTS / f"{PROMPT_VERSION_WITHOUT_TEST_CASES}.txt").read_text("utf-8")
SYSTEM_PROMPT_WITH_TEST_CASES = (_PROMPTS / f"{PROMPT_VERSION}.txt").read_text("utf-8")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# How long a verdict on the JSON Schema format holds, either way: a server can gain or lose
# structured outputs under a running service (an upgrade, a proxy sending the model elsewhere).
FORMAT_VERDICT_SECONDS = 600.0
# The probe: a refine of a fixed template of the service's own, no caller's words in it; one
# token of answer is enough, as only the status counts.
PROBE_MESSAGES = ({"role": "user", "content": "Hello."},)
PROBE_MAX_TOKENS = 1
_PROBE_REQUEST = RefineRequest(json.dumps({"messages": list(PROBE_MESSAGES)}))


def chat_options(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    """The request's sampling options: those set, and no others."""
    options: dict[str, Any] = {}
    if temperature is not None:
        options["temperature"] = temperature
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    return options


def frame(request: dict[str, Any], marker: str) -> tuple[str, str]:
    """`request` encoded and split around the string `marker` it holds in one place, so that
    a body is the text before, one encoded value, and the text after: what stays the same for
    every call is encoded once. `marker` must encode as itself and appear nowhere else."""
    before, _, after = _JSON.encode(request).partition(_JSON.encode(marker))
    return before, after


def chat_endpoint(
    transport: httpx.AsyncBaseTransport,
    limits: UpstreamLimits,
    base_url: str,
    model: str,
    api_key: str | None,
) -> JsonEndpoint:
    """`{base_url}/chat/completions` through the shared transport, `api_key` as a Bearer token
    when given (local servers need none); with traces on, its client spans name the model."""
    return JsonEndpoint(
        transport,
        base_url.rstrip("/") + CHAT_PATH,
        limits,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
        span_attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": model[:MAX_SPAN_TEXT],
        },
        describe_reply=chat_reply_attributes,
    )


class SchemaFormat:
    """Whether one model at one endpoint takes the JSON Schema response format, as last found,
    and the requests that find out. `post` asks for it and, when the endpoint refuses it, asks
    again for `json_object`; the verdict holds FORMAT_VERDICT_SECONDS on `clock` either way
    (injectable, so tests need not wait minutes). One per model, shared by whatever asks it."""

    def __init__(self, endpoint: JsonEndpoint, clock: Callable[[], float]) -> None:
        self._endpoint = endpoint
        self._clock = clock
        # Until when this model is asked for json_object: the endpoint refused the schema.
        self._json_object_until = -math.inf
        # Until when a probe's success stands: a 400 whose text alone names the format is then
        # passed on without another probe, so no caller can have one sent for each of its calls.
        self._probe_accepted_until = -math.inf

    async def complete(
        self,
        body: Callable[[bool], bytes],
        probe: bytes,
        *,
        time_left: float | None,
        traceparent: str | None,
    ) -> RefineReply:
        """The model's answer (`parse_chat_completion`) to `body(True)` (asking for the
        schema) or, once the endpoint refused that, to `body(False)` (json_object), both within
        one budget. `probe` is a request of the service's own asking for the schema, with no
        caller's words in it."""
        answer = await self._post(body, probe, time_left=time_left, traceparent=traceparent)
        try:
            return parse_chat_completion(answer.body, attempt=answer.attempt)
        except UpstreamError as error:
            raise error.with_attempt(answer.attempt) from None

    async def _post(
        self,
        body: Callable[[bool], bytes],
        probe: bytes,
        *,
        time_left: float | None,
        traceparent: str | None,
    ) -> Answer:
        timeout = self._endpoint.timeout
        deadline = time.monotonic() + (timeout if time_left is None else min(timeout, time_left))
        asked_for_schema = self._clock() >= self._json_object_until
        try:
            return await self._endpoint.post(
                body(asked_for_schema), time_left=time_left, traceparent=traceparent
            )
        except UpstreamStatusError as error:
            if not (asked_for_schema and await self._refused(error, probe, deadline, traceparent)):
                raise
        self._json_object_until = self._clock() + FORMAT_VERDICT_SECONDS
        return await self._endpoint.post(
            body(False), time_left=deadline - time.monotonic(), traceparent=traceparent
        )

    async def _refused(
        self, error: UpstreamStatusError, probe: bytes, deadline: float, traceparent: str | None
    ) -> bool:
        """Whether `error`, the answer to a request for the JSON Schema format, refuses that
        format: a 400 whose structured fields name it (`param: "response_format"`, or a `code`
        such as `unsupported_response_format`), as OpenAI gives.

        A 400 whose message alone names the format may be the caller's own words echoed (a
        template that mentions `response_format`), so it only counts when the probe, which
        carries none, is refused as well; `deadline` bounds the probe with the call.
        """
        if error.status != 400:
            return False
        verdict = _format_verdict(error.body)
        if verdict is not None:
            return verdict
        if not _names_format(error.body) or self._clock() < self._probe_accepted_until:
            return False
        try:
            await self._endpoint.post(
                probe, time_left=deadline - time.monotonic(), traceparent=traceparent
            )
        except UpstreamStatusError as refused:
            if refused.status != 400:
                return False
            # The probe holds no caller's words, so its message can be trusted too.
            verdict = _format_verdict(refused.body)
            return _names_format(refused.body) if verdict is None else verdict
        except UpstreamError:
            return False  # the probe tells nothing: keep asking for the schema
        self._probe_accepted_until = self._clock() + FORMAT_VERDICT_SECONDS
        return False


class OpenAIRefiner:
    """Refines through `model` at `base_url`; `api_key`, when given, is sent as a Bearer token
    (local servers need none). `output_schema` is what the answer must match.

    Whether the endpoint takes the JSON Schema response format is decided for this one model
    and held FORMAT_VERDICT_SECONDS on `clock` (injectable, so tests need not wait minutes).
    """

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._endpoint = chat_endpoint(transport, limits, base_url, model, api_key)
        self._model = model
        self._options = chat_options(temperature, max_tokens)
        self._json_schema = {
            "type": "json_schema",
            "json_schema": {"name": "refined_prompt", "strict": True, "schema": output_schema},
        }
        # The body but the user message is the same for every call: encoded once per format and
        # system prompt (with test cases or without), as the text before and after that message.
        self._frames = {
            (schema, cases): self._frame(schema, cases)
            for schema in (True, False)
            for cases in (True, False)
        }
        self._format = SchemaFormat(self._endpoint, clock)
        self._probe = self._body(_PROBE_REQUEST, json_schema=True, max_tokens=PROBE_MAX_TOKENS)

    async def refine(
        self, request: RefineRequest, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        return await self._format.complete(
            lambda json_schema: self._body(request, json_schema=json_schema),
            self._probe,
            time_left=time_left,
            traceparent=traceparent,
        )

    def _body(
        self, request: RefineRequest, *, json_schema: bool, max_tokens: int | None = None
    ) -> bytes:
        fields: dict[str, Any] = {
            "prompt_template_json": request.template_json,
            "guidelines": request.guidelines,
            "context": request.context,
        }
        cases = bool(request.test_cases)
        if cases:  # only then: without test cases the message is what it always was
            fields["test_cases"] = [case.as_object() for case in request.test_cases]
        user = _JSON.encode(fields)
        if max_tokens is not None:  # the service's own probe: rare, encoded whole
            request_body = self._request(user, json_schema, cases, max_tokens=max_tokens)
            return _JSON.encode(request_body).encode()
        before, after = self._frames[json_schema, cases]
        return (before + _JSON.encode(user) + after).encode()

    def _request(
        self, user: str, json_schema: bool, test_cases: bool = False, **options: Any
    ) -> dict[str, Any]:
        system = SYSTEM_PROMPT_WITH_TEST_CASES if test_cases else SYSTEM_PROMPT
        return {
            "model": self._model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "response_format": self._json_schema if json_schema else {"type": "json_object"},
            **self._options,
            **options,
        }

    def _frame(self, json_schema: bool, test_cases: bool) -> tuple[str, str]:
        """The encoded request around its user message's JSON string."""
        marker = "\x00user\x00"  # encodes as itself; no JSON text of a request holds it
        return frame(self._request(marker, json_schema, test_cases), marker)


def _format_verdict(body: bytes) -> bool | None:
    """What an error body's structured fields say of the response format: True when `param` or
    `code` names it, False when `param` names another field (a message too long, say), None when
    they say nothing (no such fields, or not JSON). OpenAI nests them in `error`; vLLM puts them
    at the top."""
    try:
        reply = load_reply(body)
    except UpstreamBadReply:
        return None
    if not isinstance(reply, dict):
        return None
    error = reply.get("error")
    fields = error if isinstance(error, dict) else reply
    param, code = fields.get("param"), fields.get("code")
    if _names_format(param) or _names_format(code):
        return True
    if isinstance(param, str) and param:
        return False
    return None


def _names_format(value: object) -> bool:
    """Whether `value`, text or bytes, names the response format; anything else does not."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return False
    text = value.lower()
    return "response_format" in text or "json_schema" in text


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


MAX_FINISH_REASONS = 16


def chat_reply_attributes(body: bytes | bytearray) -> Attributes:
    """The GenAI attributes of an OpenAI-compatible chat completion reply: the model that
    answered, the token usage and the finish reasons (never the text). Only short strings and
    whole numbers are taken; a reply that does not parse says nothing (the tool reports it)."""
    try:
        reply = load_reply(body)
    except UpstreamError:
        return {}
    if not isinstance(reply, dict):
        return {}
    found: dict[str, AttributeValue] = {}
    model = reply.get("model")
    if isinstance(model, str) and model:
        found["gen_ai.response.model"] = model[:MAX_SPAN_TEXT]
    tokens = _tokens(reply.get("usage"))  # as the access line counts them
    if tokens is not None:
        found["gen_ai.usage.input_tokens"], found["gen_ai.usage.output_tokens"] = tokens
    choices = reply.get("choices")
    if isinstance(choices, list):
        reasons = [
            choice["finish_reason"][:MAX_SPAN_TEXT]
            for choice in choices[:MAX_FINISH_REASONS]
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str)
        ]
        if reasons:
            found["gen_ai.response.finish_reasons"] = reasons
    return found


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
