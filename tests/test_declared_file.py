"""The tools file: what loads, what is refused (with one line naming the file, the tool and the
field), hostile files (huge, deep, bad schemas, placeholder tricks, duplicate and reserved
names), and the placeholder rule `render` applies, against a reference and under hypothesis."""

from __future__ import annotations

import json
import re
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices_server.tomltext import has_deep_dotted_key
from aiservices_server.tools.base import ToolAnnotations
from aiservices_server.tools.declared import (
    MAX_PLACEHOLDERS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_VALUES,
    MAX_TOOLS,
    MAX_TOOLS_FILE_BYTES,
    DeclaredToolSpec,
    PromptMessage,
    ToolsFileError,
    argument_text,
    is_valid_tool_name,
    load_tools_file,
    load_tools_text,
    render,
)
from aiservices_server.tools.refine_prompt import NAME as REFINE_PROMPT
from tests.support.keys import TestKeys
from tests.support.processes import REPO_ROOT, run_to_exit

RESERVED = frozenset({REFINE_PROMPT})
NAME = "tools.acme.support.classify"
PROMPT_TEXT = "SECRET-PROMPT-TEXT"
"""Stands for prompt text in a refused file: it must never reach an error line."""

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"ticket": {"type": "string", "maxLength": 10000}, "labels": {"type": "array"}},
    "required": ["ticket"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string"}, "confidence": {"type": "number"}},
    "required": ["label"],
}
MESSAGES = [
    {"role": "system", "content": "Classify the ticket into one of {{labels}}."},
    {"role": "user", "content": "{{ ticket }}"},
]


def toml_value(value: Any) -> str:
    """`value` as a TOML value: strings as JSON writes them (a TOML basic string), tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def tool(**fields: Any) -> dict[str, Any]:
    """A valid tool's fields, with `fields` replacing (or, as None, removing) some."""
    base: dict[str, Any] = {
        "name": NAME,
        "title": "Classify a support ticket",
        "description": "Picks the label that fits a support ticket best.",
        "input_schema": json.dumps(INPUT_SCHEMA),
        "output_schema": json.dumps(OUTPUT_SCHEMA),
        "messages": MESSAGES,
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not None}


def tools_text(*tools: dict[str, Any]) -> str:
    return "".join(
        "[[tools]]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in t.items())
        for t in tools
    )


def write(tmp_path: Path, text: str, name: str = "tools.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def load(tmp_path: Path, *tools: dict[str, Any]) -> tuple[DeclaredToolSpec, ...]:
    return load_tools_file(write(tmp_path, tools_text(*tools)), reserved_names=RESERVED)


def refusal(tmp_path: Path, text: str) -> ToolsFileError:
    path = write(tmp_path, text)
    with pytest.raises(ToolsFileError) as caught:
        load_tools_file(path, reserved_names=RESERVED)
    error = caught.value
    line = str(error)
    assert "\n" not in line and line.startswith(f"tools file {path}: "), line
    assert PROMPT_TEXT not in line
    return error


def refused(tmp_path: Path, *tools: dict[str, Any]) -> ToolsFileError:
    return refusal(tmp_path, tools_text(*tools))


# --- what loads ----------------------------------------------------------------------------


def test_a_tool_loads_with_every_field_as_written(tmp_path: Path) -> None:
    (spec,) = load(
        tmp_path,
        tool(
            permission="support",
            text="label",
            annotations={"read_only_hint": True, "open_world_hint": False},
            agenta_app="classify-ticket",
            model="gpt-4o-mini",
            temperature=0,
            max_tokens=200,
        ),
    )
    definition = spec.definition
    assert definition.name == NAME
    assert definition.title == "Classify a support ticket"
    assert definition.permission == "support"
    assert definition.input_schema == INPUT_SCHEMA
    assert definition.output_schema == OUTPUT_SCHEMA
    assert definition.annotations == ToolAnnotations(read_only_hint=True, open_world_hint=False)
    assert spec.text_field == "label"
    assert spec.messages == (
        PromptMessage("system", "Classify the ticket into one of {{labels}}."),
        PromptMessage("user", "{{ ticket }}"),
    )
    assert spec.agenta_app == "classify-ticket"
    assert (spec.model, spec.temperature, spec.max_tokens) == ("gpt-4o-mini", 0.0, 200)
    assert isinstance(spec.temperature, float)


def test_defaults_permission_is_the_name_and_text_is_the_whole_output(tmp_path: Path) -> None:
    (spec,) = load(tmp_path, tool())
    assert spec.definition.permission == NAME
    assert spec.text_field is None
    assert spec.agenta_app is None
    assert (spec.model, spec.temperature, spec.max_tokens) == (None, None, None)
    assert spec.definition.annotations == ToolAnnotations()


def test_a_tool_for_the_agenta_runner_alone_needs_no_messages(tmp_path: Path) -> None:
    (spec,) = load(tmp_path, tool(messages=None, agenta_app="summarize.v2"))
    assert spec.messages is None
    assert spec.agenta_app == "summarize.v2"


def test_schemas_may_be_written_as_toml_tables(tmp_path: Path) -> None:
    text = """
[[tools]]
name = "tools.acme.text.extract"
title = "Extract fields"
description = "Extracts named fields from a text."
messages = [{role = "user", content = "Extract {{fields}} from: {{text}}"}]

[tools.input_schema]
type = "object"
required = ["text", "fields"]
additionalProperties = false
[tools.input_schema.properties.text]
type = "string"
[tools.input_schema.properties.fields]
type = "array"
items = {type = "string"}

[tools.output_schema]
type = "object"
properties = {fields = {type = "object", additionalProperties = {type = "string"}}}
"""
    (spec,) = load_tools_file(write(tmp_path, text), reserved_names=RESERVED)
    assert spec.definition.input_schema == {
        "type": "object",
        "required": ["text", "fields"],
        "additionalProperties": False,
        "properties": {
            "text": {"type": "string"},
            "fields": {"type": "array", "items": {"type": "string"}},
        },
    }
    assert spec.definition.output_schema["properties"]["fields"]["type"] == "object"


def test_tools_keep_file_order_and_an_empty_file_declares_none(tmp_path: Path) -> None:
    names = [f"tools.acme.t{i}" for i in range(3)]
    specs = load(tmp_path, *(tool(name=name) for name in names))
    assert [spec.definition.name for spec in specs] == names
    assert load_tools_file(write(tmp_path, ""), reserved_names=RESERVED) == ()
    assert load_tools_file(write(tmp_path, "tools = []\n"), reserved_names=RESERVED) == ()


def test_a_property_named_like_a_keyword_is_a_property(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"type": {"type": "string"}, "pattern": {"type": "string"}},
    }
    (spec,) = load(
        tmp_path,
        tool(
            input_schema=json.dumps(schema),
            messages=[{"role": "user", "content": "{{type}} {{pattern}}"}],
        ),
    )
    assert set(spec.definition.input_schema["properties"]) == {"type", "pattern"}


def test_500_tools_load(tmp_path: Path) -> None:
    specs = load(tmp_path, *(tool(name=f"tools.acme.t{i}") for i in range(MAX_TOOLS)))
    assert len(specs) == MAX_TOOLS


# --- the error line ------------------------------------------------------------------------


def test_the_error_line_names_the_file_the_tool_and_the_field(tmp_path: Path) -> None:
    error = refused(tmp_path, tool(name="tools.acme.one"), tool(title=None))
    assert str(error) == (
        f"tools file {tmp_path / 'tools.toml'}: tool {NAME}: title: required field is missing"
    )
    assert (error.tool, error.field) == (NAME, "title")


def test_a_tool_without_a_valid_name_is_named_by_its_place(tmp_path: Path) -> None:
    error = refused(tmp_path, tool(name="tools.acme.one"), tool(name="Bad Name"))
    assert str(error).startswith(f"tools file {tmp_path / 'tools.toml'}: tool #2: name: must be ")
    assert refused(tmp_path, tool(name=None)).tool == "#1"


@pytest.mark.parametrize(
    ("fields", "field", "problem"),
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"title": 7}, "title", "must be a string"),
        ({"title": "   "}, "title", "must not be blank"),
        ({"title": "x" * 201}, "title", "at most 200 characters"),
        ({"title": "a\x1b[31mb"}, "title", "no control characters"),
        ({"description": None}, "description", "required field is missing"),
        ({"description": "x" * 10_001}, "description", "at most 10000 characters"),
        ({"permission": "has space"}, "permission", "without spaces"),
        ({"permission": "*"}, "permission", "no tool's permission"),
        ({"permission": "act_for_users"}, "permission", "no tool's permission"),
        ({"input_schema": None}, "input_schema", "required field is missing"),
        ({"output_schema": 3}, "output_schema", "must be a table, or a string"),
        ({"input_schema": "[1, 2]"}, "input_schema", "must be a table, or a string"),
        ({"input_schema": "{not json"}, "input_schema", "not a valid JSON object"),
        ({"annotations": {"readOnlyHint": True}}, "annotations.readOnlyHint", "unknown field"),
        ({"annotations": {"read_only_hint": "yes"}}, "annotations.read_only_hint", "true or false"),
        ({"annotations": [True]}, "annotations", "must be a table"),
        ({"text": "missing"}, "text", 'type "string"'),
        ({"text": "confidence"}, "text", 'type "string"'),
        ({"text": 1}, "text", "must be a string"),
        ({"messages": None}, "messages", "a tool needs messages"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": "hello"}, "messages", "non-empty array"),
        ({"messages": [{"role": "user", "content": "hi"}] * 51}, "messages", "at most 50"),
        ({"messages": ["hello"]}, "messages[0]", "{role, content} table"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role", "must be system"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string"),
        ({"messages": [{"role": "user", "content": " "}]}, "messages[0].content", "blank"),
        (
            {"messages": [{"role": "user", "content": "x" * 100_001}]},
            "messages[0].content",
            "at most 100000 characters",
        ),
        (
            {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
            "messages[0].name",
            "unknown field",
        ),
        ({"model": ""}, "model", "1 to 200 printable characters"),
        ({"model": " gpt"}, "model", "without surrounding spaces"),
        ({"model": 4}, "model", "printable characters"),
        ({"temperature": 2.5}, "temperature", "from 0 to 2"),
        ({"temperature": -0.1}, "temperature", "from 0 to 2"),
        ({"temperature": "hot"}, "temperature", "from 0 to 2"),
        ({"temperature": True}, "temperature", "from 0 to 2"),
        ({"max_tokens": 0}, "max_tokens", "from 1 to 1,000,000"),
        ({"max_tokens": 1_000_001}, "max_tokens", "from 1 to 1,000,000"),
        ({"max_tokens": 10.0}, "max_tokens", "an integer"),
        ({"agenta_app": ""}, "agenta_app", "from A-Z a-z 0-9 . _ -"),
        ({"agenta_app": "-lead"}, "agenta_app", "starting with a letter"),
        ({"agenta_app": "has space"}, "agenta_app", "from A-Z a-z 0-9 . _ -"),
        ({"agenta_app": "a" * 129}, "agenta_app", "1 to 128 characters"),
        ({"messages": None, "agenta_app": "app", "model": "m"}, "model", "only to a tool with"),
        (
            {"messages": None, "agenta_app": "app", "max_tokens": 5},
            "max_tokens",
            "only to a tool with",
        ),
    ],
)
def test_each_rule_is_one_line_naming_the_field(
    tmp_path: Path, fields: dict[str, Any], field: str, problem: str
) -> None:
    error = refused(tmp_path, tool(**fields))
    assert (error.tool, error.field) == (NAME, field), str(error)
    assert problem in error.problem, str(error)


def test_text_must_name_a_required_property(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"summary": {"type": "string"}}}
    error = refused(tmp_path, tool(output_schema=json.dumps(schema), text="summary"))
    assert (error.field, error.problem) == (
        "text",
        "must name a property output_schema lists in required",
    )


@pytest.mark.parametrize(
    "name",
    [
        "refine_prompt",
        "tools.",
        ".tools.x",
        "tools..x",
        "Tools.acme.x",
        "tools.acme.x y",
        "tools.acme._x",
        "tools.acme.é",
        "t." + "x" * 127,
        "",
    ],
)
def test_tool_names_follow_the_built_in_naming_rule(tmp_path: Path, name: str) -> None:
    assert not is_valid_tool_name(name)
    error = refused(tmp_path, tool(name=name))
    assert (error.tool, error.field) == ("#1", "name")
    assert "two or more dot-separated parts" in error.problem


def test_the_built_in_names_follow_the_rule() -> None:
    assert is_valid_tool_name(REFINE_PROMPT)
    assert is_valid_tool_name("tools.acme.text.summarize")
    assert is_valid_tool_name("t." + "x" * 126)


def test_a_name_of_a_built_in_tool_is_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, tool(name=REFINE_PROMPT))
    assert (error.tool, error.field) == (REFINE_PROMPT, "name")
    assert error.problem == "is the name of a built-in tool: choose another"


def test_a_name_declared_twice_is_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, tool(), tool(name="tools.acme.other"), tool())
    assert (error.tool, error.field) == (NAME, "name")
    assert error.problem == "already declared by tool #1"


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ('title = "x"\n', "title", "unknown field (a tools file holds only [[tools]])"),
        ("[tools]\nname = 'x'\n", "tools", "must be [[tools]] tables"),
        ("tools = [1]\n", None, "must be a table ([[tools]])"),
        ("tools = []\nx = \n", None, "not valid TOML (line 2, column 5: Invalid value)"),
        ("tools = [", None, "not valid TOML (end of document: "),
    ],
)
def test_the_file_holds_only_tools_tables(
    tmp_path: Path, text: str, field: str | None, problem: str
) -> None:
    error = refusal(tmp_path, text)
    assert error.field == field
    assert error.problem.startswith(problem), str(error)


def test_more_than_500_tools_are_refused(tmp_path: Path) -> None:
    error = refusal(tmp_path, "[[tools]]\n" * (MAX_TOOLS + 1))
    assert (error.field, error.problem) == ("tools", "more than 500 tools")


# --- hostile files -------------------------------------------------------------------------


def test_a_file_over_the_byte_bound_is_refused(tmp_path: Path) -> None:
    padding = "# " + "x" * 100 + "\n"
    text = tools_text(tool()) + padding * (MAX_TOOLS_FILE_BYTES // len(padding) + 1)
    assert refusal(tmp_path, text).problem == "too large (over 1 MiB)"


def test_a_device_or_directory_is_not_read(tmp_path: Path) -> None:
    for path in (Path("/dev/zero"), tmp_path):
        with pytest.raises(ToolsFileError) as caught:
            load_tools_file(path, reserved_names=RESERVED)
        assert caught.value.problem.startswith("cannot read it")


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ToolsFileError) as caught:
        load_tools_file(tmp_path / "absent.toml", reserved_names=RESERVED)
    assert str(caught.value) == (
        f"tools file {tmp_path / 'absent.toml'}: cannot read it (No such file or directory)"
    )


def test_a_file_others_may_write_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, tools_text(tool()))
    path.chmod(0o666)
    with pytest.raises(ToolsFileError) as caught:
        load_tools_file(path, reserved_names=RESERVED)
    assert "writable by group or others (mode 0666)" in caught.value.problem


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tools.toml"
    path.write_bytes(b'[[tools]]\nname = "\xff"\n')
    with pytest.raises(ToolsFileError) as caught:
        load_tools_file(path, reserved_names=RESERVED)
    assert caught.value.problem == "not valid TOML (not UTF-8 text)"


def test_deeply_nested_toml_is_refused_not_a_crash(tmp_path: Path) -> None:
    depth = 200_000
    error = refusal(tmp_path, "x = " + "[" * depth + "]" * depth + "\n")
    assert error.problem == "not valid TOML (nested too deeply)"


@pytest.mark.parametrize(
    "text",
    [
        "[[tools]]\ninput_schema." + ".".join(["a"] * 100_000) + " = 1\n",
        "[" + ".".join(["a"] * 300_000) + "]\n",
        "x = {" + " . ".join(['"a"'] * 65) + " = 1}\n",
    ],
)
def test_a_dotted_key_of_too_many_parts_is_refused_before_toml_reads_it(
    tmp_path: Path, text: str
) -> None:
    """tomllib would keep every prefix of such a key: 100,000 parts cost it gigabytes, and the
    process was killed before any error."""
    error = refusal(tmp_path, text)
    assert error.problem == "a dotted key of more than 64 parts (no tools file needs one)"


LITERAL = "'"
MULTILINE_LITERAL = "'''"
MULTILINE_BASIC = '"""'


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list(".\\\"'#ab \n")), max_size=40), max_size=6))
def test_dots_in_strings_and_comments_are_no_key_parts(values: list[str]) -> None:
    """Strings (basic, literal, multi-line) and comments full of dots, quotes and backslashes
    are read as TOML reads them: never taken for a long dotted key."""
    lines = ["# " + "." * 100]
    for index, value in enumerate(values):
        lines.append(f"b{index} = {json.dumps(value)}  # {'.' * 70}")
        if LITERAL not in value and "\n" not in value:
            lines.append(f"l{index} = {LITERAL}{value}{LITERAL}")
        if MULTILINE_LITERAL not in value and not value.endswith(LITERAL):
            lines.append(f"m{index} = {MULTILINE_LITERAL}{value}{MULTILINE_LITERAL}")
        escaped = json.dumps(value)[1:-1]
        lines.append(f"d{index} = {MULTILINE_BASIC}{escaped}{MULTILINE_BASIC}")
    lines.append("f = [1.5, 2.5, 1979-05-27T07:32:00.999Z]")
    lines.append("a.b.c = 1")
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text)  # valid TOML
    assert not has_deep_dotted_key(text, max_parts=3)
    assert has_deep_dotted_key(text + "x.y.z.w = 1\n", max_parts=3)


def test_a_deeply_nested_json_schema_is_refused(tmp_path: Path) -> None:
    depth = 100_000
    error = refused(tmp_path, tool(output_schema="[" * depth + "]" * depth))
    assert (error.field, error.problem) == (
        "output_schema",
        "not a valid JSON object (nested too deeply)",
    )


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_deeper_than_the_bound_is_refused_and_one_within_loads(tmp_path: Path) -> None:
    # Each level is two containers deep (the schema and its `properties`).
    inside = nested(MAX_SCHEMA_DEPTH // 2 - 1)
    assert load(tmp_path, tool(output_schema=json.dumps(inside)))
    error = refused(tmp_path, tool(output_schema=json.dumps(nested(MAX_SCHEMA_DEPTH))))
    assert error.field is not None and error.field.startswith("output_schema.properties.a")
    assert error.problem == f"nested deeper than {MAX_SCHEMA_DEPTH}"


def test_a_schema_with_too_many_values_is_refused(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {}, "enum": list(range(MAX_SCHEMA_VALUES))}
    error = refused(tmp_path, tool(output_schema=json.dumps(schema)))
    assert (error.field, error.problem) == (
        "output_schema",
        f"holds more than {MAX_SCHEMA_VALUES} values",
    )


@pytest.mark.parametrize(
    ("schema", "field", "problem"),
    [
        ({"type": "object", "propertys": {}}, "input_schema.propertys", "not a JSON Schema"),
        ({"type": "object", "definitions": {}}, "input_schema.definitions", "not a JSON Schema"),
        (
            {"type": "object", "properties": {"ticket": {"type": "string", "maxLen": 3}}},
            "input_schema.properties.ticket.maxLen",
            "not a JSON Schema draft 2020-12 keyword",
        ),
        (
            {"type": "object", "properties": {"l": {"type": "array", "itms": {}}}},
            "input_schema.properties.l.itms",
            "not a JSON Schema",
        ),
        (
            {"type": "object", "anyOf": [{"required": ["a"]}, {"requird": ["b"]}]},
            "input_schema.anyOf[1].requird",
            "not a JSON Schema",
        ),
        ({"type": "object", "$ref": "#/$defs/a"}, "input_schema.$ref", "references are not"),
        (
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}},
            "input_schema.properties.a.$ref",
            "references are not",
        ),
        ({"type": "object", "$id": "urn:x"}, "input_schema.$id", "identifiers are not"),
        (
            {"type": "object", "properties": {"l": {"type": "array", "uniqueItems": True}}},
            "input_schema.properties.l.uniqueItems",
            "uniqueItems is not accepted: checking it takes time growing with the square",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}},
            "input_schema.properties.a.pattern",
            "regular expressions are not accepted",
        ),
        ({"type": "object", "patternProperties": {}}, "input_schema.patternProperties", "regular"),
        (
            {"type": "object", "$schema": "http://json-schema.org/draft-07/schema#"},
            "input_schema.$schema",
            "only https://json-schema.org/draft/2020-12/schema",
        ),
        ({"type": "strin"}, "input_schema.type", "not a valid schema"),
        ({"type": "object", "required": "ticket"}, "input_schema.required", "not a valid schema"),
        ({"type": "object", "minProperties": -1}, "input_schema.minProperties", "not a valid"),
        ({"type": "array"}, "input_schema.type", 'must be "object"'),
        ({"properties": {}}, "input_schema.type", 'must be "object"'),
    ],
)
def test_schema_keywords_outside_draft_2020_12_or_unsafe_ones_are_refused(
    tmp_path: Path, schema: dict[str, Any], field: str, problem: str
) -> None:
    error = refused(
        tmp_path,
        tool(input_schema=json.dumps(schema), messages=[{"role": "user", "content": "hi"}]),
    )
    assert error.field == field, str(error)
    assert problem in error.problem, str(error)


def test_a_long_property_name_is_cut_in_the_error_line(tmp_path: Path) -> None:
    name = "p" * 100_000
    schema = {"type": "object", "properties": {name: {"type": "string", "maxLen": 3}}}
    error = refused(tmp_path, tool(output_schema=json.dumps(schema)))
    assert error.field == "output_schema.properties." + "p" * 64 + "....maxLen"
    assert len(str(error)) < 400


def test_the_draft_2020_12_dialect_may_be_named(tmp_path: Path) -> None:
    schema = {**OUTPUT_SCHEMA, "$schema": "https://json-schema.org/draft/2020-12/schema"}
    assert load(tmp_path, tool(output_schema=json.dumps(schema)))


def test_the_output_schema_must_describe_an_object(tmp_path: Path) -> None:
    error = refused(tmp_path, tool(output_schema=json.dumps({"type": "string"})))
    assert (error.field, error.problem) == ("output_schema.type", 'must be "object"')


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1979-05-27", "must be a JSON value (not a TOML date or time)"),
        ("nan", "must be a finite number"),
        ("inf", "must be a finite number"),
        ("9007199254740993", "an integer beyond 2**53 (a double's range)"),
    ],
)
def test_schema_values_must_be_json_a_struct_keeps(
    tmp_path: Path, value: str, problem: str
) -> None:
    text = tools_text(tool(output_schema=None)) + (
        f'[tools.output_schema]\ntype = "object"\ndefault = {{when = {value}}}\n'
    )
    error = refusal(tmp_path, text)
    assert (error.field, error.problem) == ("output_schema.default.when", problem)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{{ {{ticket}} }}", "a `{{` that starts no placeholder"),
        ("{{}}", "an empty placeholder"),
        ("{{   }}", "an empty placeholder"),
        ("Summarise {{ticket", "not closed with }}"),
        ("Summarise {{ticket}", "not closed with }}"),
        ("Summarise {{ticket }x}", "not closed with }}"),
        ("{{{ticket}}}", "a `{{` that starts no placeholder"),
        ("{{1ticket}}", "starts with a digit"),
        ("{{ticket-id}}", "not closed with }}"),
        ("{{" + "t" * 65 + "}}", "longer than 64 characters"),
        ("{{\tticket}}", "a `{{` that starts no placeholder"),
        ("trailing {{", "a `{{` that starts no placeholder"),
        ("{{other}}", "placeholder {{other}} names no property of input_schema"),
        ("{{required}}", "placeholder {{required}} names no property of input_schema"),
    ],
)
def test_placeholder_tricks_are_refused(tmp_path: Path, content: str, problem: str) -> None:
    messages = [{"role": "user", "content": f"{PROMPT_TEXT} {content}"}]
    error = refused(tmp_path, tool(messages=messages))
    assert error.field == "messages[0].content"
    assert problem in error.problem, str(error)


def test_the_place_of_a_malformed_placeholder_is_named(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "ok"}, {"role": "user", "content": "abc {{ x"}]
    error = refused(tmp_path, tool(messages=messages))
    assert error.field == "messages[1].content"
    assert error.problem.endswith("(at character 4)")


def test_braces_that_are_no_placeholder_opening_are_plain_text(tmp_path: Path) -> None:
    content = 'Answer as {"label": {"name": "x"}} with } or { alone; {{ticket}} and {{ labels }}'
    (spec,) = load(tmp_path, tool(messages=[{"role": "user", "content": content}]))
    assert spec.messages == (PromptMessage("user", content),)


def test_placeholders_are_bounded_in_all(tmp_path: Path) -> None:
    half = "{{ticket}}" * (MAX_PLACEHOLDERS // 2)
    messages = [{"role": "user", "content": half}, {"role": "user", "content": half}]
    assert load(tmp_path, tool(messages=messages))
    messages.append({"role": "user", "content": "{{ticket}}"})
    error = refused(tmp_path, tool(messages=messages))
    assert (error.field, error.problem) == (
        "messages[2].content",
        f"more than {MAX_PLACEHOLDERS} placeholders in all messages",
    )


def test_an_error_line_quotes_no_prompt_text(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": f"{PROMPT_TEXT} {{{{ {PROMPT_TEXT}"}]
    error = refused(tmp_path, tool(messages=messages))
    assert PROMPT_TEXT not in str(error)


TOML_PIECES = st.sampled_from(
    [
        "[[tools]]\n",
        "[tools]\n",
        "[tools.input_schema]\n",
        'name = "tools.a.b"\n',
        'title = "T"\n',
        'description = "D"\n',
        'type = "object"\n',
        "messages = [{role = 'user', content = '{{x}}'}]\n",
        "properties.x = {type = 'string'}\n",
        "agenta_app = 'app'\n",
        "x = [[[[",
        "]]]]\n",
        "= {\n",
        '"\\u00ff"',
        "1979-05-27T07:32:00Z\n",
        "nan\n",
        "{{ }}",
        "\n",
    ]
)


def loads_or_refuses(text: str) -> None:
    """What the loader may do with any text: give tools, or refuse with one line."""
    try:
        specs = load_tools_text(text, "tools.toml", reserved_names=RESERVED)
    except ToolsFileError as error:
        assert "\n" not in str(error) and str(error).startswith("tools file tools.toml: ")
    else:
        assert all(isinstance(spec, DeclaredToolSpec) for spec in specs)


@settings(max_examples=300, deadline=None)
@given(st.lists(TOML_PIECES, max_size=30).map("".join) | st.text(max_size=300))
def test_any_text_loads_or_is_refused_in_one_line(text: str) -> None:
    loads_or_refuses(text)


FIELD_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["{{x}}", "{{ }}", "object", json.dumps(INPUT_SCHEMA)]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["type", "properties", "x", "role", "content", "items", "$ref", "a"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
).filter(lambda value: value is not None)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "title",
                "description",
                "permission",
                "input_schema",
                "output_schema",
                "text",
                "annotations",
                "messages",
                "agenta_app",
                "model",
                "temperature",
                "max_tokens",
                "other",
            ]
        ),
        FIELD_VALUES,
        max_size=6,
    )
)
def test_any_tool_table_loads_or_is_refused_in_one_line(fields: dict[str, Any]) -> None:
    try:
        text = tools_text(tool(**fields))
    except TypeError:  # a None nested in a list: TOML has no null
        return
    loads_or_refuses(text)


# --- render --------------------------------------------------------------------------------


def test_render_fills_in_strings_as_they_are_and_other_values_as_compact_json() -> None:
    arguments = {"text": "héllo {{x}}", "labels": ["a", "b"], "n": 3, "flag": True, "none": None}
    content = "{{text}}|{{ labels }}|{{n}}|{{flag}}|{{none}}|{{absent}}|"
    assert render(content, arguments) == 'héllo {{x}}|["a","b"]|3|true|null||'
    # An integer restored from a double (1e30 where the schema says integer) is beyond 64 bits.
    assert render("{{n}}", {"n": [10**30]}) == "[" + "1" + "0" * 30 + "]"
    # An Agenta app's inputs are the same texts.
    assert argument_text([10**30]) == "[" + "1" + "0" * 30 + "]"
    assert argument_text("as it is") == "as it is"


def test_render_keeps_what_is_no_placeholder() -> None:
    assert render("{{{a}}}", {"a": "X"}) == "{X}"
    assert render("{{ }} {{1a}} {{a", {"a": "X"}) == "{{ }} {{1a}} {{a"


# A reference for the rule: what a regular expression would do (on short test texts only).
_REFERENCE = re.compile(r"\{\{ *([A-Za-z_][A-Za-z0-9_]{0,63}) *\}\}")


def reference_render(content: str, arguments: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in arguments:
            return ""
        item = arguments[name]
        return item if isinstance(item, str) else json.dumps(item, separators=(",", ":"))

    return _REFERENCE.sub(value, content)


ARGUMENT_NAMES = st.sampled_from(["a", "b", "_c", "long_name_1"])
TEXTS = st.text(alphabet=st.sampled_from(list("{} ab_c1x\n")), max_size=60)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@settings(max_examples=500, deadline=None)
@given(
    TEXTS,
    st.dictionaries(ARGUMENT_NAMES, st.one_of(TEXTS, JSON_VALUES)),
)
@example("{{a}}{{b}}", {"a": "{{b}}", "b": "{{a}}"})
@example("{{{{a}}}}", {"a": "x"})
def test_render_is_the_reference_rule(content: str, arguments: dict[str, Any]) -> None:
    assert render(content, arguments) == reference_render(content, arguments)


@given(
    st.text(max_size=200).filter(lambda text: "{{" not in text),
    st.dictionaries(ARGUMENT_NAMES, TEXTS),
)
def test_render_gives_back_content_without_placeholders(
    content: str, arguments: dict[str, Any]
) -> None:
    assert render(content, arguments) == content


@given(
    st.lists(
        st.tuples(st.text(max_size=20).filter(lambda t: "{" not in t), ARGUMENT_NAMES), max_size=8
    ),
    st.dictionaries(ARGUMENT_NAMES, st.text(max_size=30)),
)
def test_substituted_text_is_never_scanned_again(
    parts: list[tuple[str, str]], arguments: dict[str, str]
) -> None:
    """Arguments may hold placeholders themselves: they arrive as they are, once."""
    hostile = {name: "{{" + name + "}}" + value for name, value in arguments.items()}
    content = "".join(f"{text}{{{{{name}}}}}" for text, name in parts)
    expected = "".join(text + hostile.get(name, "") for text, name in parts)
    assert render(content, hostile) == expected


@pytest.mark.parametrize(
    "unit",
    ["{{", "{{ ", "{{a", "{{ a ", "{{{", "{{" + "a" * 64, "{{" + " " * 50 + "a" * 40, "{{a}}"],
)
def test_render_stays_linear_on_hostile_content(unit: str) -> None:
    """A megabyte of any repeated opening, a thousand times the text a loaded message may hold,
    renders within seconds: a scan that went back over the text would take hours."""
    content = unit * (1_000_000 // len(unit))
    started = time.perf_counter()
    render(content, {"a": "x"})
    assert time.perf_counter() - started < 3.0


def test_a_loaded_message_renders_in_well_under_a_millisecond_per_kilobyte(tmp_path: Path) -> None:
    """What runs on the event loop per call: the longest content a file may hold, with every
    placeholder it may hold, each filled with a long argument."""
    filler = "x" * (100_000 - 11 * MAX_PLACEHOLDERS)
    content = filler + "{{ticket}} " * MAX_PLACEHOLDERS
    (spec,) = load(tmp_path, tool(messages=[{"role": "user", "content": content}]))
    assert spec.messages is not None
    started = time.perf_counter()
    rendered = render(spec.messages[0].content, {"ticket": "y" * 10_000})
    elapsed = time.perf_counter() - started
    assert len(rendered) == len(filler) + MAX_PLACEHOLDERS * 10_001
    assert elapsed < 0.05


# --- start-up -------------------------------------------------------------------------------


def test_a_bad_tools_file_stops_the_server_with_one_line(tmp_path: Path, keys: TestKeys) -> None:
    """A real `aiservices-server` process: the line names the file, the tool and the field."""
    path = write(tmp_path, tools_text(tool(name="tools.acme.ok"), tool(temperature=3)))
    settings = {"API_KEYS_FILE": str(keys.path), "TOOLS_FILE": str(path)}
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", **settings})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"aiservices: tools file {path}: tool {NAME}: temperature: must be a number from 0 to 2\n"
    )


def test_a_missing_tools_file_stops_the_server_with_one_line(
    tmp_path: Path, keys: TestKeys
) -> None:
    path = tmp_path / "absent.toml"
    settings = {"API_KEYS_FILE": str(keys.path), "TOOLS_FILE": str(path)}
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", **settings})
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"aiservices: tools file {path}: cannot read it (No such file or directory)\n"
    )


# --- the documentation ----------------------------------------------------------------------


def test_the_example_in_docs_tools_md_loads_as_described(tmp_path: Path) -> None:
    page = (REPO_ROOT / "docs" / "tools.md").read_text()
    section = page[page.index("## Declared tools") : page.index("## Tools as packages")]
    example = section[section.index("```toml\n") + len("```toml\n") :]
    example = example[: example.index("```")]
    (spec,) = load_tools_file(write(tmp_path, example), reserved_names=RESERVED)
    assert spec.definition.name == "tools.acme.support.classify"
    assert spec.definition.permission == "support"
    assert spec.text_field == "label"
    assert spec.agenta_app == "classify-ticket"
    assert spec.messages is not None
    rendered = render(spec.messages[1].content, {"ticket": "My invoice is wrong"})
    assert rendered == "My invoice is wrong"
    assert render(spec.messages[0].content, {"labels": ["billing", "bug"]}).startswith(
        'Classify the ticket into exactly one of these labels: ["billing","bug"].'
    )


def test_tools_whose_definitions_would_not_fit_a_get_status_reply_stop_the_server(
    tmp_path: Path, keys: TestKeys
) -> None:
    """GetStatus lists every tool in one message: a file within its byte bound whose tools
    encode past MAX_MESSAGE_BYTES (numbers take 9 bytes each in a Struct, 2 to 5 as text) is
    refused at start-up, not left to fail every GetStatus."""
    properties = {**INPUT_SCHEMA["properties"], "size": {"type": "number", "enum": [*range(9000)]}}
    big_enum = {**INPUT_SCHEMA, "properties": properties}
    tools = [
        tool(name=f"tools.acme.big.t{n}", input_schema=json.dumps(big_enum)) for n in range(14)
    ]
    path = write(tmp_path, tools_text(*tools))
    assert path.stat().st_size < 1024 * 1024
    settings = {
        "API_KEYS_FILE": str(keys.path),
        "TOOLS_FILE": str(path),
        "UPSTREAM": "openai",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "OPENAI_MODEL": "m",
    }
    result = run_to_exit(tmp_path, {"GRPC_ADDRESS": "127.0.0.1:0", **settings})
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("aiservices: invalid setting AGENTA_AI_SERVICES_TOOLS_FILE: its tools'")
    assert line.endswith("a GetStatus reply may hold (AGENTA_AI_SERVICES_MAX_MESSAGE_BYTES)")
