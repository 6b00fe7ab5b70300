"""A declared tool at run time: a `DeclaredToolSpec` from the tools file, served as a `Tool`.

A call asks the upstream as the spec says (its messages, rendered with the arguments, to an
OpenAI-compatible endpoint; or the arguments as the inputs of an app on the Agenta runner),
then holds the model's answer to the tool's output schema: it must parse as a JSON object and
validate, else the caller gets INVALID_MODEL_OUTPUT, whose message names the schema rule that
failed and never quotes the model's text. Everything that is the same for every call (the
output validator, the fixed parts of the request) is made once, when the tool is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from jsonschema import Draft202012Validator

from aiservices_server.call import Call
from aiservices_server.jsonbounds import holds_more_values, may_hold_more_values
from aiservices_server.tools.base import (
    JsonObject,
    ToolDefinition,
    ToolErrorCode,
    ToolFailure,
    ToolResult,
)
from aiservices_server.tools.declared import (
    DeclaredToolSpec,
    PromptMessage,
    argument_text,
    fill,
    template_parts,
)
from aiservices_server.tools.outcomes import decode_model_json, upstream_failure
from aiservices_server.upstream.apps import AppRunner
from aiservices_server.upstream.chat import ChatModels, Message, StructuredChat
from aiservices_server.upstream.refiner import RefineReply, UpstreamError

# Values (object members and list items) a declared tool's answer may hold. Validating costs
# jsonschema microseconds per value: at this bound an answer is checked well within the 50 ms a
# call may hold the event loop, while real answers hold dozens.
MAX_OUTPUT_VALUES = 10_000
# How much of a schema path a message shows: paths name the operator's schema, not the model's
# words, but a deep schema's path can be long.
_MAX_PATH_CHARS = 200


class _Asker(Protocol):
    """How one tool asks its upstream: the arguments in, the model's answer out."""

    async def __call__(
        self, arguments: JsonObject, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply: ...


class _ChatAsker:
    """The tool's messages, each placeholder filled with its argument (`declared.render`); the
    contents are split into text and placeholders once, when the tool is made."""

    __slots__ = ("_chat", "_messages")

    def __init__(self, messages: Sequence[PromptMessage], chat: StructuredChat) -> None:
        self._messages = tuple((m.role, template_parts(m.content)) for m in messages)
        self._chat = chat

    async def __call__(
        self, arguments: JsonObject, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        messages: list[Message] = [
            {"role": role, "content": fill(parts, arguments)} for role, parts in self._messages
        ]
        return await self._chat.complete(messages, time_left=time_left, traceparent=traceparent)


class _AppAsker:
    """The app's inputs: every property of the input schema (an absent one as ""), and any
    other argument the schema lets in, each as `argument_text`."""

    __slots__ = ("_absent", "_app", "_runner")

    def __init__(self, app: str, properties: Iterable[str], runner: AppRunner) -> None:
        self._app = app
        self._absent = dict.fromkeys(properties, "")
        self._runner = runner

    async def __call__(
        self, arguments: JsonObject, *, time_left: float | None, traceparent: str | None
    ) -> RefineReply:
        inputs = self._absent.copy()
        for name, value in arguments.items():
            inputs[name] = argument_text(value)
        reply = await self._runner.run(
            self._app, inputs, time_left=time_left, traceparent=traceparent
        )
        return RefineReply(reply.data, reply.trace_id, reply.attempt)


def _invalid_output(message: str, trace_id: str, reply: RefineReply) -> ToolFailure:
    return ToolFailure(
        ToolErrorCode.INVALID_MODEL_OUTPUT,
        f"the model's output was rejected: {message}",
        retryable=True,
        trace_id=trace_id,
        upstream=reply.attempt,
    )


def _schema_path(parts: Iterable[Any]) -> str:
    path = "/" + "/".join(str(part) for part in parts)
    return path if len(path) <= _MAX_PATH_CHARS else path[:_MAX_PATH_CHARS] + "..."


class DeclaredTool:
    """A declared tool on one upstream: `asker` is how it asks (see `on_chat`, `on_app`)."""

    def __init__(self, spec: DeclaredToolSpec, asker: _Asker) -> None:
        self._definition = spec.definition
        self._text_field = spec.text_field
        self._asker = asker
        # Compiled once per tool, not per call; the loader has checked the schema.
        self._validator = Draft202012Validator(spec.definition.output_schema)

    @classmethod
    def on_chat(cls, spec: DeclaredToolSpec, models: ChatModels) -> DeclaredTool:
        """The tool on an OpenAI-compatible upstream: `spec.messages` must be set."""
        assert spec.messages is not None
        chat = models.for_tool(
            spec.definition.name,
            spec.definition.output_schema,
            model=spec.model,
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
        )
        return cls(spec, _ChatAsker(spec.messages, chat))

    @classmethod
    def on_app(cls, spec: DeclaredToolSpec, runner: AppRunner) -> DeclaredTool:
        """The tool on the Agenta runner: `spec.agenta_app` must be set."""
        assert spec.agenta_app is not None
        properties = spec.definition.input_schema.get("properties") or {}
        return cls(spec, _AppAsker(spec.agenta_app, properties, runner))

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        try:
            reply = await self._asker(
                arguments, time_left=call.time_left(), traceparent=call.traceparent
            )
        except UpstreamError as error:
            raise upstream_failure(error) from None
        output = self._check(reply)
        text_field = self._text_field
        text = output[text_field] if text_field is not None else orjson.dumps(output).decode()
        return ToolResult(
            text=text, structured=output, trace_id=reply.trace_id, upstream=reply.attempt
        )

    def _check(self, reply: RefineReply) -> JsonObject:
        """The answer as an object that fits the output schema, or INVALID_MODEL_OUTPUT."""
        data, trace_id = reply.output, reply.trace_id
        # The Agenta runner may send `data` parsed (an object), not as text: the same bound.
        too_many = may_hold_more_values if isinstance(data, str) else holds_more_values
        if too_many(data, MAX_OUTPUT_VALUES):
            raise _invalid_output(
                f"it holds more than {MAX_OUTPUT_VALUES:,} JSON values", trace_id, reply
            )
        try:
            output = decode_model_json(data)
        except (ValueError, RecursionError):
            raise _invalid_output("it is not valid JSON", trace_id, reply) from None
        if not isinstance(output, dict):
            raise _invalid_output("it is not a JSON object", trace_id, reply)
        # is_valid first: a third cheaper than finding the error, which only a refusal needs.
        if self._validator.is_valid(output):
            return output
        error = next(self._validator.iter_errors(output))  # there is one: is_valid said so
        # The schema's path and rule, the operator's words; never the value, the model's.
        path = _schema_path(error.absolute_schema_path)
        raise _invalid_output(
            f"it does not match the tool's output schema (rule {error.validator} at {path})",
            trace_id,
            reply,
        )


@dataclass(frozen=True, slots=True)
class DeclaredUpstream:
    """The upstream declared tools are served on: `chat` (OpenAI-compatible) or `apps` (the
    Agenta runner); `name` says which, in the lines about tools left out."""

    name: str
    chat: ChatModels | None = None
    apps: AppRunner | None = None


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A declared tool not served, and why (one start-up line each)."""

    name: str
    reason: str


def declared_tools(
    specs: Iterable[DeclaredToolSpec], upstream: DeclaredUpstream
) -> tuple[tuple[DeclaredTool, ...], tuple[LeftOut, ...]]:
    """A tool for each spec with something for `upstream` (messages for a chat upstream, an
    app for the Agenta runner), in order, and the specs left out."""
    tools: list[DeclaredTool] = []
    left_out: list[LeftOut] = []
    for spec in specs:
        if upstream.chat is not None and spec.messages is not None:
            tools.append(DeclaredTool.on_chat(spec, upstream.chat))
        elif upstream.apps is not None and spec.agenta_app is not None:
            tools.append(DeclaredTool.on_app(spec, upstream.apps))
        else:
            wanted = "messages" if upstream.chat is not None else "agenta_app"
            left_out.append(
                LeftOut(
                    spec.definition.name, f"it has no {wanted} for the {upstream.name} upstream"
                )
            )
    return tuple(tools), tuple(left_out)
