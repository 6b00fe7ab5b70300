"""Scenarios that answer the OpenAI-compatible chat completions endpoint's own ways of failing.

They share the queue with the generic scenarios in ``tests.standin.app`` (``Status``, ``Slow``,
``Hang``, ``Garbage``...), which answer either endpoint in its own shape. Those that mean
nothing to the Agenta completion runner (``Length``, ``NoChoices``) answer it with a 501 that
names them, so a misplaced one fails loudly instead of passing as an upstream error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.standin import openai
from tests.standin.app import (
    AUTO,
    Exchange,
    Refine,
    Scenario,
    TraceId,
    chat_only,
    json_schema_refusal,
    openai_unauthorized,
    refined_body,
)

__all__ = [
    "ContentNotJson",
    "ContentReply",
    "Length",
    "NoChoices",
    "QuotingBadRequest",
    "RateLimited",
    "RejectJsonSchema",
    "Unauthorized",
]


@dataclass(frozen=True, slots=True)
class ContentReply(Scenario):
    """Answer exactly ``content`` as the model's message (a non-str is JSON-encoded).

    ``finish_reason`` and ``response_id`` (None: left out) are sent as given. On the Agenta
    endpoint ``content`` is the envelope's data, so one scenario serves either upstream.
    """

    content: Any
    finish_reason: str = "stop"
    response_id: TraceId = AUTO

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        content = self.content if isinstance(self.content, str) else json.dumps(self.content)
        return exchange.answer(content, self.response_id, self.finish_reason)


@dataclass(frozen=True, slots=True)
class ContentNotJson(ContentReply):
    """The model chatted instead of answering JSON (Agenta: the same text as its data)."""

    content: Any = "Sure! Here is a refined version of your prompt."


@dataclass(frozen=True, slots=True)
class Length(Scenario):
    """The model ran out of tokens: ``finish_reason: "length"`` and the refinement cut in half."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        refused = chat_only(exchange, self)
        if refused is not None:
            return refused
        reply = refined_body(exchange, "Tightened the wording.", AUTO, "length")
        return reply if isinstance(reply, web.StreamResponse) else web.json_response(reply)


@dataclass(frozen=True, slots=True)
class NoChoices(Scenario):
    """A ``chat.completion`` with ``choices: []`` (some proxies answer so on a content filter)."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        refused = chat_only(exchange, self)
        return refused if refused is not None else exchange.answer(None)


@dataclass(frozen=True, slots=True)
class RejectJsonSchema(Scenario):
    """A server without structured outputs: a ``json_schema`` request gets OpenAI's 400 for
    ``response_format`` (not ``structured``: the message alone, no ``param``); any other request
    is answered by ``then``.

    For every request rather than one, set ``StandinUpstream.reject_json_schema``.
    """

    then: Scenario = field(default_factory=Refine)
    structured: bool = True

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        if exchange.chat and openai.asks_json_schema(exchange.body):
            return json_schema_refusal(self.structured)
        return await self.then.respond(exchange)


@dataclass(frozen=True, slots=True)
class QuotingBadRequest(Scenario):
    """400 whose message quotes the request's last user message, as a server explaining what it
    refused may: the caller's own words come back in the error. ``param`` is sent as given
    (None: null), ``code`` is null."""

    param: str | None = None

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        refused = chat_only(exchange, self)
        if refused is not None:
            return refused
        body = exchange.body if isinstance(exchange.body, dict) else {}
        users = [
            message["content"]
            for message in body.get("messages") or []
            if isinstance(message, dict)
            and message.get("role") == "user"
            and isinstance(message.get("content"), str)
        ]
        quoted = users[-1] if users else ""
        error = openai.error_body(f"This request was refused: {quoted}", param=self.param)
        return web.json_response(error, status=400)


@dataclass(frozen=True, slots=True)
class RateLimited(Scenario):
    """429 with ``Retry-After`` (None: no header) and the endpoint's error body."""

    retry_after: float | None = 1

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        response = exchange.error(
            429, "Rate limit reached. Please try again later.", "requests", "rate_limit_exceeded"
        )
        if self.retry_after is not None:
            seconds = self.retry_after
            response.headers["Retry-After"] = str(
                int(seconds) if seconds == int(seconds) else seconds
            )
        return response


@dataclass(frozen=True, slots=True)
class Unauthorized(Scenario):
    """401 as for a wrong key, in the endpoint's shape (OpenAI: ``invalid_api_key``)."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        if not exchange.chat:
            return exchange.error(401, "invalid api key")
        return openai_unauthorized()
