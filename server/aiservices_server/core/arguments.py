"""Argument checks against a tool's JSON Schema, phrased for callers.

Messages name the field and the rule, never the value: values may be prompt text.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from aiservices_server.errors import MAX_VIOLATIONS, FieldViolation, InvalidArgument

# Values (object members and list items, at any depth) one call's arguments may hold. A 1 MiB
# request can carry hundreds of thousands of them, and explaining a refusal costs jsonschema up to
# 10-15 us per value: seconds of a held event loop, while real arguments hold a handful. At this
# bound converting and checking any arguments stays well within the 50 ms a call may hold it.
MAX_ARGUMENT_VALUES = 2_000
# Object keys in arguments are names; every refusal quotes the unknown ones, twice over.
MAX_KEY_CHARS = 256

_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


def field_path(base: str, parts: Iterable[Any]) -> str:
    """`base` followed by `.key` and `[index]` parts: the field name callers see."""
    path = base
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _describe(error: ValidationError, room: int) -> tuple[list[FieldViolation], int]:
    """Up to `room` violations for one jsonschema error, and how many more it stands for."""
    field = _string_path(error)
    rule: Any = error.validator
    expected: Any = error.validator_value
    schema: Any = error.schema
    if rule == "additionalProperties" and isinstance(error.instance, dict):
        known = schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known]
        # The first in sorted order, without sorting them all: a caller may send thousands.
        shown = heapq.nsmallest(room, unknown)
        violations = [FieldViolation(field_path(field, [key]), "unknown argument") for key in shown]
        return violations, len(unknown) - len(shown)
    if rule == "required" and isinstance(error.instance, dict):
        missing = [key for key in expected if key not in error.instance]
        violations = [FieldViolation(f"{field}.{key}", "is required") for key in missing[:room]]
        return violations, len(missing) - len(violations)
    if room <= 0:
        return [], 1
    if "propertyNames" in error.relative_schema_path:
        # The value is a key of the object at `field`: said of the object, never quoted.
        names = {
            "maxLength": f"holds a name longer than {expected} characters",
            "minLength": "holds an empty name"
            if expected == 1
            else f"holds a name shorter than {expected} characters",
        }
        return [FieldViolation(field, names.get(str(rule), f"holds a name that breaks {rule}"))], 0
    if rule == "type":
        types = [expected] if isinstance(expected, str) else list(expected)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return [FieldViolation(field, f"must be {words}")], 0
    if rule == "enum":
        return [FieldViolation(field, "must be one of " + ", ".join(map(str, expected)))], 0
    descriptions = {
        "maxLength": f"must be at most {expected} characters",
        "minLength": f"must be at least {expected} characters",
        "maximum": f"must be at most {expected}",
        "minimum": f"must be at least {expected}",
        "maxItems": f"must have at most {expected} items",
        "minItems": f"must have at least {expected} items",
        "maxProperties": f"must have at most {expected} keys",
        "minProperties": f"must have at least {expected} keys",
        "pattern": "has an invalid format",
    }
    description = descriptions.get(str(rule), f"breaks the schema rule {rule}")
    return [FieldViolation(field, description)], 0


def _string_path(error: ValidationError) -> str:
    return field_path("arguments", error.absolute_path)


def _mentions_integer(schema: Any) -> bool:
    if isinstance(schema, dict):
        kind = schema.get("type")
        if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
            return True
        return any(_mentions_integer(value) for value in schema.values())
    if isinstance(schema, list):
        return any(_mentions_integer(value) for value in schema)
    return False


class ArgumentValidator:
    """A validator for one tool's input schema (JSON Schema draft 2020-12), compiled once.

    The schema itself is checked here, so a malformed one stops the tool's registration
    rather than a call.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        Draft202012Validator.check_schema(schema)
        self._schema = schema
        self._validator = Draft202012Validator(schema)
        # Struct carries every number as a double; without integers in the schema there is
        # nothing to restore.
        self._has_integers = _mentions_integer(schema)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Return arguments with ints restored, or raise InvalidArgument with the first
        MAX_VIOLATIONS violations (sorted by field) and a count of the rest."""
        restored: dict[str, Any] = (
            restore_integers(arguments, self._schema) if self._has_integers else arguments
        )
        # jsonschema finds errors lazily: stop at one more than can be shown. Every error
        # costs tens of microseconds, and a list of thousands of bad items has one per item.
        found = itertools.islice(self._validator.iter_errors(restored), MAX_VIOLATIONS + 1)
        errors = sorted(found, key=_string_path)
        if not errors:
            return restored
        cut = len(errors) > MAX_VIOLATIONS
        violations: list[FieldViolation] = []
        more = 1 if cut else 0
        for error in errors[:MAX_VIOLATIONS]:
            shown, hidden = _describe(error, MAX_VIOLATIONS - len(violations))
            violations.extend(shown)
            more += hidden
        raise InvalidArgument(
            "arguments do not match the tool's input schema",
            violations,
            more=more,
            more_is_exact=not cut,
        )


def restore_integers(value: Any, schema: dict[str, Any]) -> Any:
    """Struct carries every number as a double: give back ints where the schema says integer.
    Only paths the schema describes are followed, so the recursion is as deep as the schema,
    whatever the caller nests."""
    if not schema:
        return value
    kind = schema.get("type")
    kinds = {kind} if isinstance(kind, str) else set(kind or ())
    if isinstance(value, float) and "integer" in kinds and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        fallback = extra if isinstance(extra, dict) else {}
        return {k: restore_integers(v, properties.get(k, fallback)) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items")
        item_schema = items if isinstance(items, dict) else {}
        return [restore_integers(v, item_schema) for v in value]
    return value


def check_bounds(arguments: dict[str, Any]) -> None:
    """InvalidArgument naming the field when `arguments` hold more than MAX_ARGUMENT_VALUES
    values or a name longer than MAX_KEY_CHARS. A walk with its own stack, so depth is free, and
    it stops where the count runs out, so a huge container costs nothing but the check."""
    left = MAX_ARGUMENT_VALUES
    # (value, path): path is (key, parent path), built into a field name only on refusal.
    stack: list[tuple[Any, Any]] = [(arguments, None)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            left -= len(value)
            if left >= 0:
                for key, item in value.items():
                    if len(key) > MAX_KEY_CHARS:
                        raise _too_large(
                            (key, path),
                            f"an argument name is longer than {MAX_KEY_CHARS} characters",
                            f"is a name longer than {MAX_KEY_CHARS} characters",
                        )
                    stack.append((item, (key, path)))
        elif isinstance(value, list):
            left -= len(value)
            if left >= 0:
                stack.extend((item, (index, path)) for index, item in enumerate(value))
        if left < 0:
            raise _too_large(
                path,
                f"the arguments hold more than {MAX_ARGUMENT_VALUES} values",
                f"holds more values than the {MAX_ARGUMENT_VALUES} allowed in all",
            )


def _too_large(path: Any, message: str, description: str) -> InvalidArgument:
    parts: list[str | int] = []
    while path is not None:
        part, path = path
        parts.append(part)
    field = field_path("arguments", reversed(parts))
    return InvalidArgument(message, [FieldViolation(field, description)])
