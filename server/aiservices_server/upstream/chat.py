"""Structured chat completions: the port a declared tool calls on an OpenAI-compatible upstream,
and its adapter.

The port: messages in (the tool's, already rendered), the model's answer text, its trace id and
the HTTP attempt out (a `RefineReply`, the same shape refine_prompt gets), or an UpstreamError.
What stays the same for every call of one tool (its output schema, its name, the model and its
options) is given once, when the tool's `StructuredChat` is made (`OpenAIChat.for_tool`), and
the fixed parts of the request body are encoded then.

The request asks for the tool's output schema as the `json_schema` response format, and falls
back to `json_object` by the same rules as the refine adapter (`upstream.openai`): only an
error's structured fields, or a probe of the service's own, decide that the endpoint refuses the
format, and the verdict holds FORMAT_VERDICT_SECONDS for the model, shared by every tool that
uses it. In `json_object` mode the model is not given the schema by the response format, so a
last system message tells it: `SCHEMA_INSTRUCTION` followed by the schema as compact JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import httpx

from aiservices_server.upstream.http import JsonEndpoint, UpstreamLimits
from aiservices_server.upstream.openai import (
    PROBE_MAX_TOKENS,
    PROBE_MESSAGES,
    SchemaFormat,
    chat_endpoint,
    chat_options,
    frame,
)
from aiservices_server.upstream.refiner import RefineReply

# json, not orjson: as in the refine adapter, one encoder and no buffer per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
SCHEMA_INSTRUCTION = (
    "Answer with one JSON object, and nothing else, that matches this JSON Schema: "
)
"""The start of the system message that carries the output schema in `json_object` mode."""
# A json_schema format's name: what OpenAI accepts ([A-Za-z0-9_-], at most 64 characters).
MAX_FORMAT_NAME_CHARS = 64
# What OpenAI's strict structured outputs take. A schema using anything else (bounds, lengths,
# formats) is sent with `strict: false`: the format then guides the model, and the tool still
# checks every answer against the whole schema.
STRICT_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "anyOf",
        "description",
        "title",
    }
)

Message = dict[str, str]


class StructuredChat(Protocol):
    """One tool's chat completions: `messages` (role and content) in, the model's answer out,
    within `time_left` seconds (None: the adapter's own timeout), `traceparent` passed on;
    raises UpstreamError."""

    async def complete(
        self, messages: Sequence[Message], *, time_left: float | None, traceparent: str | None
    ) -> RefineReply: ...


class ChatModels(Protocol):
    """Where tools' structured chats are made: one per tool, its output schema, name and model
    options fixed when it is made (see `OpenAIChat.for_tool`)."""

    def for_tool(
        self,
        name: str,
        output_schema: dict[str, Any],
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> StructuredChat: ...


def format_name(tool_name: str) -> str:
    """The json_schema format's name for a tool: its name with dots as underscores, cut to what
    OpenAI accepts (tool names hold only a-z 0-9 _ - and dots)."""
    return tool_name.replace(".", "_")[:MAX_FORMAT_NAME_CHARS]


def strict_compatible(schema: Any) -> bool:
    """Whether `schema` is one OpenAI's strict mode takes: only `STRICT_KEYWORDS`, and every
    object closed (`additionalProperties: false`) with every property required. Walked with a
    stack of its own; the loader has bounded the schema's size and depth."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or set(node) - STRICT_KEYWORDS:
            return False
        properties = node.get("properties")
        if node.get("type") == "object" or properties is not None:
            properties = properties or {}
            if not isinstance(properties, dict) or node.get("additionalProperties") is not False:
                return False
            if set(node.get("required") or ()) != set(properties):
                return False
            stack.extend(properties.values())
        if "items" in node:
            stack.append(node["items"])
        if "anyOf" in node:
            if not isinstance(node["anyOf"], list):
                return False
            stack.extend(node["anyOf"])
    return True


class OpenAIChat:
    """An OpenAI-compatible chat completions endpoint at `base_url`, through the shared
    transport and limits; `model`, `temperature` and `max_tokens` are the settings' defaults,
    which a tool may override. `clock` decides how long format verdicts hold (injectable)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        limits: UpstreamLimits,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # One endpoint per model, so its client spans name the model asked (a tool may choose).
        self._endpoint_for: Callable[[str], JsonEndpoint] = lambda chosen: chat_endpoint(
            transport, limits, base_url, chosen, api_key
        )
        self._model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._clock = clock
        self._formats: dict[str, SchemaFormat] = {}

    def for_tool(
        self,
        name: str,
        output_schema: dict[str, Any],
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> StructuredChat:
        """The structured chat of the tool `name`: its answers asked in `output_schema`, through
        `model` (default: the settings') with its options (each defaulting to the settings')."""
        chosen = model or self._model
        schema_format = self._formats.get(chosen)
        if schema_format is None:
            endpoint = self._endpoint_for(chosen)
            schema_format = self._formats[chosen] = SchemaFormat(endpoint, self._clock)
        options = chat_options(
            self._temperature if temperature is None else temperature,
            self._max_tokens if max_tokens is None else max_tokens,
        )
        return _OpenAIToolChat(
            schema_format,
            name=name,
            output_schema=output_schema,
            model=chosen,
            options=options,
        )


class _OpenAIToolChat:
    """One tool's structured chat on an OpenAI-compatible endpoint; see the module's words."""

    def __init__(
        self,
        schema_format: SchemaFormat,
        *,
        name: str,
        output_schema: dict[str, Any],
        model: str,
        options: dict[str, Any],
    ) -> None:
        self._format = schema_format
        json_schema = {
            "type": "json_schema",
            "json_schema": {
                "name": format_name(name),
                "strict": strict_compatible(output_schema),
                "schema": output_schema,
            },
        }
        self._schema_message: Message = {
            "role": "system",
            "content": SCHEMA_INSTRUCTION + _JSON.encode(output_schema),
        }
        # Everything but the messages is the same for every call: encoded once per format, as
        # the text before and after the messages list.
        marker = "\x00messages\x00"
        self._frames = {
            schema: frame(
                {"model": model, "messages": marker, "response_format": response_format, **options},
                marker,
            )
            for schema, response_format in ((True, json_schema), (False, {"type": "json_object"}))
        }
        probe = {
            "model": model,
            "messages": list(PROBE_MESSAGES),
            "response_format": json_schema,
            **options,
            "max_tokens": PROBE_MAX_TOKENS,
        }
        self._probe = _JSON.encode(probe).encode()

    def _body(self, messages: Sequence[Message], json_schema: bool) -> bytes:
        before, after = self._frames[json_schema]
        sent = list(messages) if json_schema else [*messages, self._schema_message]
        return (before + _JSON.encode(sent) + after).encode()

    async def complete(
        self, messages: Sequence[Message], *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        return await self._format.complete(
            lambda json_schema: self._body(messages, json_schema),
            self._probe,
            time_left=time_left,
            traceparent=traceparent,
        )
