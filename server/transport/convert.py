"""DTOs to protobuf messages and back; nothing else here knows the wire format."""

from __future__ import annotations

from typing import Any

from aiservices.v1 import tool_service_pb2 as pb
from google.protobuf import struct_pb2

from server.tools.base import ToolDefinition, ToolResult


def struct_from(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _python_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return dict_from(value.struct_value)
    if kind == "list_value":
        return [_python_value(item) for item in value.list_value.values]
    return None


def dict_from(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Plain Python from a Struct (numbers stay floats; the schema check restores ints).

    Direct, rather than json_format.MessageToDict: it runs on every CallTool."""
    return {key: _python_value(value) for key, value in struct.fields.items()}


def tool_message(definition: ToolDefinition) -> pb.Tool:
    hints = definition.annotations
    annotations = pb.ToolAnnotations()
    for name in ("read_only_hint", "destructive_hint", "idempotent_hint", "open_world_hint"):
        value = getattr(hints, name)
        if value is not None:
            setattr(annotations, name, value)
    return pb.Tool(
        name=definition.name,
        title=definition.title,
        description=definition.description,
        input_schema=struct_from(definition.input_schema),
        output_schema=struct_from(definition.output_schema),
        annotations=annotations,
    )


def call_response(result: ToolResult, request_id: str) -> pb.CallToolResponse:
    # Filled in place: constructor keywords with nested messages cost about 2.5 times as much
    # on every CallTool (each nested message is built, then copied in).
    response = pb.CallToolResponse(is_error=result.is_error)
    response.content.add().text.text = result.text
    meta = response.meta
    meta.trace_id = result.trace_id
    meta.request_id = request_id
    if result.structured is not None:
        response.structured_content.update(result.structured)
    if result.error is not None:
        error = response.error
        error.code = pb.ToolErrorCode.Value("TOOL_ERROR_CODE_" + result.error.code.value)
        error.message = result.error.message
        error.retryable = result.error.retryable
        if result.error.retry_after is not None:
            error.retry_after.FromNanoseconds(int(result.error.retry_after * 1e9))
    return response
