"""tools.agenta.api.refine_prompt: improve a prompt template with a prompt deployed on Agenta.

The upstream does the thinking; this module checks what goes in and, above all, what comes
back: a model may drop a variable or merge messages, and a caller must never get that as a
"refined" template.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from aiservices_server.call import Call
from aiservices_server.errors import FieldViolation, InvalidArgument, clip
from aiservices_server.tools.base import (
    JsonObject,
    ToolAnnotations,
    ToolDefinition,
    ToolErrorCode,
    ToolFailure,
    ToolResult,
)
from aiservices_server.tools.templates import (
    PromptTemplate,
    TemplateError,
    parse_template,
    template_variables,
)
from aiservices_server.upstream.refiner import (
    Refiner,
    RefineRequest,
    UpstreamBadReply,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

NAME = "tools.agenta.api.refine_prompt"
PERMISSION = "edit_workflows"
DEFAULT_SUMMARY = "Prompt refined successfully."
MAX_TEMPLATE_CHARS = 100_000
MAX_TEXT_CHARS = 10_000
# What refined text may not hold: C0 controls but tab, newline and carriage return; DEL; C1
# controls; and the bidirectional embeddings, overrides and isolates, which reorder how a line
# reads. They drive terminals and hide text from the people who read it. One character class:
# nothing to backtrack, one pass over the text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")

INPUT_SCHEMA: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt_template_json"],
    "properties": {
        "prompt_template_json": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_TEMPLATE_CHARS,
            "description": (
                "The prompt template as a JSON object string: a non-empty `messages` list of "
                "{role, content} and an optional `template_format` "
                "(curly, fstring, jinja2 or mustache; default curly)."
            ),
        },
        "guidelines": {
            "type": "string",
            "maxLength": MAX_TEXT_CHARS,
            "description": "What to improve, e.g. 'make it shorter and more formal'.",
        },
        "context": {
            "type": "string",
            "maxLength": MAX_TEXT_CHARS,
            "description": "Background on how the prompt is used.",
        },
    },
}

OUTPUT_SCHEMA: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["messages", "summary"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "description": "The refined messages: same count and roles, every variable kept.",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["role", "content"],
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
        },
        "summary": {"type": "string", "description": "What changed, in a sentence or two."},
    },
}

DEFINITION = ToolDefinition(
    name=NAME,
    title="Refine prompt",
    description=(
        "Improves a prompt template's messages while keeping their number, their roles and "
        "every template variable. Returns the refined messages and a short summary."
    ),
    input_schema=INPUT_SCHEMA,
    output_schema=OUTPUT_SCHEMA,
    permission=PERMISSION,
    annotations=ToolAnnotations(
        read_only_hint=True,
        destructive_hint=False,
        idempotent_hint=False,
        open_world_hint=True,
    ),
)


def _invalid_output(message: str, trace_id: str) -> ToolFailure:
    return ToolFailure(
        ToolErrorCode.INVALID_MODEL_OUTPUT,
        f"the model's output was rejected: {message}",
        retryable=True,
        trace_id=trace_id,
    )


def control_character(text: str, source: str = "") -> str | None:
    """The first character of `text` that model output may not hold (see `_CONTROL`), or None.
    One that `source`, what the caller sent, holds too is let through: the model kept it."""
    kept: frozenset[str] | None = None
    for found in _CONTROL.finditer(text):
        if kept is None:
            kept = frozenset(_CONTROL.findall(source))
        if found.group() not in kept:
            return found.group()
    return None


def _holds(character: str) -> str:
    kind = "bidirectional control" if character in _BIDI else "control"
    return f"holds a {kind} character U+{ord(character):04X}"


def _upstream_failure(error: UpstreamError) -> ToolFailure:
    if isinstance(error, UpstreamTimeout):
        code = ToolErrorCode.UPSTREAM_TIMEOUT
    elif isinstance(error, UpstreamUnavailable):
        code = ToolErrorCode.UPSTREAM_UNAVAILABLE
    else:
        code = ToolErrorCode.UPSTREAM_ERROR
    retryable = error.retryable or isinstance(error, UpstreamUnavailable)
    if isinstance(error, UpstreamBadReply):
        retryable = False
    message = error.message
    if isinstance(error, UpstreamStatusError) and error.status in (401, 403):
        message += " (the service's upstream credentials were refused)"
    return ToolFailure(
        code, message, retryable=retryable, retry_after=error.retry_after, upstream=error.attempt
    )


def _decode_data(data: Any) -> Any:
    """`data` is a JSON string (sometimes fenced like a chat answer) or already an object."""
    if not isinstance(data, str):
        return data
    text = data.strip()
    if text.startswith("```"):
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    return orjson.loads(text)


def check_output(data: Any, source: PromptTemplate, trace_id: str = "") -> JsonObject:
    """The refined object, or ToolFailure(INVALID_MODEL_OUTPUT) saying what is wrong."""
    try:
        document = _decode_data(data)
    except (ValueError, RecursionError):
        raise _invalid_output("it is not valid JSON", trace_id) from None
    if not isinstance(document, dict):
        raise _invalid_output("it is not a JSON object", trace_id)
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid_output("messages is missing or empty", trace_id)
    if len(messages) != len(source.messages):
        raise _invalid_output(
            f"it has {len(messages)} messages where the template has {len(source.messages)}",
            trace_id,
        )
    refined = []
    for index, item in enumerate(messages):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("role"), str)
            and isinstance(item.get("content"), str)
        ):
            raise _invalid_output(f"messages[{index}] needs string role and content", trace_id)
        refined.append({"role": item["role"], "content": item["content"]})
    # No template a caller may send holds more; scanning costs time per character.
    if sum(len(m["content"]) for m in refined) > MAX_TEMPLATE_CHARS:
        raise _invalid_output(
            f"its messages hold more than {MAX_TEMPLATE_CHARS} characters", trace_id
        )
    if [m["role"] for m in refined] != source.roles:
        raise _invalid_output("it changed the roles or their order", trace_id)
    summary = document.get("summary")
    if summary is None:
        summary = DEFAULT_SUMMARY
    elif not isinstance(summary, str):
        raise _invalid_output("summary is not a string", trace_id)
    # Named by code point, never quoted: the text is the caller's prompt.
    for index, (message, before) in enumerate(zip(refined, source.messages, strict=True)):
        found = control_character(message["content"], before.content)
        if found is not None:
            raise _invalid_output(f"messages[{index}].content {_holds(found)}", trace_id)
    found = control_character(summary)
    if found is not None:
        raise _invalid_output(f"summary {_holds(found)}", trace_id)
    try:
        kept = template_variables((m["content"] for m in refined), source.template_format)
    except TemplateError as exc:
        raise _invalid_output(f"it {exc}", trace_id) from None
    lost = source.variables - kept
    if lost:
        # A name may be as long as the template: each is cut for the message.
        names = ", ".join(clip(name, 40) for name in sorted(lost)[:10])
        raise _invalid_output(f"it dropped template variables: {names}", trace_id)
    return {"messages": refined, "summary": summary.strip() or DEFAULT_SUMMARY}


class RefinePromptTool:
    """refine_prompt on any upstream that implements the refine port."""

    def __init__(self, refiner: Refiner) -> None:
        self._refiner = refiner

    @property
    def definition(self) -> ToolDefinition:
        return DEFINITION

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        template_json: str = arguments["prompt_template_json"]
        try:
            template = parse_template(template_json)
        except TemplateError as exc:
            field = "arguments.prompt_template_json"
            raise InvalidArgument(
                f"prompt_template_json {exc}", [FieldViolation(field, str(exc))]
            ) from None
        request = RefineRequest(
            template_json,
            guidelines=arguments.get("guidelines") or "",
            context=arguments.get("context") or "",
        )
        try:
            reply = await self._refiner.refine(
                request, time_left=call.time_left(), traceparent=call.traceparent
            )
        except UpstreamError as error:
            raise _upstream_failure(error) from None
        try:
            refined = check_output(reply.output, template, reply.trace_id)
        except ToolFailure as failure:
            raise failure.with_upstream(reply.attempt) from None
        return ToolResult(
            text=refined["summary"],
            structured=refined,
            trace_id=reply.trace_id,
            upstream=reply.attempt,
        )
