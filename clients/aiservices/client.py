"""A typed client for aiservices.v1.ToolService, blocking (`ToolClient`) and asyncio
(`AsyncToolClient`).

Everything that is not I/O lives once, in `_ClientCore`: each public method is a plan, a
generator that yields steps ("call this RPC", "wait this long") and gets back the response or
the error. `ToolClient` runs the steps with blocking calls and a blocking wait, `AsyncToolClient`
with `await`; request building, conversion, pagination, retry decisions, error mapping and
metadata merging are shared.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypedDict, TypeVar, Unpack, cast

import grpc
import grpc.aio
from google.protobuf.message import Message

from aiservices._convert import (
    MAX_NESTING,
    ContentItem,
    Status,
    TextContent,
    ToolAnnotations,
    ToolErrorInfo,
    ToolInfo,
    ToolPage,
    ToolResult,
    UnknownContent,
    dict_to_struct,
    page_of,
    status_of,
    struct_to_dict,
    tool_result,
)
from aiservices.errors import ToolServiceError, error_for, error_from_rpc
from aiservices.refine import REFINE_PROMPT, RefinedPrompt, refine_arguments, refined_prompt
from aiservices.retry import RetryPolicy, delay_after_error, delay_after_result, service_config
from aiservices.settings import read_connection
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from aiservices.v1.tool_service_pb2_grpc import ToolServiceAsyncStub

__all__ = [
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_NESTING",
    "READ_RETRY",
    "AsyncToolClient",
    "CallOptions",
    "ClientOptions",
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

T = TypeVar("T")

# GetStatus and ListTools answer from memory: a few seconds is already a sick server.
DEFAULT_TIMEOUT = 10.0
# Longer than the server's default UPSTREAM_TIMEOUT (60 s), so a slow upstream reaches the
# caller as the UPSTREAM_TIMEOUT tool error (retryable, explained) rather than a bare
# DEADLINE_EXCEEDED from the caller's own gRPC library.
DEFAULT_CALL_TIMEOUT = 75.0
# What status, list_tools and list_tools_page are sent again with when neither the client nor
# the call names a policy: they only read, so an UNAVAILABLE (no server, one restarting or
# draining, one overloaded) is worth another try, after the server's RetryInfo delay if it gave
# one. The call's timeout bounds every attempt and wait together; the attempts are many so that
# the timeout, not the count, is what ends a retried read (a channel that lost its server fails
# each attempt at once until gRPC's own reconnection backoff lets it try the address again).
READ_RETRY = RetryPolicy(max_attempts=20, initial_backoff=0.1, max_backoff=1.0)
# A 100,000-character template can be 400 KB of UTF-8 before JSON escaping; gRPC's 4 MiB
# default receive limit leaves too little room for a refined template plus structure.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The server keeps gRPC's ping enforcement (no pings more often than every 5 minutes, none
# without calls in flight; more earns GOAWAY too_many_pings), so the client pings at that pace,
# only while calls are open, and gives a silent peer 20 s before calling the connection dead.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
)
# A server that keeps handing out cursors would otherwise make list_tools spin forever.
MAX_PAGES = 1000
# What one listing may hold in all, pages counted as received: a tool is a few KB
# (refine_prompt's is 2.6 KB), so these are far past any real catalogue, yet keep a server
# sending big or endless pages from filling the caller's memory (endless 15 MiB pages took 2 GB
# within the default 10 s timeout).
MAX_LISTING_BYTES = 4 * 1024 * 1024
MAX_LISTING_TOOLS = 10_000
# What a gRPC header value may hold: printable ASCII (anything else fails every call).
_HEADER_VALUE = re.compile(r"[ -~]+")
# W3C trace context, as the server checks it before passing it to the upstream.
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)

Metadata = Sequence[tuple[str, str]] | Mapping[str, str]
"""Headers as (name, value) pairs, or as a mapping of name to value."""
ChannelFactory = Callable[[str, list[tuple[str, Any]]], Any]
"""Builds the channel from (target, options); the client closes what it returns."""


class CallOptions(TypedDict, total=False):
    """Keyword arguments every method takes.

    `timeout`: this call's deadline in seconds (list_tools: the whole listing); `metadata`:
    extra headers, replacing client headers of the same name; `retry`: this call's RetryPolicy
    instead of the client's (`NO_RETRY` for none); `wait_for_ready`: queue the call until the
    channel connects instead of failing fast; `traceparent`: a W3C traceparent the server passes
    on to the upstream (ValueError when malformed).
    """

    timeout: float | None
    metadata: Metadata
    retry: RetryPolicy | None
    wait_for_ready: bool | None
    traceparent: str | None


class ClientOptions(TypedDict, total=False):
    """What `from_env` passes on to the client besides what the environment gives (target, key,
    TLS): each means what the constructor's argument of the same name means."""

    timeout: float | None
    call_timeout: float | None
    metadata: Metadata
    options: Sequence[tuple[str, Any]]
    retry: RetryPolicy | None
    wait_for_ready: bool | None
    load_balancing: Literal["round_robin", "pick_first"] | None
    grpc_retry_attempts: int


@dataclass(frozen=True)
class _Call:
    """Step: send `request` to RPC `method` once."""

    method: str
    request: Message
    timeout: float
    metadata: tuple[tuple[str, str], ...]
    wait_for_ready: bool | None


@dataclass(frozen=True)
class _Wait:
    """Step: wait `seconds` before the next attempt."""

    seconds: float


_Step = _Call | _Wait
_Plan = Generator[_Step, Any, T]


@dataclass(frozen=True)
class _Resolved:
    """A call's options with the client's defaults filled in."""

    timeout: float  # each attempt's deadline, in seconds
    overall: float | None  # time.monotonic() by which every attempt and wait ends (retry.deadline)
    metadata: tuple[tuple[str, str], ...]
    retry: RetryPolicy | None
    wait_for_ready: bool | None


class _ClientCore:
    """Settings, channel options and the plans of every method, shared by both clients."""

    def __init__(
        self,
        target: str | None,
        api_key: str | None,
        *,
        timeout: float | None,
        call_timeout: float | None,
        credentials: grpc.ChannelCredentials | None,
        metadata: Metadata,
        options: Sequence[tuple[str, Any]],
        retry: RetryPolicy | None,
        wait_for_ready: bool | None,
        load_balancing: Literal["round_robin", "pick_first"] | None,
        grpc_retry_attempts: int,
        channel: object | None,
        channel_factory: ChannelFactory | None,
    ) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty; pass None to call without credentials")
        if api_key is not None and not _HEADER_VALUE.fullmatch(api_key.strip()):
            raise ValueError("api_key has characters a gRPC header cannot carry (printable ASCII)")
        for name, value in (("timeout", timeout), ("call_timeout", call_timeout)):
            if value is not None:
                _check_seconds(name, value)
        if channel is not None and (channel_factory is not None or credentials is not None):
            raise ValueError("pass a channel, or credentials/channel_factory to build one")
        if channel is None and target is None:
            raise ValueError("a target is needed unless a channel is given")
        if load_balancing not in (None, "round_robin", "pick_first"):
            raise ValueError(
                f"load_balancing must be 'round_robin' or 'pick_first', got {load_balancing!r}"
            )
        if retry is not None and retry.max_attempts > 1 and grpc_retry_attempts > 1:
            raise ValueError("choose one retry layer: retry= or grpc_retry_attempts=, not both")
        self._target = target or ""
        self._timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        # An explicit `timeout` keeps bounding every call, as callers who set it expect.
        given = call_timeout if call_timeout is not None else timeout
        self._call_timeout = DEFAULT_CALL_TIMEOUT if given is None else float(given)
        self._credentials = credentials
        self._retry = retry
        # gRPC's own retries replace the client's default for reads (two layers multiply).
        self._read_retry = READ_RETRY if grpc_retry_attempts <= 1 else None
        self._wait_for_ready = wait_for_ready
        base: list[tuple[str, str]] = []
        if api_key is not None:
            base.append(("authorization", f"Bearer {api_key.strip()}"))
        self._metadata = tuple(_merge(base, metadata))
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": DEFAULT_MAX_MESSAGE_BYTES,
            "grpc.max_receive_message_length": DEFAULT_MAX_MESSAGE_BYTES,
            **dict(KEEPALIVE_OPTIONS),
        }
        if load_balancing is not None or grpc_retry_attempts > 1:
            merged["grpc.service_config"] = service_config(
                load_balancing=load_balancing, retry_attempts=grpc_retry_attempts
            )
        merged.update(options)
        self._options: list[tuple[str, Any]] = list(merged.items())
        self._given_channel = channel
        self._channel_factory = channel_factory
        self._closed = False

    # -- plans: what each method does, as steps ----------------------------------------------

    def _status_plan(self, options: CallOptions) -> _Plan[Status]:
        call = self._resolve(options, self._timeout, read=True)
        response = yield from self._rpc("GetStatus", pb.GetStatusRequest(), call)
        return status_of(response)

    def _page_plan(self, cursor: str, page_size: int, options: CallOptions) -> _Plan[ToolPage]:
        call = self._resolve(options, self._timeout, read=True)
        request = pb.ListToolsRequest(cursor=cursor, page_size=page_size)
        return page_of((yield from self._rpc("ListTools", request, call)))

    def _list_plan(self, page_size: int, options: CallOptions) -> _Plan[list[ToolInfo]]:
        call = self._resolve(options, self._timeout, read=True)
        listing_ends = time.monotonic() + call.timeout
        # Retries of a page (attempts and waits) stay within the listing's timeout too.
        call = replace(call, overall=min(call.overall or listing_ends, listing_ends))
        tools: list[ToolInfo] = []
        seen: set[str] = set()
        cursor = ""
        held = 0
        for pages in range(MAX_PAGES + 1):
            _check_cursor(cursor, seen, pages)
            request = pb.ListToolsRequest(cursor=cursor, page_size=page_size)
            response = yield from self._rpc("ListTools", request, call)
            # Counted before the page is turned into ToolInfo: converted, it takes far more.
            held += response.ByteSize()
            _check_listing(held, len(tools) + len(response.tools), pages + 1)
            page = page_of(response)
            tools.extend(page.tools)
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        return tools

    def _call_plan(
        self, name: str, arguments: Mapping[str, Any], options: CallOptions
    ) -> _Plan[ToolResult]:
        call = self._resolve(options, self._call_timeout)
        request = pb.CallToolRequest(name=name, arguments=dict_to_struct(arguments))
        return tool_result((yield from self._rpc("CallTool", request, call)))

    def _refine_plan(
        self,
        template: Mapping[str, Any] | str,
        guidelines: str | None,
        context: str | None,
        test_cases: Sequence[Mapping[str, Any]] | None,
        options: CallOptions,
    ) -> _Plan[RefinedPrompt]:
        arguments = refine_arguments(
            template, guidelines=guidelines, context=context, test_cases=test_cases
        )
        return refined_prompt((yield from self._call_plan(REFINE_PROMPT, arguments, options)))

    def _rpc(self, method: str, request: Message, call: _Resolved) -> _Plan[Any]:
        """One RPC, sent again as `call.retry` allows. An attempt gets its timeout or what is
        left of the overall deadline, whichever is shorter; a wait is made only if it ends
        before that deadline."""
        policy = call.retry
        attempt, previous = 1, 0.0
        while True:
            timeout = call.timeout
            if call.overall is not None:
                timeout = max(min(timeout, call.overall - time.monotonic()), 0.0)
            try:
                response = yield _Call(method, request, timeout, call.metadata, call.wait_for_ready)
            except ToolServiceError as error:
                delay = None
                if policy is not None:
                    delay = delay_after_error(policy, error, attempt, previous, _left(call))
                if delay is None:
                    raise
            else:
                if policy is None or method != "CallTool":
                    return response
                delay = delay_after_result(policy, response, attempt, previous, _left(call))
                if delay is None:
                    return response
            yield _Wait(delay)
            attempt, previous = attempt + 1, delay

    def _resolve(
        self, options: CallOptions, default_timeout: float, *, read: bool = False
    ) -> _Resolved:
        """The call's settings: its own, else the client's, else the defaults. A read with no
        policy from the call or the client gets READ_RETRY, bounded as a whole by its timeout;
        a tool call with none is sent once."""
        unknown = sorted(options.keys() - CallOptions.__optional_keys__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        now = time.monotonic()
        timeout = options.get("timeout")
        if timeout is not None:
            _check_seconds("timeout", timeout)
        timeout = default_timeout if timeout is None else timeout
        retry = options.get("retry")
        retry = self._retry if retry is None else retry
        overall = None if retry is None or retry.deadline is None else now + retry.deadline
        if retry is None and read and self._read_retry is not None:
            retry, overall = self._read_retry, now + timeout
        extra = _pairs(options.get("metadata", ()))
        traceparent = options.get("traceparent")
        if traceparent is not None:
            if not _TRACEPARENT.fullmatch(traceparent):
                raise ValueError(
                    "traceparent is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)"
                )
            # The argument wins over a `traceparent` in `metadata`: one header, not two.
            extra = [(k, v) for k, v in extra if k.lower() != "traceparent"]
            extra.append(("traceparent", traceparent))
        wait_for_ready = options.get("wait_for_ready")
        return _Resolved(
            timeout=timeout,
            overall=overall,
            metadata=tuple(_merge(self._metadata, extra)),
            retry=retry,
            wait_for_ready=self._wait_for_ready if wait_for_ready is None else wait_for_ready,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")


def _check_seconds(name: str, value: float) -> None:
    """A deadline must be a finite number of seconds above 0: gRPC turns 0, negative, infinite
    and NaN timeouts into a failed call without saying why."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _closed_during_call() -> ToolServiceError:
    """What a call in flight (an attempt or a wait before the next) ends with on close()."""
    return error_for(grpc.StatusCode.CANCELLED, "the client was closed during the call")


def _left(call: _Resolved) -> float | None:
    return None if call.overall is None else call.overall - time.monotonic()


def _merge(base: Metadata, extra: Metadata) -> list[tuple[str, str]]:
    """`base` then `extra`, keys in lower case (gRPC refuses upper case; names are
    case-insensitive); a key in `extra` replaces it in `base` instead of doubling it."""
    lowered = [(key.lower(), value) for key, value in _pairs(extra)]
    replaced = {key for key, _ in lowered}
    return [(k.lower(), v) for k, v in _pairs(base) if k.lower() not in replaced] + lowered


def _pairs(metadata: Metadata) -> list[tuple[str, str]]:
    return list(metadata.items()) if isinstance(metadata, Mapping) else list(metadata)


def _check_cursor(cursor: str, seen: set[str], pages: int) -> None:
    if cursor in seen:
        raise error_for(
            grpc.StatusCode.INTERNAL, f"ListTools returned cursor {cursor!r} twice; stopping"
        )
    if pages >= MAX_PAGES:
        raise error_for(
            grpc.StatusCode.INTERNAL, f"ListTools still had more pages after {MAX_PAGES}; stopping"
        )
    seen.add(cursor)


def _check_listing(held: int, tools: int, pages: int) -> None:
    if held > MAX_LISTING_BYTES:
        raise error_for(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"ListTools pages hold more than {MAX_LISTING_BYTES // (1024 * 1024)} MiB in all, "
            f"by page {pages}; stopping",
        )
    if tools > MAX_LISTING_TOOLS:
        raise error_for(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"ListTools pages hold more than {MAX_LISTING_TOOLS} tools in all, by page {pages}; "
            "stopping",
        )


def _call_kwargs(step: _Call) -> dict[str, Any]:
    return {
        "timeout": step.timeout,
        "metadata": step.metadata,
        "wait_for_ready": step.wait_for_ready,
    }


class ToolClient(_ClientCore):
    """Blocking client; safe to share between threads. Use as a context manager or close().

    `timeout` is the default deadline of GetStatus/ListTools (10 s) and, when given, of
    CallTool too; `call_timeout` is CallTool's (75 s: longer than the server's upstream
    timeout). `retry` is the RetryPolicy of every call; None (the default) retries the reads
    (status, list_tools, list_tools_page) with READ_RETRY within their timeout and sends tool
    calls once, since a tool call may cost an upstream call. `NO_RETRY` sends every call once.
    `channel` is used as is and never closed by the client; `channel_factory(target, options)`
    builds one the client owns. `interceptors` wrap the channel (grpc.intercept_channel).
    `sleep` waits between retries (by default a wait that close() cuts short); replace it to
    observe or shorten the waits. close() ends calls waiting to retry, and calls in flight on
    a channel the client made, with a CANCELLED ToolServiceError.
    """

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        call_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
        retry: RetryPolicy | None = None,
        wait_for_ready: bool | None = None,
        load_balancing: Literal["round_robin", "pick_first"] | None = None,
        grpc_retry_attempts: int = 0,
        channel: grpc.Channel | None = None,
        channel_factory: ChannelFactory | None = None,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            call_timeout=call_timeout,
            credentials=credentials,
            metadata=metadata,
            options=options,
            retry=retry,
            wait_for_ready=wait_for_ready,
            load_balancing=load_balancing,
            grpc_retry_attempts=grpc_retry_attempts,
            channel=channel,
            channel_factory=channel_factory,
        )
        self._closing = threading.Event()
        self._sleep = sleep or self._wait
        self._owned: grpc.Channel | None = None
        if channel is None:
            if channel_factory is not None:
                channel = cast("grpc.Channel", channel_factory(self._target, self._options))
            elif credentials is None:
                channel = grpc.insecure_channel(self._target, options=self._options)
            else:
                channel = grpc.secure_channel(self._target, credentials, options=self._options)
            self._owned = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = pb_grpc.ToolServiceStub(channel)

    def status(self, **options: Unpack[CallOptions]) -> Status:
        """Whether the feature is enabled, and which tools this caller may call."""
        return self._drive(self._status_plan(options))

    def list_tools_page(
        self, cursor: str = "", page_size: int = 0, **options: Unpack[CallOptions]
    ) -> ToolPage:
        """One page of tools; pass the previous page's `next_cursor` to get the next."""
        return self._drive(self._page_plan(cursor, page_size, options))

    def list_tools(self, page_size: int = 0, **options: Unpack[CallOptions]) -> list[ToolInfo]:
        """Every tool, following cursors; `timeout` bounds the whole listing, not each page.
        Past MAX_LISTING_BYTES or MAX_LISTING_TOOLS it stops with ResourceExhausted."""
        return self._drive(self._list_plan(page_size, options))

    def call_tool(
        self, name: str, arguments: Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> ToolResult:
        """Run a tool. A tool failure is a result with `is_error`; a refusal raises a
        ToolServiceError subclass."""
        return self._drive(self._call_plan(name, arguments, options))

    def refine_prompt(
        self,
        template: Mapping[str, Any] | str,
        *,
        guidelines: str | None = None,
        context: str | None = None,
        test_cases: Sequence[Mapping[str, Any]] | None = None,
        **options: Unpack[CallOptions],
    ) -> RefinedPrompt:
        """Refine a prompt template (a mapping, or its JSON text) with
        tools.agenta.api.refine_prompt. A tool failure raises ToolError; a refusal raises the
        ToolServiceError subclass call_tool raises. Sent once unless a policy says otherwise."""
        plan = self._refine_plan(template, guidelines, context, test_cases, options)
        return self._drive(plan)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        **options: Unpack[ClientOptions],
    ) -> Self:
        """A client for the server the `aiservices` command would call: AISERVICES_TARGET
        (default 127.0.0.1:50051), AISERVICES_API_KEY (required), AISERVICES_TLS,
        AISERVICES_CA_FILE, AISERVICES_CERT_FILE and AISERVICES_KEY_FILE, read from `environ`
        (os.environ when None). Raises aiservices.SettingsError, as the command does, when the
        key is missing or a setting cannot be used. `options` are the constructor's."""
        connection = read_connection(environ)
        return cls(
            connection.target,
            connection.api_key,
            credentials=connection.credentials,
            interceptors=interceptors,
            **options,
        )

    def close(self) -> None:
        """Close the channel the client made (not one it was given); later calls raise
        RuntimeError."""
        self._closed = True
        self._closing.set()
        if self._owned is not None:
            self._owned.close()

    def _wait(self, seconds: float) -> None:
        self._closing.wait(seconds)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _drive(self, plan: _Plan[T]) -> T:
        self._check_open()
        answer: Any = None
        failure: ToolServiceError | None = None
        while True:
            try:
                step = plan.throw(failure) if failure is not None else plan.send(answer)
            except StopIteration as done:
                return cast("T", done.value)
            answer, failure = None, None
            if isinstance(step, _Wait):
                self._sleep(step.seconds)
                continue
            if self._closed:
                failure = _closed_during_call()
                continue
            try:
                answer = getattr(self._stub, step.method)(step.request, **_call_kwargs(step))
            except grpc.RpcError as err:
                failure = error_from_rpc(err)
            except ValueError:
                if not self._closed:
                    raise
                failure = _closed_during_call()  # closed by another thread just now


class AsyncToolClient(_ClientCore):
    """asyncio client over grpc.aio, with ToolClient's arguments. The channel opens on first
    use, so the client may be built outside a running event loop; use `async with` or
    `await close()`.

    `interceptors` are grpc.aio client interceptors, given to the channel the client builds
    (with a `channel` or `channel_factory`, put them on that channel yourself). close() ends
    calls waiting to retry, and calls in flight on a channel the client made, with a CANCELLED
    ToolServiceError; a caller whose own task was cancelled still gets CancelledError.
    """

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | None = None,
        call_timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        options: Sequence[tuple[str, Any]] = (),
        retry: RetryPolicy | None = None,
        wait_for_ready: bool | None = None,
        load_balancing: Literal["round_robin", "pick_first"] | None = None,
        grpc_retry_attempts: int = 0,
        channel: grpc.aio.Channel | None = None,
        channel_factory: ChannelFactory | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if interceptors and (channel is not None or channel_factory is not None):
            raise ValueError("with channel or channel_factory, add interceptors to that channel")
        super().__init__(
            target,
            api_key,
            timeout=timeout,
            call_timeout=call_timeout,
            credentials=credentials,
            metadata=metadata,
            options=options,
            retry=retry,
            wait_for_ready=wait_for_ready,
            load_balancing=load_balancing,
            grpc_retry_attempts=grpc_retry_attempts,
            channel=channel,
            channel_factory=channel_factory,
        )
        self._sleep = sleep or self._wait
        self._waits: set[asyncio.Future[None]] = set()
        self._interceptors = list(interceptors)
        self._channel: grpc.aio.Channel | None = channel
        self._owned: grpc.aio.Channel | None = None
        self._stub: ToolServiceAsyncStub | None = None

    async def status(self, **options: Unpack[CallOptions]) -> Status:
        """Whether the feature is enabled, and which tools this caller may call."""
        return await self._drive(self._status_plan(options))

    async def list_tools_page(
        self, cursor: str = "", page_size: int = 0, **options: Unpack[CallOptions]
    ) -> ToolPage:
        """One page of tools; pass the previous page's `next_cursor` to get the next."""
        return await self._drive(self._page_plan(cursor, page_size, options))

    async def list_tools(
        self, page_size: int = 0, **options: Unpack[CallOptions]
    ) -> list[ToolInfo]:
        """Every tool, following cursors; `timeout` bounds the whole listing, not each page.
        Past MAX_LISTING_BYTES or MAX_LISTING_TOOLS it stops with ResourceExhausted."""
        return await self._drive(self._list_plan(page_size, options))

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> ToolResult:
        """Run a tool. A tool failure is a result with `is_error`; a refusal raises a
        ToolServiceError subclass."""
        return await self._drive(self._call_plan(name, arguments, options))

    async def refine_prompt(
        self,
        template: Mapping[str, Any] | str,
        *,
        guidelines: str | None = None,
        context: str | None = None,
        test_cases: Sequence[Mapping[str, Any]] | None = None,
        **options: Unpack[CallOptions],
    ) -> RefinedPrompt:
        """Refine a prompt template (a mapping, or its JSON text) with
        tools.agenta.api.refine_prompt. A tool failure raises ToolError; a refusal raises the
        ToolServiceError subclass call_tool raises. Sent once unless a policy says otherwise."""
        plan = self._refine_plan(template, guidelines, context, test_cases, options)
        return await self._drive(plan)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        **options: Unpack[ClientOptions],
    ) -> Self:
        """ToolClient.from_env, for asyncio: the same variables, defaults and errors."""
        connection = read_connection(environ)
        return cls(
            connection.target,
            connection.api_key,
            credentials=connection.credentials,
            interceptors=interceptors,
            **options,
        )

    async def close(self) -> None:
        """Close the channel the client made (not one it was given), cancelling its calls in
        flight; later calls raise RuntimeError."""
        self._closed = True
        for waiting in self._waits:
            _settle(waiting)
        owned, self._owned, self._stub = self._owned, None, None
        if owned is not None:
            await owned.close()

    async def _wait(self, seconds: float) -> None:
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(seconds, _settle, waiting)
        self._waits.add(waiting)
        try:
            await waiting
        finally:
            timer.cancel()
            self._waits.discard(waiting)

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
        channel = self._channel
        if channel is None:
            if self._channel_factory is not None:
                made = self._channel_factory(self._target, self._options)
                channel = cast("grpc.aio.Channel", made)
            elif self._credentials is None:
                channel = grpc.aio.insecure_channel(
                    self._target, options=self._options, interceptors=self._interceptors
                )
            else:
                channel = grpc.aio.secure_channel(
                    self._target,
                    self._credentials,
                    options=self._options,
                    interceptors=self._interceptors,
                )
            self._owned = channel
        # The generated overloads pick the async stub only when grpc's own stubs
        # (types-grpcio) are installed; typed as Any here, this checks either way.
        make_stub: Any = pb_grpc.ToolServiceStub
        self._stub = make_stub(channel)
        return self._stub

    async def _drive(self, plan: _Plan[T]) -> T:
        stub = self._get_stub()
        answer: Any = None
        failure: ToolServiceError | None = None
        while True:
            try:
                step = plan.throw(failure) if failure is not None else plan.send(answer)
            except StopIteration as done:
                return cast("T", done.value)
            answer, failure = None, None
            if isinstance(step, _Wait):
                await self._sleep(step.seconds)
                continue
            if self._closed:
                failure = _closed_during_call()
                continue
            try:
                answer = await getattr(stub, step.method)(step.request, **_call_kwargs(step))
            except grpc.RpcError as err:
                failure = error_from_rpc(err)
            except asyncio.CancelledError:
                # grpc.aio ends the calls of a closed channel with CancelledError; only a
                # caller that was itself cancelled should see that.
                task = asyncio.current_task()
                if not self._closed or (task is not None and task.cancelling()):
                    raise
                failure = _closed_during_call()


def _settle(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)
