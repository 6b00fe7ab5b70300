"""DTOs to protobuf messages and back; nothing else here knows the wire format."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from aiservices.v1 import tool_service_pb2 as pb
from aiservices_server.core.arguments import MAX_ARGUMENT_VALUES, field_path
from aiservices_server.errors import FieldViolation, InvalidArgument
from aiservices_server.tools.base import ToolDefinition, ToolFailure, ToolResult


def struct_from(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


class _TooLarge(Exception):
    """Raised where a bound was broken; each enclosing container adds its key on the way up."""

    def __init__(self, message: str, description: str) -> None:
        super().__init__(message)
        self.message = message
        self.description = description
        self.path: list[str | int] = []


class _Budget:
    __slots__ = ("left", "values")

    def __init__(self, values: int) -> None:
        self.values = self.left = values

    def spend(self, values: int) -> None:
        """Charged for a container before its items are converted, so a huge one costs
        nothing but this check."""
        self.left -= values
        if self.left < 0:
            raise _TooLarge(
                f"the arguments hold more than {self.values} values",
                f"holds more values than the {self.values} allowed in all",
            )


def _python_value(value: struct_pb2.Value, budget: _Budget) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _dict(value.struct_value, budget)
    if kind == "list_value":
        items = value.list_value.values
        budget.spend(len(items))
        converted = []
        for index, item in enumerate(items):
            try:
                converted.append(_python_value(item, budget))
            except _TooLarge as exc:
                exc.path.append(index)
                raise
        return converted
    return None


def _dict(struct: struct_pb2.Struct, budget: _Budget) -> dict[str, Any]:
    fields = struct.fields
    budget.spend(len(fields))
    converted = {}
    for key, value in fields.items():
        try:
            converted[key] = _python_value(value, budget)
        except _TooLarge as exc:
            exc.path.append(key)
            raise
    return converted


def dict_from(struct: struct_pb2.Struct, max_values: int = MAX_ARGUMENT_VALUES) -> dict[str, Any]:
    """Plain Python from a Struct (numbers stay floats; the schema check restores ints).

    InvalidArgument naming the field when the Struct holds more than `max_values` values (the
    object or list where the count ran out), so a huge Struct is never converted; the core's
    `check_bounds` checks the rest for every face. Direct, rather than
    json_format.MessageToDict: it runs on every CallTool."""
    try:
        return _dict(struct, _Budget(max_values))
    except _TooLarge as exc:
        field = field_path("arguments", reversed(exc.path))
        raise InvalidArgument(exc.message, [FieldViolation(field, exc.description)]) from None


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


def result_response(result: ToolResult, request_id: str) -> pb.CallToolResponse:
    response = pb.CallToolResponse(is_error=False)
    response.content.add().text.text = result.text
    response.meta.trace_id = result.trace_id
    response.meta.request_id = request_id
    response.structured_content.update(result.structured)
    return response


def failure_response(failure: ToolFailure, request_id: str) -> pb.CallToolResponse:
    response = pb.CallToolResponse(is_error=True)
    response.content.add().text.text = failure.message
    response.meta.trace_id = failure.trace_id
    response.meta.request_id = request_id
    error = response.error
    error.code = pb.ToolErrorCode.Value("TOOL_ERROR_CODE_" + failure.code.value)
    error.message = failure.message
    error.retryable = failure.retryable
    if failure.retry_after is not None:
        error.retry_after.FromNanoseconds(int(failure.retry_after * 1e9))
    return response
