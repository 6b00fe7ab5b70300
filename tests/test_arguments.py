"""Argument checks: a tool's input schema, read as JSON Schema draft 2020-12, decides."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from aiservices_server.core.arguments import (
    MAX_ARGUMENT_VALUES,
    MAX_KEY_CHARS,
    ArgumentValidator,
    check_bounds,
)
from aiservices_server.errors import (
    MAX_DESCRIPTION_CHARS,
    MAX_FIELD_CHARS,
    MAX_VIOLATIONS,
    InvalidArgument,
)
from aiservices_server.faces.grpc.convert import dict_from, struct_from
from aiservices_server.faces.mcp.face import _arguments_refusal
from aiservices_server.tools.refine_prompt import DEFINITION, INPUT_SCHEMA


def _violations(validator: ArgumentValidator, arguments: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgument) as caught:
        validator.validate(arguments)
    return [(violation.field, violation.description) for violation in caught.value.violations]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            {"prompt_template_json": ""},
            [("arguments.prompt_template_json", "must be at least 1 characters")],
        ),
        (
            {"prompt_template_json": "x" * 100_001},
            [("arguments.prompt_template_json", "must be at most 100000 characters")],
        ),
        ({"prompt_template_json": "{}", "context": 7}, [("arguments.context", "must be a string")]),
        ({"prompt_template_json": "{}", "extra": "no"}, [("arguments.extra", "unknown argument")]),
        ({"guidelines": "only"}, [("arguments.prompt_template_json", "is required")]),
        (
            {"prompt_template_json": 1, "guidelines": False, "zz": 0},
            [
                ("arguments.zz", "unknown argument"),
                ("arguments.guidelines", "must be a string"),
                ("arguments.prompt_template_json", "must be a string"),
            ],
        ),
    ],
)
def test_refine_prompt_refusals_name_each_field_and_rule(
    arguments: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert _violations(ArgumentValidator(INPUT_SCHEMA), arguments) == expected


def test_valid_refine_prompt_arguments_come_back_unchanged() -> None:
    arguments = {"prompt_template_json": '{"messages": []}', "guidelines": "", "context": "c"}
    assert ArgumentValidator(INPUT_SCHEMA).validate(arguments) == arguments


@pytest.mark.parametrize(
    ("rule", "accepted", "refused", "description"),
    [
        ({"type": "string", "pattern": "^a+$"}, "aaa", "ab", "has an invalid format"),
        ({"$ref": "#/$defs/name"}, "a name", 5, "must be a string"),
        (
            {"type": "array", "prefixItems": [{"type": "string"}]},
            ["a", 1],
            [1, "a"],
            "must be a string",
        ),
        ({"not": {"type": "string"}}, 5, "five", "breaks the schema rule not"),
        (
            {"type": "integer", "exclusiveMinimum": 0},
            1,
            0,
            "breaks the schema rule exclusiveMinimum",
        ),
    ],
)
def test_draft_2020_12_keywords_are_enforced(
    rule: dict[str, Any], accepted: Any, refused: Any, description: str
) -> None:
    schema = {"type": "object", "properties": {"v": rule}, "$defs": {"name": {"type": "string"}}}
    validator = ArgumentValidator(schema)
    assert validator.validate({"v": accepted}) == {"v": accepted}
    [(field, said)] = _violations(validator, {"v": refused})
    assert said == description
    assert field.startswith("arguments.v")


def test_formats_are_annotations_as_draft_2020_12_says() -> None:
    validator = ArgumentValidator({"type": "object", "properties": {"v": {"format": "email"}}})
    assert validator.validate({"v": "not an address"}) == {"v": "not an address"}


def test_every_built_in_schema_is_a_valid_draft_2020_12_schema() -> None:
    """Input schemas are checked when a tool is registered; output schemas only here."""
    for schema in (DEFINITION.input_schema, DEFINITION.output_schema):
        Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize(
    "rule", [{"type": "text"}, {"pattern": 5}, {"maxLength": -1}, {"required": "v"}]
)
def test_a_malformed_schema_is_refused_when_the_tool_is_registered(rule: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        ArgumentValidator({"type": "object", "properties": {"v": rule}})


# --- any arguments a caller can send: a bounded answer, in bounded time ----------------------

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id"],
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "maxItems": 50, "items": {"type": "string", "maxLength": 8}},
        "rows": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"n": {"type": "integer"}, "on": {"type": "boolean"}},
            },
        },
        "mode": {"enum": ["a", "b"]},
    },
}

JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=12), children, max_size=8)
    ),
    max_leaves=60,
)


VALIDATORS = {id(schema): ArgumentValidator(schema) for schema in (INPUT_SCHEMA, NESTED_SCHEMA)}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"rows": [value]}
    return value


@settings(deadline=timedelta(milliseconds=300), max_examples=300)
@given(st.sampled_from([INPUT_SCHEMA, NESTED_SCHEMA]), st.dictionaries(st.text(), JSON))
@example(INPUT_SCHEMA, {f"k{i:03d}": 0 for i in range(300)})
@example(INPUT_SCHEMA, {f"{i:04d}".ljust(MAX_KEY_CHARS, "x"): 0 for i in range(1_999)})
@example(INPUT_SCHEMA, {"x" * (MAX_KEY_CHARS + 1): 0})
@example(INPUT_SCHEMA, {"prompt_template_json": ["x"] * (MAX_ARGUMENT_VALUES + 1)})
@example(NESTED_SCHEMA, {"id": 1, "tags": [1.5] * (MAX_ARGUMENT_VALUES - 10)})
@example(NESTED_SCHEMA, {"id": 1, "rows": [{"n": 1}] * 900 + [{"n": "x"}]})
@example(NESTED_SCHEMA, {"id": 1, "rows": [{"zz": 1, "n": 1.5}] * 600})
@example(NESTED_SCHEMA, {"id": -1, "mode": "c", **_nested(30)})
@example(NESTED_SCHEMA, {"id": 1, "rows": [{f"u{i}": 0 for i in range(1_000)}]})
def test_any_arguments_are_accepted_or_refused_with_a_bounded_list_of_violations(
    schema: dict[str, Any], arguments: dict[str, Any]
) -> None:
    """The server's whole argument path: Struct to Python, then the schema check."""
    try:
        checked = VALIDATORS[id(schema)].validate(dict_from(struct_from(arguments)))
    except InvalidArgument as refused:
        assert 0 < len(refused.violations) <= MAX_VIOLATIONS
        assert all(len(v.field) <= MAX_FIELD_CHARS for v in refused.violations)
        assert all(len(v.description) <= MAX_DESCRIPTION_CHARS for v in refused.violations)
        assert refused.not_shown == 0 or len(refused.violations) == MAX_VIOLATIONS
    else:
        assert Draft202012Validator(schema).is_valid(checked)


@settings(deadline=timedelta(milliseconds=300), max_examples=300)
@given(st.binary(max_size=64) | st.builds(json.dumps, JSON).map(str.encode), JSON)
@example(b'{"method": "tools/call", "params": {"arguments": {"a": 1}}}', None)
@example(b"", {"k": [0] * (MAX_ARGUMENT_VALUES + 1)})
def test_the_mcp_look_ahead_refuses_exactly_what_the_core_refuses(
    noise: bytes, arguments: Any
) -> None:
    """A large MCP body is looked at before the SDK parses it: any body, the refusal is the
    core's own, and what the SDK then gets is the same call without its arguments."""
    assert _arguments_refusal(noise) is None  # too small to hold more values than allowed
    found = _arguments_refusal(json.dumps(rpc_call(arguments)).encode())
    try:
        check_bounds(arguments) if isinstance(arguments, dict) else None
    except InvalidArgument as core:
        assert found is not None
        without, refusal = found
        assert refusal.violations == core.violations
        message = rpc_call({})
        assert json.loads(without) == message
    else:
        assert found is None


def rpc_call(arguments: Any) -> dict[str, Any]:
    params = {"name": "t", "arguments": arguments}
    return {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": params}
