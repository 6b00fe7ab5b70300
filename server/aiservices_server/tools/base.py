"""What a tool is: a definition the catalogue publishes and an async handler the core calls.

A tool returns a `ToolResult` or raises `ToolFailure` (the tool ran but could not produce a
result: the caller gets a result with `is_error`, not a refusal). It may also raise a domain
error (`aiservices_server.errors`) for input only it can judge. Tools never import a transport.

`Tool`, `ToolDefinition`, `ToolAnnotations`, `ToolResult`, `ToolFailure` and `ToolErrorCode`
are a stable interface: tool packages (docs/tools.md, "Tools as packages") are written against
them. Fields are only ever added, with defaults, and none changes what it means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, Self

from aiservices_server.call import Call
from aiservices_server.upstream.refiner import UpstreamAttempt

JsonObject = dict[str, Any]


class ToolErrorCode(StrEnum):
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    UPSTREAM_TIMEOUT = "UPSTREAM_TIMEOUT"
    UPSTREAM_ERROR = "UPSTREAM_ERROR"
    INVALID_MODEL_OUTPUT = "INVALID_MODEL_OUTPUT"


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A successful call: the summary text shown to people and the structured object (which
    fits the tool's output schema: the tool's promise, not checked by the core).

    `trace_id` goes into the result's meta. `upstream` is the last upstream attempt, for the
    access log. `headers` are sent with the result (the core adds the rate limit left)."""

    text: str
    structured: JsonObject
    trace_id: str = ""
    upstream: UpstreamAttempt | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class ToolFailure(Exception):
    """The tool ran but could not produce a result: a result with `is_error`, not a refusal.

    `retry_after` (seconds) is the upstream's advice, when it gave one; `upstream` and `headers`
    as in ToolResult. A failure is never changed once made: a layer that adds to one it caught
    raises `with_upstream(...)` or `with_headers(...)`, the same failure built anew."""

    def __init__(
        self,
        code: ToolErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        trace_id: str = "",
        upstream: UpstreamAttempt | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.trace_id = trace_id
        self.upstream = upstream
        self.headers: Mapping[str, str] = dict(headers or {})

    def with_upstream(self, upstream: UpstreamAttempt | None) -> Self:
        """This failure, built anew through its constructor, carrying `upstream`."""
        return self._rebuild(upstream, self.headers)

    def with_headers(self, headers: Mapping[str, str]) -> Self:
        """This failure, built anew through its constructor, with `headers` added to its own
        (replacing any of the same name)."""
        return self._rebuild(self.upstream, {**self.headers, **headers})

    def _rebuild(self, upstream: UpstreamAttempt | None, headers: Mapping[str, str]) -> Self:
        return type(self)(
            self.code,
            self.message,
            retryable=self.retryable,
            retry_after=self.retry_after,
            trace_id=self.trace_id,
            upstream=upstream,
            headers=headers,
        )


@dataclass(frozen=True)
class ToolAnnotations:
    """MCP behaviour hints; None means unknown."""

    read_only_hint: bool | None = None
    destructive_hint: bool | None = None
    idempotent_hint: bool | None = None
    open_world_hint: bool | None = None


@dataclass(frozen=True)
class ToolDefinition:
    """What callers see of a tool, and what the core checks a call against.

    `name` follows the naming rule (lowercase dot-separated parts, like
    tools.agenta.api.refine_prompt); `input_schema` and `output_schema` are JSON Schema draft
    2020-12 objects of `type: object` (arguments are validated against the first before `call`
    runs); `permission` is what a key needs to see and call the tool."""

    name: str
    title: str
    description: str
    input_schema: JsonObject
    output_schema: JsonObject
    permission: str
    annotations: ToolAnnotations = field(default_factory=ToolAnnotations)


class Tool(Protocol):
    """A tool the core serves: its definition (read whenever tools are listed, so it must not
    change) and the call that runs it."""

    @property
    def definition(self) -> ToolDefinition: ...

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        """Run with arguments already validated against `definition.input_schema`, on the
        server's event loop (never block it), within `call.time_left()`; cancelled when the
        caller's deadline passes or the caller goes away. Returns a ToolResult or raises
        ToolFailure (or a domain error for input only the tool can judge); anything else is
        INTERNAL to the caller."""
        ...
