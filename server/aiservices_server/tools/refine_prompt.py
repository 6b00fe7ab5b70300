"""tools.agenta.api.refine_prompt: improve a prompt template with a prompt deployed on Agenta.

The upstream does the thinking; this module checks what goes in and, above all, what comes
back: a model may drop a variable or merge messages, and a caller must never get that as a
"refined" template.
"""

from __future__ import annotations

import re
from typing import Any

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
from aiservices_server.tools.outcomes import decode_model_json, upstream_failure
from aiservices_server.tools.templates import (
    PromptTemplate,
    TemplateError,
    parse_template,
    template_variables,
)
from aiservices_server.upstream.refiner import (
    Refiner,
    RefineRequest,
    TestCase,
    UpstreamError,
)

NAME = "tools.agenta.api.refine_prompt"
PERMISSION = "edit_workflows"
DEFAULT_SUMMARY = "Prompt refined successfully."
MAX_TEMPLATE_CHARS = 100_000
MAX_TEXT_CHARS = 10_000
# Test cases: how many, how many inputs each, and how long an input's name may be (a template
# variable's name; the core refuses any argument name over 256 characters before this). Every
# string in a case is at most MAX_TEXT_CHARS. The most values arguments within these bounds hold
# is 4 + 20 * (1 + 4 + 50) = 1,104, within the core's MAX_ARGUMENT_VALUES (2,000).
MAX_TEST_CASES = 20
MAX_TEST_CASE_INPUTS = 50
MAX_INPUT_NAME_CHARS = 100
# What all the strings of the test cases, names included, may hold in all: what a model's context
# holds beside a template, and what keeps encoding them for the upstream (up to 7 bytes a
# character, JSON inside JSON) within a few milliseconds, whatever MAX_MESSAGE_BYTES allows.
MAX_TEST_CASES_CHARS = 200_000
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
        "test_cases": {
            "type": "array",
            "maxItems": MAX_TEST_CASES,
            "description": (
                "Cases the refined template should get right: the values of the template's "
                "variables and the output expected from them. The template is refined to make "
                "the expected outputs more likely. All their strings, names included, hold at "
                f"most {MAX_TEST_CASES_CHARS} characters in all."
            ),
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["inputs", "expected_output"],
                "properties": {
                    "inputs": {
                        "type": "object",
                        "maxProperties": MAX_TEST_CASE_INPUTS,
                        "propertyNames": {"minLength": 1, "maxLength": MAX_INPUT_NAME_CHARS},
                        "additionalProperties": {"type": "string", "maxLength": MAX_TEXT_CHARS},
                        "description": "The template's variables and their values in this case.",
                    },
                    "expected_output": {
                        "type": "string",
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "What the model should answer to these inputs.",
                    },
                    "actual_output": {
                        "type": "string",
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "What it answers with the template as it is, if known.",
                    },
                    "note": {
                        "type": "string",
                        "maxLength": MAX_TEXT_CHARS,
                        "description": "Why the case matters, or what is wrong with the output.",
                    },
                },
            },
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
        "every template variable, following optional guidelines and context, and making the "
        "expected outputs of optional test cases more likely. Returns the refined messages and "
        "a short summary."
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


def check_output(data: Any, source: PromptTemplate, trace_id: str = "") -> JsonObject:
    """The refined object, or ToolFailure(INVALID_MODEL_OUTPUT) saying what is wrong."""
    try:
        document = decode_model_json(data)
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


def _test_cases(items: list[JsonObject]) -> tuple[TestCase, ...]:
    """The test cases, or InvalidArgument when they hold more than MAX_TEST_CASES_CHARS."""
    cases = tuple(map(_test_case, items))
    size = sum(
        sum(len(name) + len(value) for name, value in case.inputs)
        + len(case.expected_output)
        + len(case.actual_output or "")
        + len(case.note or "")
        for case in cases
    )
    if size > MAX_TEST_CASES_CHARS:
        rule = f"must hold at most {MAX_TEST_CASES_CHARS} characters in all"
        raise InvalidArgument(f"test_cases {rule}", [FieldViolation("arguments.test_cases", rule)])
    return cases


def _test_case(item: JsonObject) -> TestCase:
    """A test case from arguments the core has checked against INPUT_SCHEMA; its inputs sorted
    by name, so the upstream gets the same request whichever face the call came through (a
    gRPC Struct keeps no order)."""
    return TestCase(
        tuple(sorted(item["inputs"].items())),
        item["expected_output"],
        actual_output=item.get("actual_output"),
        note=item.get("note"),
    )


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
            test_cases=_test_cases(arguments.get("test_cases", [])),
        )
        try:
            reply = await self._refiner.refine(
                request, time_left=call.time_left(), traceparent=call.traceparent
            )
        except UpstreamError as error:
            raise upstream_failure(error) from None
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
