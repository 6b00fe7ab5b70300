"""The OpenAI-compatible chat completions wire format, as the stand-in serves and checks it.

The service's OpenAI adapter and the stand-in agree on this convention, so tests can assert the
exact request the service sent and predict the exact reply:

- ``POST {base_url}/chat/completions``; the stand-in answers ``/v1/chat/completions`` and
  ``/chat/completions``, so a base URL with or without ``/v1`` both work.
- ``Authorization: Bearer KEY`` only when a key is configured (local servers need none).
- Body: ``model`` (non-empty string) and ``messages`` (a list of ``{role, content}``): a
  ``system`` message with the refine instructions (not checked here), then one ``user`` message
  whose content is a JSON object, as a string, with all three keys always present:
  ``{"prompt_template_json": str, "guidelines": str, "context": str}`` (``""`` when not given),
  and ``test_cases`` only when the caller sent test cases: a list of 1 to 20 objects
  ``{"inputs": {str: str}, "expected_output": str, "actual_output"?: str, "note"?: str}``. No
  other key. The last ``user`` message is the one read.
- ``response_format``: ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
  "strict": ...}}`` or ``{"type": "json_object"}``; optional ``temperature`` (0 to 2) and
  ``max_tokens`` (a positive integer). ``stream: true`` is refused: the adapter never streams.

The reply is ``{"id": "chatcmpl-...", "object": "chat.completion", "created": N, "model": <the
request's model>, "choices": [{"index": 0, "message": {"role": "assistant", "content": "<JSON
string {messages, summary}>"}, "finish_reason": "stop"}], "usage": {...}}``. Token counts are
``token_count`` of the request's message texts and of the reply's content, so tests can predict
them. Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "CHAT_PATH",
    "CHAT_PATHS",
    "JSON_SCHEMA_REFUSAL",
    "ChatRequest",
    "ChatRequestError",
    "asks_json_schema",
    "completion",
    "error_body",
    "parse_chat_request",
    "request_model",
    "response_id",
    "token_count",
]

CHAT_PATH: Final = "/v1/chat/completions"
CHAT_PATHS: Final = frozenset({CHAT_PATH, "/chat/completions"})
# The name of a json_schema response format, as OpenAI restricts it.
_SCHEMA_NAME_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
)
# What a server without structured outputs says to a json_schema request.
JSON_SCHEMA_REFUSAL: Final = "response_format json_schema is not supported"
_FORMATS: Final = frozenset({"json_schema", "json_object", "text"})
_USER_KEYS: Final = ("prompt_template_json", "guidelines", "context")
_TEST_CASE_KEYS: Final = frozenset({"inputs", "expected_output", "actual_output", "note"})
_MAX_TEST_CASES: Final = 20


class ChatRequestError(ValueError):
    """The request breaks the convention; ``param`` names the field, as OpenAI's 400 does."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the stand-in reads from a valid chat completions request."""

    model: str
    template_json: str
    guidelines: str
    context: str
    prompt_tokens: int
    test_cases: tuple[dict[str, Any], ...] = ()


def token_count(text: str) -> int:
    """A deterministic stand-in for a tokenizer: one token per four characters, rounded up."""
    return (len(text) + 3) // 4


def response_id() -> str:
    """A fresh ``chatcmpl-`` id, as OpenAI gives every completion."""
    return "chatcmpl-" + secrets.token_hex(12)


def request_model(body: Any) -> str:
    """The request's model, echoed in replies; ``"standin"`` when the request has none."""
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else "standin"


def asks_json_schema(body: Any) -> bool:
    """True when the request asks for ``response_format`` of type ``json_schema``."""
    if not isinstance(body, dict):
        return False
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_schema"


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: Any = None
) -> dict[str, Any]:
    """OpenAI's error body; ``kind`` is its ``type`` field."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise ChatRequestError(where, f"{where} must be a string or a list of text parts")


def _check_options(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in _FORMATS:
            raise ChatRequestError("response_format", "response_format.type is not supported")
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            name = spec.get("name") if isinstance(spec, dict) else None
            if (
                not isinstance(name, str)
                or not 0 < len(name) <= 64
                or set(name) - _SCHEMA_NAME_CHARS
            ):
                raise ChatRequestError("response_format", "json_schema.name is missing or invalid")
            if not isinstance(spec.get("schema"), dict):
                raise ChatRequestError("response_format", "json_schema.schema must be an object")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise ChatRequestError("temperature", "temperature must be a number from 0 to 2")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ChatRequestError("max_tokens", "max_tokens must be a positive integer")
    if body.get("stream"):
        raise ChatRequestError("stream", "the stand-in does not stream")


def _is_test_case(case: Any) -> bool:
    """Whether ``case`` is one test case as the convention above has it."""
    if not isinstance(case, dict) or set(case) - _TEST_CASE_KEYS:
        return False
    inputs = case.get("inputs")
    return (
        isinstance(inputs, dict)
        and all(isinstance(value, str) for value in inputs.values())
        and isinstance(case.get("expected_output"), str)
        and all(isinstance(case.get(key, ""), str) for key in ("actual_output", "note"))
    )


def _test_cases(fields: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The user message's test cases (none when the key is absent); ``ChatRequestError`` when
    the key is there but is not a list of 1 to 20 test cases."""
    if "test_cases" not in fields:
        return ()
    cases = fields["test_cases"]
    if (
        not isinstance(cases, list)
        or not 0 < len(cases) <= _MAX_TEST_CASES
        or not all(map(_is_test_case, cases))
    ):
        raise ChatRequestError(
            "messages",
            "test_cases must be a list of 1 to 20 objects with string-valued inputs, a string "
            "expected_output and optional string actual_output and note",
        )
    return tuple(cases)


def parse_chat_request(body: Any) -> ChatRequest:
    """Check ``body`` against the convention above; raise ``ChatRequestError`` naming the field."""
    if not isinstance(body, dict):
        raise ChatRequestError("body", "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatRequestError("model", "model must be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatRequestError("messages", "messages must be a non-empty list")
    texts: list[str] = []
    user: str | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatRequestError(where, f"{where} must be an object with a role")
        text = _text(message.get("content"), f"{where}.content")
        texts.append(text)
        if message["role"] == "user":
            user = text
    _check_options(body)
    if user is None:
        raise ChatRequestError("messages", "no user message")
    try:
        fields = json.loads(user)
    except ValueError:
        fields = None
    if (
        not isinstance(fields, dict)
        or any(not isinstance(fields.get(k), str) for k in _USER_KEYS)
        or set(fields) - {*_USER_KEYS, "test_cases"}
    ):
        raise ChatRequestError(
            "messages",
            "the user message must be a JSON object with string prompt_template_json, "
            "guidelines and context, an optional test_cases and no other key",
        )
    return ChatRequest(
        model=model,
        template_json=fields["prompt_template_json"],
        guidelines=fields["guidelines"],
        context=fields["context"],
        prompt_tokens=sum(token_count(text) for text in texts),
        test_cases=_test_cases(fields),
    )


def completion(
    model: str,
    content: str | None,
    *,
    completion_id: Any,
    prompt_tokens: int,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    """A ``chat.completion`` object; ``content`` None means no choices at all.

    ``completion_id`` None leaves the id out; any other JSON value is sent as is.
    """
    reply: dict[str, Any] = {}
    if completion_id is not None:
        reply["id"] = completion_id
    reply.update(object="chat.completion", created=int(time.time()), model=model)
    choices: list[dict[str, Any]] = []
    if content is not None:
        message = {"role": "assistant", "content": content}
        choices.append({"index": 0, "message": message, "finish_reason": finish_reason})
    reply["choices"] = choices
    completion_tokens = token_count(content or "")
    reply["usage"] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return reply
