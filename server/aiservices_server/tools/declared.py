"""Declared tools: the tools file an operator writes (`AGENTA_AI_SERVICES_TOOLS_FILE`), checked
whole at load, and the placeholder rule of its messages.

A tools file is TOML: `[[tools]]` tables, each naming a tool, its schemas and how the model is
asked (`messages` for an OpenAI-compatible upstream, `agenta_app` for the Agenta runner). Every
rule a tool must follow is checked here, before anything is served: a file that loads is one the
runtime can serve without a surprise, and a file that does not load is refused with one line,
`tools file <path>: tool <name or #n>: <field>: <what is wrong>`, naming no prompt text.

Everything here is bounded and linear in the file's size: the file's bytes, the number of tools,
every string, the depth and size of each schema (walked with a stack of its own, never by
recursion), and placeholders are found by a scan that never backtracks.

This module holds the data the runtime uses (`DeclaredToolSpec`, `PromptMessage`) and the one
placeholder rule (`render`); how a spec becomes a served tool lives elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from aiservices_server.files import read_text_file, refuse_writable_by_others
from aiservices_server.tomltext import TomlProblem, load_toml
from aiservices_server.tools.base import JsonObject, ToolAnnotations, ToolDefinition

__all__ = [
    "MAX_CONTENT_CHARS",
    "MAX_DESCRIPTION_CHARS",
    "MAX_MESSAGES",
    "MAX_PLACEHOLDERS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_VALUES",
    "MAX_TOOLS",
    "MAX_TOOLS_FILE_BYTES",
    "TOOL_NAME_RULE",
    "DeclaredToolSpec",
    "PromptMessage",
    "TemplateParts",
    "ToolsFileError",
    "fill",
    "is_valid_tool_name",
    "load_tools_file",
    "load_tools_text",
    "read_tools_text",
    "render",
    "template_parts",
]

MAX_TOOLS_FILE_BYTES = 1024 * 1024
"""A tools file of 500 tools with real schemas and prompts is well under this."""

MAX_TOOLS = 500
MAX_TOOL_NAME_CHARS = 128
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 10_000
MAX_PERMISSION_CHARS = 128
MAX_SCHEMA_DEPTH = 32
"""Objects and arrays nested in one schema, counting the schema itself as 1."""
MAX_SCHEMA_VALUES = 10_000
"""Values (object members and array items, at any depth) in one schema."""
MAX_SCHEMA_INTEGER = 2**53
"""Schemas travel as protobuf Structs, whose numbers are doubles: larger integers would change."""
MAX_MESSAGES = 50
MAX_CONTENT_CHARS = 100_000
MAX_PLACEHOLDERS = 32
"""Placeholders in all of one tool's messages: each copies an argument into the request, so this
bounds how much larger than its arguments a request can get."""
MAX_PLACEHOLDER_NAME_CHARS = 64
MAX_MODEL_CHARS = 200
MAX_MAX_TOKENS = 1_000_000
MAX_APP_CHARS = 128
MAX_PATH_PART_CHARS = 64
"""A schema key named in an error line is cut to this many characters."""

TOOL_NAME_RULE = (
    f"must be 1 to {MAX_TOOL_NAME_CHARS} characters: two or more dot-separated parts of "
    "a-z 0-9 _ -, each starting with a letter or digit (like tools.acme.text.summarize)"
)
APP_RULE = (
    f"must be 1 to {MAX_APP_CHARS} characters from A-Z a-z 0-9 . _ -, starting with a letter or "
    "digit"
)
_NAME_PART_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_APP_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_APP_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_PLACEHOLDER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_PLACEHOLDER_START = _PLACEHOLDER_CHARS - frozenset("0123456789")
ROLES = ("system", "user", "assistant")
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

_TOOL_KEYS = frozenset(
    {
        "name",
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
    }
)
_ANNOTATION_KEYS = ("read_only_hint", "destructive_hint", "idempotent_hint", "open_world_hint")
# Permissions that are no tool's: "*" grants every tool, act_for_users is the right to delegate.
NOT_TOOL_PERMISSIONS = frozenset({"*", "act_for_users"})


# --- the data the runtime uses -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptMessage:
    """One message sent to an OpenAI-compatible upstream. `role` is system, user or assistant;
    `content` may hold `{{argument}}` placeholders, each naming a property of the tool's input
    schema (checked at load; `render` fills them in)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class DeclaredToolSpec:
    """One tool of a tools file, every rule checked.

    `definition` is what callers see (permission defaulted to the name). `text_field` names the
    top-level string property of the output that becomes the text block (the output schema
    requires it); None: the output as compact JSON text. `messages` is how an OpenAI-compatible
    upstream is asked (with `model`, `temperature`, `max_tokens` overriding the settings), and
    `agenta_app` the app slug on the Agenta runner; a tool has one or both."""

    definition: ToolDefinition
    text_field: str | None
    messages: tuple[PromptMessage, ...] | None
    agenta_app: str | None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None


class ToolsFileError(Exception):
    """The tools file cannot be used. `str()` is the one line to print: it names the file and,
    when the problem is in one tool, the tool (its name, or `#n` counting tables from 1) and
    the field. It never quotes prompt text or argument values."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        problem: str,
        *,
        tool: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        self.tool = tool
        self.field = field
        parts = [f"tools file {self.path}"]
        if tool is not None:
            parts.append(f"tool {tool}")
        if field is not None:
            parts.append(field)
        parts.append(problem)
        super().__init__(": ".join(parts))


class Problem(Exception):
    """A problem in one field of one tool; the loader adds the file and the tool."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field
        self.problem = problem


def is_valid_tool_name(name: str) -> bool:
    """Whether `name` follows the tool naming rule (`TOOL_NAME_RULE`), as built-in tools do:
    lowercase dot-separated parts, so a name reads the same in logs, metrics and permissions."""
    if not 0 < len(name) <= MAX_TOOL_NAME_CHARS:
        return False
    parts = name.split(".")
    return len(parts) >= 2 and all(
        part and part[0] in _NAME_START and all(ch in _NAME_PART_CHARS for ch in part)
        for part in parts
    )


# --- placeholders ----------------------------------------------------------------------------


_NO_PLACEHOLDER = "a `{{` that starts no placeholder: write {{name}}, the name of an input property"
# One character class, greedy, nothing after it: a match cannot backtrack.
_BRACES = re.compile(r"\{*")


@dataclass(frozen=True, slots=True)
class _Malformed:
    """A `{{` that starts no placeholder: where it is (character offset) and what is wrong."""

    position: int
    problem: str


def _tokens(content: str) -> Iterator[str | tuple[str] | _Malformed]:
    """The content as literal text (str), placeholders (a 1-tuple holding the name) and
    malformed `{{` (which render keeps as literal text).

    A placeholder is `{{`, optional spaces, a name (a letter or `_`, then letters, digits and
    `_`, at most MAX_PLACEHOLDER_NAME_CHARS), optional spaces, `}}`; the leftmost one first, as
    a regular expression would find them. One pass: `str.find` to the next `{{`, then characters
    read forward only as far as a placeholder could reach; after a malformed one the scan goes on
    one character later, where the next `{{` can start only if the text read is braces, so no
    character is read more than a bounded number of times.
    """
    start = 0
    end = len(content)
    while True:
        at = content.find("{{", start)
        if at < 0:
            if start < end:
                yield content[start:]
            return
        if at > start:
            yield content[start:at]
        if content.startswith("{", at + 2):
            # Every `{{` of a run of braces but the last is followed by a brace: not one starts
            # a placeholder. The run is passed at once, so a megabyte of braces is one step.
            braces = _BRACES.match(content, at)
            run_end = braces.end() if braces is not None else at + 3
            yield _Malformed(at, _NO_PLACEHOLDER)
            yield content[at : run_end - 2]
            start = run_end - 2
            continue
        i = at + 2
        while i < end and content[i] == " ":
            i += 1
        name_start = i
        while (
            i < end
            and content[i] in _PLACEHOLDER_CHARS
            and i - name_start <= MAX_PLACEHOLDER_NAME_CHARS
        ):
            i += 1
        name = content[name_start:i]
        while i < end and content[i] == " ":
            i += 1
        problem = None
        if not name:
            problem = "an empty placeholder" if content.startswith("}}", i) else _NO_PLACEHOLDER
        elif name[0] not in _PLACEHOLDER_START:
            problem = "a placeholder whose name starts with a digit"
        elif len(name) > MAX_PLACEHOLDER_NAME_CHARS:
            problem = f"a placeholder name longer than {MAX_PLACEHOLDER_NAME_CHARS} characters"
        elif not content.startswith("}}", i):
            problem = "a placeholder not closed with }} right after its name"
        if problem is not None:
            yield _Malformed(at, problem)
            yield "{"
            start = at + 1
            continue
        yield (name,)
        start = i + 2


TemplateParts = tuple[str | tuple[str], ...]
"""A message's content split into literal text (str) and placeholders (a 1-tuple of the name)."""


def template_parts(content: str) -> TemplateParts:
    """`content` split once, so a tool fills its messages on each call without reading them
    again; text that is no placeholder (which the loader refuses in a tools file) is literal."""
    return tuple(token for token in _tokens(content) if not isinstance(token, _Malformed))


def fill(parts: TemplateParts, arguments: Mapping[str, Any]) -> str:
    """The content `parts` came from, each placeholder replaced as `render` says."""
    pieces: list[str] = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        value = arguments.get(part[0])
        if value is None and part[0] not in arguments:
            continue
        pieces.append(argument_text(value))
    return "".join(pieces)


def render(content: str, arguments: Mapping[str, Any]) -> str:
    """`content` with each `{{name}}` placeholder replaced by the argument `name`: a string as
    it is, any other value as compact JSON, an absent argument as "". Substitution is literal
    and in one pass: nothing is evaluated, and text an argument brings in is never scanned
    again (an argument holding `{{other}}` stays as it is). Text that is no placeholder (which
    the loader refuses in a tools file) is kept as it is. Linear in the content and the result.
    """
    if "{{" not in content:
        return content
    return fill(template_parts(content), arguments)


def argument_text(value: Any) -> str:
    """An argument as text: a string as it is, anything else as compact JSON. Arguments are
    JSON already, but an integer restored from a Struct's double (1e300 where the schema says
    integer) is beyond what orjson writes."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _placeholders(content: str, field: str) -> list[str]:
    """The names `content` refers to, in order; Problem for a malformed placeholder."""
    names: list[str] = []
    for token in _tokens(content):
        if isinstance(token, _Malformed):
            raise Problem(field, f"{token.problem} (at character {token.position})")
        if isinstance(token, tuple):
            names.append(token[0])
    return names


# --- JSON Schemas ----------------------------------------------------------------------------

# Draft 2020-12's vocabularies (core, applicator, unevaluated, validation, meta-data, format
# annotation, content), by what their value holds. Anything else is refused: a misspelt keyword
# would otherwise be ignored, and the schema would allow what its author meant to refuse.
_SCHEMA_VALUED = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "items",
        "contains",
        "additionalProperties",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_SCHEMA_ARRAYS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_MAPS = frozenset({"properties", "$defs", "dependentSchemas"})
_PLAIN_KEYWORDS = frozenset(
    {
        "$schema",
        "$comment",
        "type",
        "enum",
        "const",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxContains",
        "minContains",
        "maxProperties",
        "minProperties",
        "required",
        "dependentRequired",
        "title",
        "description",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "examples",
        "format",
        "contentEncoding",
        "contentMediaType",
    }
)
# Draft 2020-12 keywords a tools file may not use, and why.
_REFUSED_KEYWORDS = {
    "$ref": "references are not accepted: write the schema out in place",
    "$dynamicRef": "references are not accepted: write the schema out in place",
    "$id": "schema identifiers are not accepted: a tool's schemas stand alone",
    "$anchor": "anchors are not accepted: a tool's schemas stand alone",
    "$dynamicAnchor": "anchors are not accepted: a tool's schemas stand alone",
    "$vocabulary": "vocabularies are not accepted: schemas are JSON Schema draft 2020-12",
    "pattern": "regular expressions are not accepted: they could take unbounded time on a "
    "caller's or a model's text",
    "patternProperties": "regular expressions are not accepted: they could take unbounded time "
    "on a caller's or a model's text",
}


def _path(base: str, parts: Iterator[str | int] | list[str | int]) -> str:
    """`base.key[index]...`, each key cut to MAX_PATH_PART_CHARS: a property name may be long."""
    out = base
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            cut = part[:MAX_PATH_PART_CHARS]
            out += "." + cut + ("..." if len(part) > MAX_PATH_PART_CHARS else "")
    return out


def _json_value(value: Any, field: str) -> Any:
    """`value` (a TOML table or a JSON object text) as a JSON object, every value checked: JSON
    types only (no TOML dates), finite numbers, integers a double holds, at most
    MAX_SCHEMA_DEPTH deep and MAX_SCHEMA_VALUES values. Walked with a stack, never recursion."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            reason = "nested too deeply" if "depth" in str(exc) else f"at character {exc.pos}"
            raise Problem(field, f"not a valid JSON object ({reason})") from None
    if not isinstance(value, dict):
        raise Problem(field, "must be a table, or a string holding a JSON object")
    left = MAX_SCHEMA_VALUES
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, where = stack.pop()
        if isinstance(item, dict | list):
            if len(where) >= MAX_SCHEMA_DEPTH:
                raise Problem(_path(field, where), f"nested deeper than {MAX_SCHEMA_DEPTH}")
            left -= len(item)
            if left < 0:
                raise Problem(field, f"holds more than {MAX_SCHEMA_VALUES} values")
            if isinstance(item, dict):
                stack.extend((v, [*where, k]) for k, v in item.items())
            else:
                stack.extend((v, [*where, i]) for i, v in enumerate(item))
        elif isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        elif isinstance(item, int):
            if abs(item) > MAX_SCHEMA_INTEGER:
                raise Problem(_path(field, where), "an integer beyond 2**53 (a double's range)")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise Problem(_path(field, where), "must be a finite number")
        else:
            raise Problem(_path(field, where), "must be a JSON value (not a TOML date or time)")
    return value


def check_keywords(schema: JsonObject, field: str) -> None:
    """Every keyword of every subschema is a Draft 2020-12 keyword a tools file may use. Only
    subschemas are read as schemas: `properties.type` is a property named "type"."""
    stack: list[tuple[Any, list[str | int]]] = [(schema, [])]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue  # a boolean schema, or a wrong type check_schema names
        for keyword, value in node.items():
            at = [*where, keyword]
            if keyword in _REFUSED_KEYWORDS:
                raise Problem(_path(field, at), _REFUSED_KEYWORDS[keyword])
            if keyword == "uniqueItems" and value is True:
                raise Problem(
                    _path(field, at),
                    "uniqueItems is not accepted: checking it takes time growing with the square "
                    "of a list's length (a thousand objects hold the server for seconds)",
                )
            if keyword == "$schema" and (where or value != SCHEMA_DIALECT):
                raise Problem(
                    _path(field, at), f"only {SCHEMA_DIALECT} is accepted, at the top level"
                )
            if keyword in _SCHEMA_VALUED:
                stack.append((value, at))
            elif keyword in _SCHEMA_ARRAYS:
                if isinstance(value, list):
                    stack.extend((v, [*at, i]) for i, v in enumerate(value))
            elif keyword in _SCHEMA_MAPS:
                if isinstance(value, dict):
                    stack.extend((v, [*at, k]) for k, v in value.items())
            elif keyword not in _PLAIN_KEYWORDS:
                raise Problem(
                    _path(field, at), "not a JSON Schema draft 2020-12 keyword (misspelt?)"
                )


def _schema(entry: Mapping[str, Any], key: str) -> JsonObject:
    """The schema under `key`: JSON values within bounds, only known keywords, valid against
    the draft 2020-12 meta-schema, and of `type: object` (tool arguments and MCP structured
    content are objects)."""
    if key not in entry:
        raise Problem(key, "required field is missing")
    schema: JsonObject = _json_value(entry[key], key)
    check_keywords(schema, key)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        message = exc.message if len(exc.message) <= 200 else exc.message[:200] + "..."
        raise Problem(
            _path(key, list(exc.absolute_path)), f"not a valid schema: {message}"
        ) from None
    if schema.get("type") != "object":
        raise Problem(f"{key}.type", 'must be "object"')
    return schema


# --- one tool --------------------------------------------------------------------------------


def _string(
    entry: Mapping[str, Any], key: str, *, limit: int, required: bool, multiline: str = ""
) -> str | None:
    """The string under `key`, non-blank, at most `limit` characters, printable but for the
    characters in `multiline`; None when absent and not `required`."""
    value = entry.get(key)
    if value is None:
        if required:
            raise Problem(key, "required field is missing")
        return None
    if not isinstance(value, str):
        raise Problem(key, "must be a string")
    if not value.strip():
        raise Problem(key, "must not be blank")
    if len(value) > limit:
        raise Problem(key, f"must be at most {limit} characters")
    if any(not ch.isprintable() and ch not in multiline for ch in value):
        raise Problem(
            key, "must hold no control characters" + (" but newlines and tabs" if multiline else "")
        )
    return value


def _permission(entry: Mapping[str, Any], name: str) -> str:
    value = _string(entry, "permission", limit=MAX_PERMISSION_CHARS, required=False)
    if value is None:
        return name
    if any(ch.isspace() for ch in value):  # `_string` has refused what is not printable
        raise Problem("permission", "must be a name without spaces, as in the keys file")
    if value in NOT_TOOL_PERMISSIONS:
        raise Problem("permission", f"{value!r} is no tool's permission: name the tool's own")
    return value


def _annotations(entry: Mapping[str, Any]) -> ToolAnnotations:
    value = entry.get("annotations")
    if value is None:
        return ToolAnnotations()
    if not isinstance(value, dict):
        raise Problem("annotations", "must be a table")
    for key, hint in value.items():
        if key not in _ANNOTATION_KEYS:
            raise Problem(
                f"annotations.{key}", "unknown field (known: " + ", ".join(_ANNOTATION_KEYS) + ")"
            )
        if not isinstance(hint, bool):
            raise Problem(f"annotations.{key}", "must be true or false")
    return ToolAnnotations(**value)


def _text_field(entry: Mapping[str, Any], output_schema: JsonObject) -> str | None:
    text = entry.get("text")
    if text is None:
        return None
    if not isinstance(text, str):
        raise Problem("text", "must be a string naming a property of output_schema")
    properties = output_schema.get("properties")
    prop = properties.get(text) if isinstance(properties, dict) else None
    if not isinstance(prop, dict) or prop.get("type") != "string":
        raise Problem("text", 'must name a property of output_schema with type "string"')
    required = output_schema.get("required")
    if not isinstance(required, list) or text not in required:
        raise Problem("text", "must name a property output_schema lists in required")
    return text


def _messages(
    entry: Mapping[str, Any], input_schema: JsonObject
) -> tuple[PromptMessage, ...] | None:
    value = entry.get("messages")
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise Problem("messages", "must be a non-empty array of {role, content} tables")
    if len(value) > MAX_MESSAGES:
        raise Problem("messages", f"must hold at most {MAX_MESSAGES} messages")
    properties = input_schema.get("properties")
    known = properties if isinstance(properties, dict) else {}
    messages: list[PromptMessage] = []
    count = 0
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise Problem(where, "must be a {role, content} table")
        for key in message:
            if key not in ("role", "content"):
                raise Problem(f"{where}.{key}", "unknown field (known: role, content)")
        role = message.get("role")
        if role not in ROLES:
            raise Problem(f"{where}.role", "must be " + ", ".join(ROLES[:-1]) + " or assistant")
        content = message.get("content")
        if not isinstance(content, str):
            raise Problem(f"{where}.content", "must be a string")
        if not content.strip():
            raise Problem(f"{where}.content", "must not be blank")
        if len(content) > MAX_CONTENT_CHARS:
            raise Problem(f"{where}.content", f"must be at most {MAX_CONTENT_CHARS} characters")
        for name in _placeholders(content, f"{where}.content"):
            if name not in known:
                raise Problem(
                    f"{where}.content",
                    f"placeholder {{{{{name}}}}} names no property of input_schema",
                )
            count += 1
            if count > MAX_PLACEHOLDERS:
                raise Problem(
                    f"{where}.content", f"more than {MAX_PLACEHOLDERS} placeholders in all messages"
                )
        messages.append(PromptMessage(role=str(role), content=content))
    return tuple(messages)


def _agenta_app(entry: Mapping[str, Any]) -> str | None:
    value = entry.get("agenta_app")
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_APP_CHARS
        or value[0] not in _APP_START
        or any(ch not in _APP_CHARS for ch in value)
    ):
        raise Problem("agenta_app", APP_RULE)
    return value


def _model_settings(entry: Mapping[str, Any]) -> tuple[str | None, float | None, int | None]:
    model = entry.get("model")
    if model is not None and (
        not isinstance(model, str)
        or not 0 < len(model) <= MAX_MODEL_CHARS
        or not model.isprintable()
        or model != model.strip()
    ):
        raise Problem(
            "model",
            f"must be 1 to {MAX_MODEL_CHARS} printable characters without surrounding spaces",
        )
    temperature = entry.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise Problem("temperature", "must be a number from 0 to 2")
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool)
        or not isinstance(max_tokens, int)
        or not 1 <= max_tokens <= MAX_MAX_TOKENS
    ):
        raise Problem("max_tokens", f"must be an integer from 1 to {MAX_MAX_TOKENS:,}")
    if "messages" not in entry:
        for key in ("model", "temperature", "max_tokens"):
            if key in entry:
                raise Problem(key, "applies only to a tool with messages")
    return model, None if temperature is None else float(temperature), max_tokens


def _tool(entry: Mapping[str, Any], name: str) -> DeclaredToolSpec:
    """Check one `[[tools]]` table whose name is valid; Problem for the first problem."""
    for key in entry:
        if key not in _TOOL_KEYS:
            raise Problem(key, "unknown field")
    title = _string(entry, "title", limit=MAX_TITLE_CHARS, required=True)
    description = _string(
        entry, "description", limit=MAX_DESCRIPTION_CHARS, required=True, multiline="\n\t"
    )
    assert title is not None and description is not None
    permission = _permission(entry, name)
    input_schema = _schema(entry, "input_schema")
    output_schema = _schema(entry, "output_schema")
    text_field = _text_field(entry, output_schema)
    annotations = _annotations(entry)
    messages = _messages(entry, input_schema)
    agenta_app = _agenta_app(entry)
    if messages is None and agenta_app is None:
        raise Problem(
            "messages",
            "a tool needs messages (OpenAI-compatible upstream), agenta_app (Agenta), or both",
        )
    model, temperature, max_tokens = _model_settings(entry)
    definition = ToolDefinition(
        name=name,
        title=title,
        description=description,
        input_schema=input_schema,
        output_schema=output_schema,
        permission=permission,
        annotations=annotations,
    )
    return DeclaredToolSpec(
        definition=definition,
        text_field=text_field,
        messages=messages,
        agenta_app=agenta_app,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
    )


# --- the file --------------------------------------------------------------------------------


def read_tools_text(path: str | os.PathLike[str]) -> str:
    """The tools file's text: a regular file others cannot write (they could add tools that
    reach the upstream), at most MAX_TOOLS_FILE_BYTES of UTF-8 (at most one byte more is
    read); ToolsFileError (one line) otherwise."""

    def fail(problem: str) -> ToolsFileError:
        return ToolsFileError(path, problem)

    return read_text_file(
        path,
        MAX_TOOLS_FILE_BYTES,
        fail=fail,
        check_mode=lambda mode: refuse_writable_by_others(mode, "a tool", fail),
    )


def load_tools_file(path: Path, *, reserved_names: frozenset[str]) -> tuple[DeclaredToolSpec, ...]:
    """Read and check the tools file at `path`: every tool, in file order, or ToolsFileError
    (one line) for the first problem. `reserved_names` are tools served otherwise (the built-in
    ones): a declared tool may not take one of their names."""
    return load_tools_text(read_tools_text(path), path, reserved_names=reserved_names)


def load_tools_text(
    text: str, path: str | os.PathLike[str], *, reserved_names: frozenset[str]
) -> tuple[DeclaredToolSpec, ...]:
    """Check the text of the tools file at `path` (named in messages), as `load_tools_file`."""
    try:
        data = load_toml(text, "tools file")
    except TomlProblem as problem:
        raise ToolsFileError(path, str(problem)) from None
    for key in data:
        if key != "tools":
            raise ToolsFileError(
                path, "unknown field (a tools file holds only [[tools]])", field=key
            )
    entries = data.get("tools", [])
    if not isinstance(entries, list):
        raise ToolsFileError(path, "must be [[tools]] tables (an array of tables)", field="tools")
    if len(entries) > MAX_TOOLS:
        raise ToolsFileError(path, f"more than {MAX_TOOLS} tools", field="tools")
    specs: list[DeclaredToolSpec] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        tool = f"#{index + 1}"
        if not isinstance(entry, dict):
            raise ToolsFileError(path, "must be a table ([[tools]])", tool=tool)
        name = entry.get("name")
        if name is None:
            raise ToolsFileError(path, "required field is missing", tool=tool, field="name")
        if not isinstance(name, str) or not is_valid_tool_name(name):
            raise ToolsFileError(path, TOOL_NAME_RULE, tool=tool, field="name")
        tool = name
        if name in reserved_names:
            raise ToolsFileError(
                path, "is the name of a built-in tool: choose another", tool=tool, field="name"
            )
        if name in seen:
            raise ToolsFileError(
                path, f"already declared by tool #{seen[name] + 1}", tool=tool, field="name"
            )
        seen[name] = index
        try:
            specs.append(_tool(entry, name))
        except Problem as problem:
            raise ToolsFileError(path, problem.problem, tool=tool, field=problem.field) from None
    return tuple(specs)
