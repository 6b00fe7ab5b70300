"""Argument checks: the fast path never accepts what jsonschema, the authority, refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import fastjsonschema
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from server.errors import InvalidArgument
from server.service.arguments import ArgumentValidator, restore_integers
from server.tools.refine_prompt import DEFINITION, INPUT_SCHEMA

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
