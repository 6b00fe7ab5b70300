"""MCP Streamable HTTP at `/mcp`: the SDK's session manager, stateless with JSON responses, in
front of the core.

An ASGI app. Each request is checked for its Host, Origin and method, then authenticated
before any MCP processing (401 with `WWW-Authenticate: Bearer` otherwise), inside the envelope
both faces share (request id, drain, timing, metrics, access line with `transport: mcp`). The
SDK parses and answers JSON-RPC; its `tools/list` and `tools/call` handlers here call the core's
ToolService, and `answers` holds the one table from domain errors to what an MCP client sees.
Stateless: any replica can answer any request, and nothing is kept between requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import orjson
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from starlette.types import Message, Receive, Scope, Send

from aiservices_server import __version__
from aiservices_server.call import Call
from aiservices_server.core.arguments import check_bounds
from aiservices_server.core.auth import Authenticator
from aiservices_server.core.headers import REQUEST_ID_HEADER, Headers
from aiservices_server.core.service import MAX_NAME_SHOWN, ToolService
from aiservices_server.errors import InvalidArgument, ServiceError
from aiservices_server.faces.definitions import ConvertedDefinitions
from aiservices_server.faces.envelope import (
    CallRecord,
    Envelope,
    ToolOutcome,
    traced_tool_call,
)
from aiservices_server.faces.mcp.answers import (
    BodyTooSlow,
    HostNotAllowed,
    MethodNotAllowed,
    OriginNotAllowed,
    answer_for,
    code_of_status,
    jsonrpc_error,
)
from aiservices_server.faces.mcp.origins import OriginPolicy
from aiservices_server.healthz import HEALTH_PATH, health_answer
from aiservices_server.tools.base import ToolDefinition, ToolFailure, ToolResult

PATH = "/mcp"
SERVER_NAME = "aiservices"
_STATE_KEY = "aiservices.exchange"
# Bodies up to this size go to the SDK as they are; a larger one is first looked at in a worker
# thread, because the SDK parses and validates it on the event loop at a microsecond or more per
# JSON value, and 1 MiB of tiny values would hold the loop for 50 to 100 ms.
_LOOKED_AT_FIRST = 16 * 1024


@dataclass
class Exchange:
    """One HTTP request to /mcp: the authenticated call, its record in the envelope (which the
    SDK's handlers fill in), and the headers they add to the response. Made by the ASGI app,
    handed to the handlers in the ASGI scope (the request's own state)."""

    call: Call
    record: CallRecord
    headers: dict[str, str] = field(default_factory=dict)
    answered: bool = False
    arguments_refusal: InvalidArgument | None = None


def _headers(scope: Scope) -> Headers:
    return Headers.from_pairs(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in scope["headers"]
    )


async def _send_json(
    send: Send, status: int, body: Mapping[str, Any], headers: Mapping[str, str]
) -> None:
    data = orjson.dumps(body)
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
    raw += [(name.encode(), value.encode("latin-1", "replace")) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class McpFace:
    """The ASGI app serving MCP, between `start()` and `stop()`."""

    def __init__(
        self,
        service: ToolService,
        authenticator: Authenticator,
        envelope: Envelope,
        *,
        max_body_bytes: int,
        body_timeout: float,
        origins: OriginPolicy,
        log_payloads: bool = False,
    ) -> None:
        self._service = service
        self._body_timeout = body_timeout
        self.origins = origins
        self._authenticator = authenticator
        self._envelope = envelope
        self._max_body_bytes = max_body_bytes
        self._log_payloads = log_payloads
        # Converted once per definition: a reload of the tools file makes new ones.
        self._tools = ConvertedDefinitions(_tool, service.definitions)

        def input_schema(name: str) -> dict[str, Any] | None:
            definition = service.definition(name)
            return None if definition is None else definition.input_schema

        mcp_server: Server[Any] = Server(
            SERVER_NAME,
            version=__version__,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            # The SDK checks a call's parameter headers against the tool's input schema; given
            # here, it need not list the tools for every call to find it.
            get_tool_input_schema=input_schema,
        )
        self._holder: asyncio.Future[None] | None = None
        self._stopping = asyncio.Event()
        self._sessions = StreamableHTTPSessionManager(
            mcp_server,
            json_response=True,
            stateless=True,
            max_request_body_size=max_body_bytes,
        )

    async def start(self) -> None:
        """Start the SDK's session manager. It runs in a task of its own, because anyio wants
        it left in the task that entered it, and the server stops from another task."""
        ready = asyncio.Event()

        async def hold() -> None:
            async with self._sessions.run():
                ready.set()
                await self._stopping.wait()

        self._stopping = asyncio.Event()
        self._holder = asyncio.ensure_future(hold())
        waiting = asyncio.ensure_future(ready.wait())
        await asyncio.wait({self._holder, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if self._holder.done():
            self._holder.result()  # raises what failed

    async def stop(self) -> None:
        if self._holder is not None:
            self._stopping.set()
            await self._holder
            self._holder = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == HEALTH_PATH:
            await self._health(scope["method"], send)
            return
        if scope["path"] != PATH:
            await _send_json(send, 404, {"error": f"not found: MCP is served at {PATH}"}, {})
            return
        headers = _headers(scope)
        envelope = self._envelope
        record = envelope.open("mcp", "http", headers)
        exchange: Exchange | None = None
        try:
            self._check_http(scope["method"], headers)
            envelope.drain.enter()
            try:
                principal = self._authenticator.principal(headers)
                record.caller = principal
                call = Call(principal, record.request_id, None, record.traceparent)
                exchange = Exchange(call, record)
                await self._serve(scope, receive, send, exchange)
            finally:
                envelope.drain.leave()
        except ServiceError as refusal:
            record.refused(refusal)
            await self._refuse_http(send, refusal, record)
        except Exception as exc:
            internal = envelope.unexpected(exc, record)
            if exchange is None or not exchange.answered:
                await self._refuse_http(send, internal, record)
        finally:
            envelope.finish(record)

    async def _health(self, method: str, send: Send) -> None:
        """GET /healthz (see `healthz`). It says nothing a caller could not learn by calling,
        so it checks no Host: a balancer probes it by the replica's own address."""
        if method not in ("GET", "HEAD"):
            await _send_json(send, 405, {"error": "GET only"}, {"allow": "GET, HEAD"})
            return
        status, data = health_answer(not self._envelope.drain.draining)
        raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        raw.append((b"cache-control", b"no-store"))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})

    def _check_http(self, method: str, headers: Headers) -> None:
        """Refuse what is no MCP call for this server: a Host it is not reachable as, a browser
        page of another origin (DNS rebinding), a method other than POST."""
        # Sent twice, either is ambiguous: no value is taken.
        if "host" in headers.repeated or not self.origins.host_allowed(headers.get("host")):
            raise HostNotAllowed("the Host header names no address this server answers as")
        origin = "null" if "origin" in headers.repeated else headers.get("origin")
        if not self.origins.origin_allowed(origin):
            raise OriginNotAllowed("requests from this Origin are not allowed")
        if method != "POST":
            raise MethodNotAllowed(
                f"{PATH} takes POST only: the server is stateless, with no event stream to "
                "GET and no session to DELETE"
            )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        """Hand the request to the SDK, with the exchange in its state; the response gets the
        request id and the headers the handlers set. The call is cancelled when the client goes
        away before the answer (the upstream request with it)."""
        scope.setdefault("state", {})[_STATE_KEY] = exchange
        record = exchange.record
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                record.span.set({"http.response.status_code": status})
                exchange.answered = True
                extra = {REQUEST_ID_HEADER: exchange.call.request_id, **exchange.headers}
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        *((k.encode(), v.encode("latin-1", "replace")) for k, v in extra.items()),
                    ],
                }
            await send(message)

        try:
            async with asyncio.timeout(self._body_timeout):
                body = await _read_body(receive, self._max_body_bytes + 1)
        except TimeoutError:
            raise BodyTooSlow(
                f"the request body did not arrive within {self._body_timeout:g} seconds"
            ) from None
        if len(body) > _LOOKED_AT_FIRST:
            found = await asyncio.to_thread(_arguments_refusal, body)
            if found is not None:
                # The SDK gets the call without its arguments, and the handler answers it with
                # this refusal: the protocol's checks and the answer stay the SDK's.
                body, exchange.arguments_refusal = found
        gone = asyncio.Event()
        handling = asyncio.ensure_future(
            self._sessions.handle_request(scope, _replay(body, gone), send_with_headers)
        )
        watching = asyncio.ensure_future(_until_disconnect(receive, gone))
        try:
            await asyncio.wait({handling, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not handling.done():
                handling.cancel()  # the client went away: so does the call, upstream included
                record.code = "CANCELLED"
            await asyncio.gather(handling, return_exceptions=not handling.done())
        finally:
            watching.cancel()
            if not handling.done():
                handling.cancel()
        if record.code == "UNKNOWN":  # the SDK answered on its own, or a handler answered OK
            record.code = code_of_status(status)

    @staticmethod
    async def _refuse_http(send: Send, refusal: ServiceError, record: CallRecord) -> None:
        """A refusal before the SDK saw the request: an HTTP status, and as its body the same
        JSON-RPC error a refusal inside MCP gets (id null: the body was not read), which MCP
        clients pass on to their caller as they would that one."""
        status = answer_for(refusal).http_status
        record.span.set({"http.response.status_code": status})
        headers = {REQUEST_ID_HEADER: record.request_id}
        if status == 401:
            headers["www-authenticate"] = 'Bearer realm="aiservices"'
        if status == 405:
            headers["allow"] = "POST"
        if status in (405, 408):
            headers["connection"] = "close"
        code, data = jsonrpc_error(refusal)
        if "retryAfterSeconds" in data:
            headers["retry-after"] = str(data["retryAfterSeconds"])
        error = {"code": code, "message": refusal.message, "data": data}
        await _send_json(send, status, {"jsonrpc": "2.0", "id": None, "error": error}, headers)

    # --- the SDK's handlers ----------------------------------------------------------------

    async def _list_tools(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        exchange = _exchange_of(ctx)
        exchange.record.method = "tools/list"
        cursor = (params.cursor if params is not None else None) or ""
        try:
            page = self._service.list_tools(exchange.call.principal, cursor, 0)
        except ServiceError as error:
            raise self._refusal(exchange, error) from None
        except Exception as exc:
            raise self._refusal(exchange, self._envelope.unexpected(exc, exchange.record)) from None
        exchange.record.code = "OK"
        return types.ListToolsResult(
            tools=[self._tools.form(t) for t in page.tools], next_cursor=page.next_cursor or None
        )

    async def _call_tool(
        self, ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        exchange = _exchange_of(ctx)
        record = exchange.record
        record.method = "tools/call"
        record.tool = params.name[:MAX_NAME_SHOWN]
        if exchange.arguments_refusal is not None:  # found before the SDK read the body
            record.refused(exchange.arguments_refusal)
            return _invalid_arguments(exchange.arguments_refusal, exchange.call.request_id)
        arguments = dict(params.arguments or {})
        # Logged for calls that ran, as over gRPC; a refused call's arguments are not.
        payload = {"arguments": arguments} if self._log_payloads else None
        try:
            result = await traced_tool_call(
                self._envelope.tracer, self._service, exchange.call, params.name, arguments
            )
        except ToolFailure as failure:
            return _failed(exchange, failure, payload)
        except ServiceError as error:
            if isinstance(error, InvalidArgument) and answer_for(error).as_result:
                # A refusal, not a tool outcome: logged and counted as over gRPC, though MCP
                # answers it as a result the model can read.
                exchange.headers.update(error.headers)
                record.refused(error)
                return _invalid_arguments(error, exchange.call.request_id)
            raise self._refusal(exchange, error) from None
        except Exception as exc:
            raise self._refusal(exchange, self._envelope.unexpected(exc, record)) from None
        return _succeeded(exchange, result, payload)

    @staticmethod
    def _refusal(exchange: Exchange, error: ServiceError) -> MCPError:
        """A refusal inside MCP: the JSON-RPC error the SDK answers with, its `Retry-After`
        header when it has a delay."""
        exchange.record.refused(error)
        exchange.headers.update(error.headers)
        code, data = jsonrpc_error(error)
        if "retryAfterSeconds" in data:
            exchange.headers["retry-after"] = str(data["retryAfterSeconds"])
        return MCPError(code, error.message, data)


def _arguments_refusal(body: bytes) -> tuple[bytes, InvalidArgument] | None:
    """For a large body: when it is a tools/call whose arguments hold more values (or longer
    names) than the core allows, the same request without its arguments, and the refusal,
    found with the core's own bound check, which stops where the count runs out. None for
    anything else, which the SDK then parses as it is (a legitimate large body holds a few long
    strings, which cost it little)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("arguments"), dict):
        return None
    try:
        check_bounds(params["arguments"])
    except InvalidArgument as refusal:
        without = {**message, "params": {**params, "arguments": {}}}
        return orjson.dumps(without), refusal
    return None


def _exchange_of(ctx: Any) -> Exchange:
    request = getattr(ctx, "request", None)
    exchange = None if request is None else request.scope.get("state", {}).get(_STATE_KEY)
    if not isinstance(exchange, Exchange):
        raise MCPError(types.INTERNAL_ERROR, "the request reached MCP without authentication")
    return exchange


def _tool(definition: ToolDefinition) -> types.Tool:
    hints = definition.annotations
    return types.Tool(
        name=definition.name,
        title=definition.title,
        description=definition.description,
        input_schema=definition.input_schema,
        output_schema=definition.output_schema,
        annotations=types.ToolAnnotations(
            read_only_hint=hints.read_only_hint,
            destructive_hint=hints.destructive_hint,
            idempotent_hint=hints.idempotent_hint,
            open_world_hint=hints.open_world_hint,
        ),
    )


def _meta(exchange: Exchange, trace_id: str) -> dict[str, Any]:
    return {"aiservices/request_id": exchange.call.request_id, "aiservices/trace_id": trace_id}


def _succeeded(
    exchange: Exchange, result: ToolResult, payload: dict[str, Any] | None
) -> types.CallToolResult:
    exchange.headers.update(result.headers)
    if payload is not None:
        payload["result"] = result.structured
    exchange.record.code = "OK"
    exchange.record.outcome = ToolOutcome("OK", result.trace_id, result.upstream, payload)
    return types.CallToolResult(
        content=[types.TextContent(text=result.text)],
        structured_content=result.structured,
        is_error=False,
        _meta=_meta(exchange, result.trace_id),
    )


def _failed(
    exchange: Exchange, failure: ToolFailure, payload: dict[str, Any] | None
) -> types.CallToolResult:
    exchange.headers.update(failure.headers)
    if payload is not None:
        payload["result"] = failure.message
    exchange.record.code = "OK"
    exchange.record.outcome = ToolOutcome(
        failure.code.value, failure.trace_id, failure.upstream, payload
    )
    meta = _meta(exchange, failure.trace_id)
    meta["aiservices/error"] = {
        "code": failure.code.value,
        "retryable": failure.retryable,
        **({} if failure.retry_after is None else {"retryAfterSeconds": failure.retry_after}),
    }
    return types.CallToolResult(
        content=[types.TextContent(text=f"{failure.code.value}: {failure.message}")],
        is_error=True,
        _meta=meta,
    )


def _invalid_arguments(error: InvalidArgument, request_id: str) -> types.CallToolResult:
    """Invalid arguments are a tool execution error the model can read and correct."""
    lines = [error.message]
    lines += [f"{v.field}: {v.description}" for v in error.violations]
    if error.not_shown:
        lines.append(f"... and {error.not_shown}{'' if error.not_shown_exact else '+'} more")
    return types.CallToolResult(
        content=[types.TextContent(text="\n".join(lines))],
        is_error=True,
        _meta={
            "aiservices/request_id": request_id,
            "aiservices/error": {
                "code": error.reason,
                "fieldViolations": [
                    {"field": v.field, "description": v.description} for v in error.violations
                ],
            },
        },
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, at most `limit` bytes read (a longer one is cut there, so the SDK's
    own body limit refuses it with 413)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        chunks.append(chunk[: max(0, limit - size)])
        size += len(chunk)
        if size >= limit or not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, gone: asyncio.Event) -> Callable[[], Awaitable[Message]]:
    """A `receive` that yields the body already read, then waits for the client to leave."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def _until_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
