"""What a tool is: a definition the catalog publishes and an async handler the service calls.

Tools return plain data and raise `ToolFailure` for failures the caller should see as a tool
result with `is_error`; they never import grpc.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from server.identity import Principal

JsonObject = dict[str, Any]


class ToolErrorCode(StrEnum):
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    INVALID_MODEL_OUTPUT = "INVALID_MODEL_OUTPUT"


class ToolFailure(Exception):
    """The tool ran but could not produce a result; becomes `is_error = true`, not a status."""

    def __init__(
        self,
        code: ToolErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        trace_id: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.trace_id = trace_id


@dataclass(frozen=True)
class ToolAnnotations:
    """MCP behaviour hints; None means unknown."""

    read_only_hint: bool | None = None
    destructive_hint: bool | None = None
    idempotent_hint: bool | None = None
    open_world_hint: bool | None = None


@dataclass(frozen=True)
class ToolDefinition:
    name: str
    title: str
    description: str
    input_schema: JsonObject
    output_schema: JsonObject
    permission: str
    annotations: ToolAnnotations = field(default_factory=ToolAnnotations)


@dataclass(frozen=True)
class CallContext:
    """Per-call facts a tool may need; `deadline` is a time.monotonic() instant or None."""

    principal: Principal
    request_id: str = ""
    deadline: float | None = None
    traceparent: str | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True)
class ToolOutput:
    """A successful result: the summary text shown to people and the structured object."""

    text: str
    structured: JsonObject
    trace_id: str = ""


@dataclass(frozen=True)
class ToolErrorInfo:
    code: ToolErrorCode
    message: str
    retryable: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class ToolResult:
    """What the service returns for a call that ran, successful or not."""

    text: str
    structured: JsonObject | None
    is_error: bool
    trace_id: str
    error: ToolErrorInfo | None = None

    @classmethod
    def success(cls, output: ToolOutput) -> ToolResult:
        return cls(output.text, output.structured, False, output.trace_id)

    @classmethod
    def failure(cls, failure: ToolFailure) -> ToolResult:
        info = ToolErrorInfo(failure.code, failure.message, failure.retryable, failure.retry_after)
        return cls(failure.message, None, True, failure.trace_id, info)


class Tool(Protocol):
    @property
    def definition(self) -> ToolDefinition: ...

    async def call(self, arguments: JsonObject, context: CallContext) -> ToolOutput:
        """Run with arguments already validated against `definition.input_schema`."""
        ...
