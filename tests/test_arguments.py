"""Argument checks: the fast path never accepts what jsonschema, the authority, refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from typing import Any

import fastjsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from server.errors import MAX_DESCRIPTION_CHARS, MAX_FIELD_CHARS, MAX_VIOLATIONS, InvalidArgument
from server.service.arguments import ArgumentValidator, restore_integers
from server.tools.refine_prompt import DEFINITION, INPUT_SCHEMA
from server.transport.convert import MAX_ARGUMENT_VALUES, MAX_KEY_CHARS, dict_from, struct_from

# (schema of one argument, value): the edges where two validators could read a rule differently.
CASES: list[tuple[dict[str, Any], Any]] = [
    ({"enum": [1, "a"]}, True),
    ({"enum": [1.0]}, 1),
    ({"const": 0}, False),
    ({"const": [1]}, [True]),
    ({"enum": [{"a": 1}]}, {"a": True}),
    ({"type": "integer"}, True),
    ({"type": "integer"}, 2.5),
    ({"type": "integer"}, 3.0),
    ({"type": "integer"}, 2**70),
    ({"type": "number"}, False),
    ({"type": "number"}, 0.5),
    ({"type": "string", "minLength": 2}, "\U0001f600"),
    ({"type": "string", "maxLength": 1}, "\U0001f600"),
    ({"minLength": 2}, 5),
    ({"exclusiveMinimum": 0}, 0),
    ({"minimum": 0}, -0.0),
    ({"maximum": 10, "exclusiveMaximum": 10}, 10),
    ({"type": "array", "maxItems": 1}, [1, 2]),
    ({"type": "array", "minItems": 1}, []),
    ({"type": "array", "items": {"type": "string"}}, ["a", 1]),
    ({"type": "array", "items": {"type": "string"}}, "abc"),
    ({"type": "object", "required": ["a"], "properties": {"a": {"type": "null"}}}, {"a": None}),
    ({"type": "object", "additionalProperties": {"type": "boolean"}}, {"x": True, "y": 1}),
    ({"type": ["string", "null"]}, None),
    ({"type": "boolean"}, 0),
]


def _jsonschema_accepts(schema: dict[str, Any], arguments: dict[str, Any]) -> bool:
    return Draft202012Validator(schema).is_valid(restore_integers(arguments, schema))


@pytest.mark.parametrize(("rule", "value"), CASES)
def test_the_fast_path_decides_exactly_as_jsonschema(rule: dict[str, Any], value: Any) -> None:
    schema = {"type": "object", "properties": {"v": rule}, "additionalProperties": False}
    validator = ArgumentValidator(schema)
    assert validator.has_fast_path
    arguments = {"v": value}
    if _jsonschema_accepts(schema, arguments):
        assert validator.validate(arguments) == restore_integers(arguments, schema)
    else:
        with pytest.raises(InvalidArgument) as caught:
            validator.validate(arguments)
        assert [violation.field for violation in caught.value.violations] != []


@pytest.mark.parametrize(
    "arguments",
    [
        {"prompt_template_json": '{"messages": []}'},
        {"prompt_template_json": "", "guidelines": "x"},
        {"prompt_template_json": "x" * 100_001},
        {"prompt_template_json": "{}", "context": 7},
        {"prompt_template_json": "{}", "extra": "no"},
        {"guidelines": "only"},
        {},
    ],
)
def test_refine_prompt_arguments_get_the_same_answer_on_the_fast_path(
    arguments: dict[str, Any],
) -> None:
    validator = ArgumentValidator(INPUT_SCHEMA)
    assert validator.has_fast_path
    if _jsonschema_accepts(INPUT_SCHEMA, arguments):
        assert validator.validate(arguments) == arguments
    else:
        with pytest.raises(InvalidArgument):
            validator.validate(arguments)


@pytest.mark.parametrize(
    "rule",
    [
        {"type": "string", "format": "email"},
        {"type": "string", "pattern": "^a+$"},
        {"$ref": "#/$defs/name"},
        {"type": "array", "prefixItems": [{"type": "string"}]},
        {"not": {"type": "string"}},
    ],
)
def test_schemas_beyond_the_shared_keywords_use_jsonschema_alone(rule: dict[str, Any]) -> None:
    schema = {"type": "object", "properties": {"v": rule}, "$defs": {"name": {"type": "string"}}}
    validator = ArgumentValidator(schema)
    assert not validator.has_fast_path
    # jsonschema's reading holds: formats are annotations, so any string passes.
    if "format" in rule:
        assert validator.validate({"v": "not an address"}) == {"v": "not an address"}


def test_every_built_in_schema_is_a_valid_draft_2020_12_schema() -> None:
    """At start-up only fastjsonschema's compiler reads fast-path schemas; jsonschema checks
    them here."""
    for schema in (DEFINITION.input_schema, DEFINITION.output_schema):
        Draft202012Validator.check_schema(schema)


def test_a_malformed_schema_is_refused_when_the_tool_is_registered() -> None:
    with pytest.raises(fastjsonschema.JsonSchemaDefinitionException):
        ArgumentValidator({"type": "object", "properties": {"v": {"type": "text"}}})
    with pytest.raises(SchemaError):
        ArgumentValidator({"type": "object", "properties": {"v": {"pattern": 5}}})


def test_jsonschema_is_loaded_at_the_first_refusal_only() -> None:
    """Its 2.5 MB stay out of a server whose callers send valid arguments."""
    script = textwrap.dedent(
        """
        import json, sys
        from server.errors import InvalidArgument
        from server.service.arguments import ArgumentValidator
        from server.tools.refine_prompt import DEFINITION, INPUT_SCHEMA

        validator = ArgumentValidator(INPUT_SCHEMA)
        validator.validate({"prompt_template_json": "{}"})
        loaded_before = "jsonschema" in sys.modules
        try:
            validator.validate({"prompt_template_json": 7})
        except InvalidArgument as error:
            print(json.dumps([loaded_before, "jsonschema" in sys.modules,
                              [v.description for v in error.violations]]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == [False, True, ["must be a string"]]


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
