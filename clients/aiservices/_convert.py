"""Protobuf to plain Python and back: Structs as dicts, responses as frozen dataclasses.

Pure functions, no I/O: both clients convert through this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, struct_pb2

from aiservices.v1 import tool_service_pb2 as pb

# Doubles hold every integer up to 2**53 exactly; past that an "integer" is already rounded.
_MAX_SAFE_INT = 2**53
_ERROR_CODE_PREFIX = "TOOL_ERROR_CODE_"
# The longest wait reported; a server asking for more still means "a long time".
MAX_DELAY_SECONDS = 86_400.0


def delay_seconds(seconds: float) -> float | None:
    """`seconds` as a wait a caller can make: at most a day (a longer one, infinity included,
    is cut to a day, which still reads as long), None when negative or not a number. A server's
    retry hint is outside input, and must not stall or crash whoever reads it."""
    return min(seconds, MAX_DELAY_SECONDS) if seconds >= 0 else None  # NaN fails the test


def duration_delay(duration: duration_pb2.Duration) -> float | None:
    """A google.protobuf.Duration as a wait (see `delay_seconds`), read without datetime,
    which overflows on durations protobuf allows."""
    return delay_seconds(duration.seconds + duration.nanos / 1e9)


# --------------------------------------------------------------------------------------------
# Struct <-> plain Python


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Turn a Struct into plain Python; integral numbers come back as ints.

    Struct stores every number as a double, so `3` arrives as `3.0`; callers and JSON Schemas
    expect `3`. Values beyond 2**53 stay floats because they were never exact. Keys come in
    sorted order: a Struct is a map, whose order would otherwise change from one process to the
    next, and the same result should read the same every time.
    """
    fields = struct.fields
    return {key: _from_value(fields[key]) for key in sorted(fields)}


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= _MAX_SAFE_INT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_from_value(item) for item in value.list_value.values]
    return None  # null_value, or no kind at all


def dict_to_struct(mapping: Mapping[str, Any]) -> struct_pb2.Struct:
    """Build a Struct from JSON-like Python, refusing anything JSON cannot carry.

    Raises TypeError for values that are not JSON (bytes, sets, objects, non-str keys) and
    ValueError for NaN/infinity, integers a double cannot hold exactly, and circular
    references: Struct would otherwise corrupt them silently.
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(f"arguments must be a mapping, not {type(mapping).__name__}")
    struct = struct_pb2.Struct()
    _fill_struct(struct, mapping, "$", set())
    return struct


def _fill_struct(
    struct: struct_pb2.Struct, mapping: Mapping[Any, Any], path: str, seen: set[int]
) -> None:
    _enter(mapping, path, seen)
    for key, item in mapping.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: key {key!r} is {type(key).__name__}, JSON keys must be str")
        _fill_value(struct.fields[key], item, f"{path}.{key}", seen)
    seen.discard(id(mapping))


def _fill_value(target: struct_pb2.Value, item: Any, path: str, seen: set[int]) -> None:
    if item is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):  # before int: bool is an int subclass
        target.bool_value = item
    elif isinstance(item, int):
        if abs(item) > _MAX_SAFE_INT:
            raise ValueError(f"{path}: integer {item} is too large to send exactly (max 2**53)")
        target.number_value = item
    elif isinstance(item, float):
        if not math.isfinite(item):
            raise ValueError(f"{path}: {item} is not a JSON number")
        target.number_value = item
    elif isinstance(item, str):
        target.string_value = item
    elif isinstance(item, Mapping):
        target.struct_value.SetInParent()  # so an empty dict stays a dict, not null
        _fill_struct(target.struct_value, item, path, seen)
    elif isinstance(item, list | tuple):
        target.list_value.SetInParent()
        _enter(item, path, seen)
        for index, element in enumerate(item):
            _fill_value(target.list_value.values.add(), element, f"{path}[{index}]", seen)
        seen.discard(id(item))
    else:
        raise TypeError(f"{path}: {type(item).__name__} is not a JSON value")


# Protobuf refuses to decode messages nested deeper than 100; each level of a Struct is up to
# three messages (Struct, map entry, Value).
MAX_NESTING = 32


def _enter(container: object, path: str, seen: set[int]) -> None:
    # `seen` holds the containers on the current path, so its size is the depth.
    if id(container) in seen:
        raise ValueError(f"{path}: circular reference")
    if len(seen) >= MAX_NESTING:
        raise ValueError(f"{path}: nested deeper than {MAX_NESTING} levels")
    seen.add(id(container))


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TextContent:
    """A block of plain text."""

    text: str


@dataclass(frozen=True)
class UnknownContent:
    """A content kind this client does not know yet; kept so newer servers do not break us.

    `kind` is the oneof field name when known, else "unknown"; `raw` is the serialized
    ContentBlock for callers with newer stubs.
    """

    kind: str
    raw: bytes = field(default=b"", repr=False)


ContentItem: TypeAlias = TextContent | UnknownContent


@dataclass(frozen=True)
class ToolAnnotations:
    """MCP behaviour hints; None means the server did not say (unknown), not False."""

    read_only_hint: bool | None = None
    destructive_hint: bool | None = None
    idempotent_hint: bool | None = None
    open_world_hint: bool | None = None


@dataclass(frozen=True)
class ToolInfo:
    """One callable tool, as ListTools and GetStatus describe it."""

    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    annotations: ToolAnnotations


@dataclass(frozen=True)
class Status:
    """Whether the feature is on, the tools this caller may call, and which upstream refines
    prompts ("agenta" or "openai"; empty when the feature is off)."""

    enabled: bool
    tools: list[ToolInfo]
    upstream: str = ""


@dataclass(frozen=True)
class ToolPage:
    """One page of ListTools; `next_cursor` is empty on the last page."""

    tools: list[ToolInfo]
    next_cursor: str


@dataclass(frozen=True)
class ToolErrorInfo:
    """Why a tool ran but failed. `code` is e.g. "UPSTREAM_TIMEOUT"; `retry_after` is seconds."""

    code: str
    message: str
    retryable: bool
    retry_after: float | None


@dataclass(frozen=True)
class ToolResult:
    """An MCP-shaped tool result; check `is_error` (and `error`) before using the content."""

    content: list[ContentItem]
    structured_content: dict[str, Any] | None
    is_error: bool
    trace_id: str
    request_id: str
    error: ToolErrorInfo | None

    @property
    def text(self) -> str:
        """The text blocks joined by newlines: the summary, or the error message."""
        return "\n".join(item.text for item in self.content if isinstance(item, TextContent))


def tool_info(tool: pb.Tool) -> ToolInfo:
    hints = tool.annotations
    return ToolInfo(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        input_schema=struct_to_dict(tool.input_schema),
        output_schema=struct_to_dict(tool.output_schema),
        annotations=ToolAnnotations(
            read_only_hint=hints.read_only_hint if hints.HasField("read_only_hint") else None,
            destructive_hint=hints.destructive_hint if hints.HasField("destructive_hint") else None,
            idempotent_hint=hints.idempotent_hint if hints.HasField("idempotent_hint") else None,
            open_world_hint=hints.open_world_hint if hints.HasField("open_world_hint") else None,
        ),
    )


def _content_item(block: pb.ContentBlock) -> ContentItem:
    kind = block.WhichOneof("block")
    if kind == "text":
        return TextContent(text=block.text.text)
    return UnknownContent(kind=kind or "unknown", raw=block.SerializeToString())


def _error_code_name(code: pb.ToolErrorCode.ValueType) -> str:
    try:
        name = pb.ToolErrorCode.Name(code)
    except ValueError:  # a code added after this client was built
        return f"UNKNOWN_{code}"
    return name.removeprefix(_ERROR_CODE_PREFIX)


def tool_result(response: pb.CallToolResponse) -> ToolResult:
    error: ToolErrorInfo | None = None
    if response.HasField("error"):
        err = response.error
        error = ToolErrorInfo(
            code=_error_code_name(err.code),
            message=err.message,
            retryable=err.retryable,
            retry_after=duration_delay(err.retry_after) if err.HasField("retry_after") else None,
        )
    return ToolResult(
        content=[_content_item(block) for block in response.content],
        structured_content=struct_to_dict(response.structured_content)
        if response.HasField("structured_content")
        else None,
        is_error=response.is_error,
        trace_id=response.meta.trace_id,
        request_id=response.meta.request_id,
        error=error,
    )


def status_of(response: pb.GetStatusResponse) -> Status:
    return Status(
        enabled=response.enabled,
        tools=[tool_info(t) for t in response.tools],
        upstream=response.upstream,
    )


def page_of(response: pb.ListToolsResponse) -> ToolPage:
    return ToolPage(tools=[tool_info(t) for t in response.tools], next_cursor=response.next_cursor)


# --------------------------------------------------------------------------------------------
# JSON for people and scripts


def as_json(value: object) -> Any:
    """A result (Status, ToolInfo, ToolPage, ToolResult, RefinedPrompt..., or a list of them) as
    JSON-ready Python values, its field names in lowerCamelCase.

    lowerCamelCase is protobuf's JSON mapping: what grpcurl and buf curl print for the same
    response, and how MCP spells the same fields (`structuredContent`, `isError`,
    `inputSchema`, `readOnlyHint`), so one jq filter reads all three. What is data rather than a
    field (structured content, schemas) keeps its keys as they came. A content block is
    `{"type": "text", "text": ...}` as in MCP; durations are numbers of seconds.
    """
    if isinstance(value, TextContent):
        return {"type": "text", "text": value.text}
    if isinstance(value, UnknownContent):
        return {"type": value.kind}
    if is_dataclass(value) and not isinstance(value, type):
        return {
            _camel(item.name): as_json(getattr(value, item.name))
            for item in fields(value)
            if item.repr
        }
    if isinstance(value, list | tuple):
        return [as_json(item) for item in value]
    return value


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)
