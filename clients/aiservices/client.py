"""A thin, typed client for aiservices.v1.ToolService.

The generated stubs speak protobuf; callers want plain Python. This module turns Structs into
dicts (and back), responses into frozen dataclasses, and failed calls into one exception type
that already holds the google.rpc details, so callers never parse trailing metadata themselves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, cast

import grpc
import grpc.aio
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from aiservices.v1.tool_service_pb2_grpc import ToolServiceAsyncStub

__all__ = [
    "AsyncToolClient",
    "ContentItem",
    "Status",
    "TextContent",
    "ToolAnnotations",
    "ToolClient",
    "ToolErrorInfo",
    "ToolInfo",
    "ToolPage",
    "ToolResult",
    "ToolServiceError",
    "UnknownContent",
    "dict_to_struct",
    "struct_to_dict",
]

# A 100,000-character template can be 400 KB of UTF-8 before JSON escaping; gRPC's 4 MiB
# default receive limit leaves too little room for a refined template plus structure.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# A server that keeps handing out cursors would otherwise make list_tools spin forever.
MAX_PAGES = 1000
# Doubles hold every integer up to 2**53 exactly; past that an "integer" is already rounded.
_MAX_SAFE_INT = 2**53
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_CODE_PREFIX = "TOOL_ERROR_CODE_"


# --------------------------------------------------------------------------------------------
# Struct <-> plain Python


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """Turn a Struct into plain Python; integral numbers come back as ints.

    Struct stores every number as a double, so `3` arrives as `3.0`; callers and JSON Schemas
    expect `3`. Values beyond 2**53 stay floats because they were never exact.
    """
    return {key: _from_value(value) for key, value in struct.fields.items()}


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


def _tool_info(tool: pb.Tool) -> ToolInfo:
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


def _tool_result(response: pb.CallToolResponse) -> ToolResult:
    error: ToolErrorInfo | None = None
    if response.HasField("error"):
        err = response.error
        error = ToolErrorInfo(
            code=_error_code_name(err.code),
            message=err.message,
            retryable=err.retryable,
            retry_after=err.retry_after.ToTimedelta().total_seconds()
            if err.HasField("retry_after")
            else None,
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


# --------------------------------------------------------------------------------------------
# Errors


class ToolServiceError(Exception):
    """A call that failed with a non-OK gRPC status, with the service's rich details unpacked.

    `reason`/`domain`/`error_metadata` come from google.rpc.ErrorInfo (None/empty when the
    status has none, e.g. a deadline that passed on the client), `field_violations` from
    google.rpc.BadRequest, `retry_after` (seconds) from google.rpc.RetryInfo or else the
    `retry-after` trailer. The original grpc.RpcError is `__cause__`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        error_metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        retry_after: float | None = None,
        trailing_metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.error_metadata: dict[str, str] = dict(error_metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after
        self.trailing_metadata: dict[str, str] = dict(trailing_metadata or {})
        super().__init__(code, message)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text


def _metadata_dict(pairs: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """Text trailers only; binary (-bin) ones are decoded into the error's fields instead."""
    result: dict[str, str] = {}
    for key, value in pairs or ():
        if isinstance(value, bytes):
            continue
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


def _parse_retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None  # an HTTP date, or junk: not worth guessing
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _build_error(
    code: grpc.StatusCode,
    details: str,
    trailers: Iterable[tuple[str, str | bytes]] | None,
    rich: status_pb2.Status | None,
) -> ToolServiceError:
    text_trailers = _metadata_dict(trailers)
    reason: str | None = None
    domain: str | None = None
    error_metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    for detail in rich.details if rich is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, error_metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
    if retry_after is None:
        retry_after = _parse_retry_after(text_trailers.get("retry-after"))
    return ToolServiceError(
        code,
        details,
        reason=reason,
        domain=domain,
        error_metadata=error_metadata,
        field_violations=violations,
        retry_after=retry_after,
        trailing_metadata=text_trailers,
    )


def _code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code() if callable(getattr(err, "code", None)) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _sync_error(err: grpc.RpcError) -> ToolServiceError:
    rich: status_pb2.Status | None = None
    trailers = None
    if isinstance(err, grpc.Call):
        trailers = err.trailing_metadata()
        try:
            rich = rpc_status.from_call(err)
        except (ValueError, DecodeError):
            rich = None  # details that contradict the status are not to be trusted
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return _build_error(_code_of(err), details or "", trailers, rich)


def _aio_error(err: grpc.aio.AioRpcError) -> ToolServiceError:
    code = _code_of(err)
    details = err.details() or ""
    trailers = err.trailing_metadata()
    rich: status_pb2.Status | None = None
    for key, value in trailers or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                rich = status_pb2.Status.FromString(value)
            except DecodeError:
                rich = None
            # The rule of grpc_status.from_call, so both clients trust the same details.
            if rich is not None and (rich.code != code.value[0] or rich.message != details):
                rich = None
            break
    return _build_error(code, details, trailers, rich)


# --------------------------------------------------------------------------------------------
# Clients


class _ClientBase:
    """Channel settings and per-call metadata/deadline shared by both clients."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty; pass None to call without credentials")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self._target = target
        self._timeout = float(timeout)
        self._credentials = credentials
        base: list[tuple[str, str]] = []
        if api_key is not None:
            base.append(("authorization", f"Bearer {api_key.strip()}"))
        base.extend(_lower_keys(metadata))
        self._metadata: tuple[tuple[str, str], ...] = tuple(base)
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": DEFAULT_MAX_MESSAGE_BYTES,
            "grpc.max_receive_message_length": DEFAULT_MAX_MESSAGE_BYTES,
        }
        merged.update(options)
        self._options: list[tuple[str, Any]] = list(merged.items())
        self._closed = False

    def _call_kwargs(
        self, timeout: float | None, metadata: Sequence[tuple[str, str]]
    ) -> dict[str, Any]:
        """Per-call metadata replaces client metadata with the same key instead of doubling it."""
        extra = _lower_keys(metadata)
        replaced = {key for key, _ in extra}
        merged = [(k, v) for k, v in self._metadata if k not in replaced] + extra
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": merged}

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")


def _lower_keys(metadata: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    # gRPC refuses upper-case keys; header names are case-insensitive anyway.
    return [(key.lower(), value) for key, value in metadata]


def _page_request(cursor: str, page_size: int) -> pb.ListToolsRequest:
    return pb.ListToolsRequest(cursor=cursor, page_size=page_size)


def _page(response: pb.ListToolsResponse) -> ToolPage:
    return ToolPage(tools=[_tool_info(t) for t in response.tools], next_cursor=response.next_cursor)


def _check_cursor(cursor: str, seen: set[str], pages: int) -> None:
    if cursor in seen:
        raise ToolServiceError(
            grpc.StatusCode.INTERNAL, f"ListTools returned cursor {cursor!r} twice; stopping"
        )
    if pages >= MAX_PAGES:
        raise ToolServiceError(
            grpc.StatusCode.INTERNAL, f"ListTools still had more pages after {MAX_PAGES}; stopping"
        )
    seen.add(cursor)


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


class ToolClient(_ClientBase):
    """Blocking client; safe to share between threads. Use as a context manager or close()."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            credentials=credentials,
            metadata=metadata,
            options=options,
        )
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=self._options)
        self._stub = pb_grpc.ToolServiceStub(self._channel)

    def status(
        self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
    ) -> Status:
        """Whether the feature is enabled, and which tools this caller may call."""
        response: pb.GetStatusResponse = self._invoke(
            self._stub.GetStatus, pb.GetStatusRequest(), timeout, metadata
        )
        return Status(
            enabled=response.enabled,
            tools=[_tool_info(t) for t in response.tools],
            upstream=response.upstream,
        )

    def list_tools_page(
        self,
        cursor: str = "",
        page_size: int = 0,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ToolPage:
        """One page of tools; pass the previous page's `next_cursor` to get the next."""
        response: pb.ListToolsResponse = self._invoke(
            self._stub.ListTools, _page_request(cursor, page_size), timeout, metadata
        )
        return _page(response)

    def list_tools(
        self,
        page_size: int = 0,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[ToolInfo]:
        """Every tool, following cursors; `timeout` bounds the whole listing, not each page."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        tools: list[ToolInfo] = []
        seen: set[str] = set()
        cursor = ""
        for pages in range(MAX_PAGES + 1):
            _check_cursor(cursor, seen, pages)
            page = self.list_tools_page(
                cursor, page_size, timeout=_remaining(deadline), metadata=metadata
            )
            tools.extend(page.tools)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return tools

    def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ToolResult:
        """Run a tool. A tool failure is a result with `is_error`; a refusal raises."""
        request = pb.CallToolRequest(name=name, arguments=dict_to_struct(arguments))
        response: pb.CallToolResponse = self._invoke(
            self._stub.CallTool, request, timeout, metadata
        )
        return _tool_result(response)

    def close(self) -> None:
        """Close the channel; calls after this raise RuntimeError."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _invoke(
        self,
        method: Any,
        request: Any,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> Any:
        self._check_open()
        try:
            return method(request, **self._call_kwargs(timeout, metadata))
        except grpc.RpcError as err:
            raise _sync_error(err) from err


class AsyncToolClient(_ClientBase):
    """asyncio client over grpc.aio. The channel opens on first use, so the client may be
    built outside a running event loop; use `async with` or `await close()`."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            credentials=credentials,
            metadata=metadata,
            options=options,
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: ToolServiceAsyncStub | None = None

    async def status(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (becomes the gRPC deadline)
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Status:
        """Whether the feature is enabled, and which tools this caller may call."""
        response: pb.GetStatusResponse = await self._invoke(
            "GetStatus", pb.GetStatusRequest(), timeout, metadata
        )
        return Status(
            enabled=response.enabled,
            tools=[_tool_info(t) for t in response.tools],
            upstream=response.upstream,
        )

    async def list_tools_page(
        self,
        cursor: str = "",
        page_size: int = 0,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (becomes the gRPC deadline)
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ToolPage:
        """One page of tools; pass the previous page's `next_cursor` to get the next."""
        response: pb.ListToolsResponse = await self._invoke(
            "ListTools", _page_request(cursor, page_size), timeout, metadata
        )
        return _page(response)

    async def list_tools(
        self,
        page_size: int = 0,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (becomes the gRPC deadline)
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[ToolInfo]:
        """Every tool, following cursors; `timeout` bounds the whole listing, not each page."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        tools: list[ToolInfo] = []
        seen: set[str] = set()
        cursor = ""
        for pages in range(MAX_PAGES + 1):
            _check_cursor(cursor, seen, pages)
            page = await self.list_tools_page(
                cursor, page_size, timeout=_remaining(deadline), metadata=metadata
            )
            tools.extend(page.tools)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return tools

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (becomes the gRPC deadline)
        metadata: Sequence[tuple[str, str]] = (),
    ) -> ToolResult:
        """Run a tool. A tool failure is a result with `is_error`; a refusal raises."""
        request = pb.CallToolRequest(name=name, arguments=dict_to_struct(arguments))
        response: pb.CallToolResponse = await self._invoke("CallTool", request, timeout, metadata)
        return _tool_result(response)

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight; calls after this raise RuntimeError."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_stub(self) -> ToolServiceAsyncStub:
        self._check_open()
        if self._stub is not None:
            return self._stub
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self._target, options=self._options)
        else:
            channel = grpc.aio.secure_channel(
                self._target, self._credentials, options=self._options
            )
        stub = cast("ToolServiceAsyncStub", pb_grpc.ToolServiceStub(channel))
        self._channel, self._stub = channel, stub
        return stub

    async def _invoke(
        self,
        method: str,
        request: Any,
        timeout: float | None,  # noqa: ASYNC109
        metadata: Sequence[tuple[str, str]],
    ) -> Any:
        callable_ = getattr(self._get_stub(), method)
        try:
            return await callable_(request, **self._call_kwargs(timeout, metadata))
        except grpc.aio.AioRpcError as err:
            raise _aio_error(err) from err
        except grpc.RpcError as err:  # not expected from grpc.aio, but never leak raw errors
            raise _sync_error(err) from err
