"""How the stand-in answers a declared tool: a small, deterministic instance of the JSON Schema
the request asks for, so `make demo` and tests see declared tools work end to end.

A declared tool's chat completions request is told apart from refine_prompt's by its schema:
a `json_schema` response format whose name is not refine's (`refined_prompt`), or, in
`json_object` mode, a system message starting with the adapter's `SCHEMA_INSTRUCTION` followed
by the schema as JSON (where `aiservices_server.upstream.chat` puts it). On the Agenta endpoint
the stand-in knows a declared app's schema only when it was given one (`StandinUpstream(apps=)`).

The generator covers the subset the examples use: objects (every property, required or not),
strings (enum, minLength, maxLength), integers and numbers (minimum, maximum and their
exclusive forms), booleans, arrays (items, minItems, maxItems), null, `const`, and the first
choice of `anyOf`/`oneOf` or of a list of types.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiservices_server.upstream.chat import SCHEMA_INSTRUCTION
from tests.standin import openai

REFINE_FORMAT_NAME: Final = "refined_prompt"
OFF_SCHEMA_TEXT: Final = "stand-in model text that breaks the schema"
"""What `off_schema` puts where the schema wants something else: tests assert that no caller
ever sees it."""
# The generator stops this deep: the loader bounds schemas, and a stand-in must not recurse on one.
_MAX_DEPTH: Final = 32


def _well_formed(body: dict[str, Any]) -> bool:
    """Whether a chat request keeps the convention's rules that hold for every tool: a model,
    a non-empty list of messages with a role and text content, and valid options. One that
    does not is left to the refine path, which refuses it naming the field."""
    messages = body.get("messages")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return False
    if not isinstance(messages, list) or not messages:
        return False
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return False
        if not isinstance(message.get("content"), str):
            return False
    try:
        openai._check_options(body)
    except openai.ChatRequestError:
        return False
    return True


def declared_schema(body: Any) -> dict[str, Any] | None:
    """The output schema a chat completions request asks for when it comes from a declared tool;
    None for refine_prompt's requests and anything else (a request off the convention too)."""
    if not isinstance(body, dict) or not _well_formed(body):
        return None
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or spec.get("name") == REFINE_FORMAT_NAME:
            return None
        schema = spec.get("schema")
        return schema if isinstance(schema, dict) else None
    messages = body.get("messages")
    if response_format.get("type") != "json_object" or not isinstance(messages, list):
        return None
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if (
            isinstance(message, dict)
            and message.get("role") == "system"
            and isinstance(content, str)
            and content.startswith(SCHEMA_INSTRUCTION)
        ):
            try:
                schema = json.loads(content.removeprefix(SCHEMA_INSTRUCTION))
            except ValueError:
                return None
            return schema if isinstance(schema, dict) else None
    return None


def instance(schema: Any, name: str = "value", depth: int = 0) -> Any:
    """A value that fits `schema`, the same every time; `name` (the property it is for) makes
    strings read like what they hold."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for choice in ("anyOf", "oneOf"):
        options = schema.get(choice)
        if isinstance(options, list) and options:
            return instance(options[0], name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or ["null"]
        kind = kinds[0]
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            extra = schema.get("additionalProperties")
            return {"example": instance(extra, name, depth + 1)} if isinstance(extra, dict) else {}
        return {key: instance(value, key, depth + 1) for key, value in properties.items()}
    if kind == "array":
        least = schema.get("minItems", 1)
        most = schema.get("maxItems", max(least, 2))
        count = min(max(least, 2), most)
        items = schema.get("items", {})
        return [instance(items, f"{name} {index + 1}", depth + 1) for index in range(count)]
    if kind == "string":
        return _string(schema, name)
    if kind in ("integer", "number"):
        return _number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return f"example {name}"


def _string(schema: dict[str, Any], name: str) -> str:
    text = f"example {name}"
    least = schema.get("minLength", 0)
    most = schema.get("maxLength")
    if len(text) < least:
        text += "." * (least - len(text))
    if most is not None and len(text) > most:
        text = text[:most]
    return text


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    value: float = 1
    if "minimum" in schema:
        value = max(value, schema["minimum"])
    if "exclusiveMinimum" in schema:
        value = max(value, schema["exclusiveMinimum"] + 1)
    if "maximum" in schema:
        value = min(value, schema["maximum"])
    if "exclusiveMaximum" in schema:
        value = min(value, schema["exclusiveMaximum"] - 1)
    return int(value) if integer else value


def off_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An instance of `schema` with its first required property (else its first) broken: a
    string with an enum, or any property that is not a free string, gets OFF_SCHEMA_TEXT; a free
    string gets a number."""
    output = instance(schema)
    if not isinstance(output, dict):
        return {"unexpected": OFF_SCHEMA_TEXT}
    properties = schema.get("properties") or {}
    required = schema.get("required") or list(properties)
    if not required:
        return {**output, "unexpected": OFF_SCHEMA_TEXT}
    key = required[0]
    rule = properties.get(key, {})
    free_string = rule.get("type") == "string" and "enum" not in rule
    output[key] = 12345 if free_string else OFF_SCHEMA_TEXT
    return output
