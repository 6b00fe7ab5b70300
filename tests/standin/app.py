"""A stand-in upstream served over real loopback HTTP: the Agenta completion runner
(``RUN_PATH``) and an OpenAI-compatible chat completions endpoint (``CHAT_PATHS``, see
``tests.standin.openai`` for that convention).

The service refines prompts through one of those upstreams. Tests, ``make demo`` and the
benchmark need them without the network or an LLM, and they need them to misbehave on demand
(slow, hanging, garbage, resets), so this module serves both contracts from aiohttp and lets
callers queue *scenarios* that decide how each request is answered. One queue serves whichever
endpoint is called next; a scenario answers in that endpoint's shape (``Refine`` gives an Agenta
envelope or a ``chat.completion``, ``Status`` an Agenta or an OpenAI error body). Scenarios
that only make sense for chat completions (``Length``, ``NoChoices``) answer the Agenta
endpoint with a 501 that says so, so a misplaced one cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import itertools
import json
import secrets
import socket
import struct
import threading
import zlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

from tests.standin import openai
from tests.standin.schemas import declared_schema, instance, off_schema

__all__ = [
    "AUTO",
    "LOOPBACK_HOSTS",
    "REFINE_SUFFIX",
    "RUN_PATH",
    "Endless",
    "Exchange",
    "Garbage",
    "GzipBomb",
    "Hang",
    "Large",
    "OffSchema",
    "RawBytes",
    "RecordedRequest",
    "Refine",
    "Reply",
    "Reset",
    "Scenario",
    "Slow",
    "StandinUpstream",
    "Status",
    "Truncated",
    "check_loopback",
    "refine_template",
]

RUN_PATH: Final = "/services/completion/run"
REFINE_SUFFIX: Final = " Be specific and concise."
# Loopback literals only: the stand-in must never be reachable from another machine.
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1"})

_JSON: Final = "application/json"
# Streamed bodies go out in pieces this big, so the stand-in never holds a large body itself.
_CHUNK: Final = 64 * 1024


class _Auto(enum.Enum):
    """Sentinel type for 'the stand-in chooses': a trace id can be 'random per reply', a fixed
    value, or absent (None); an error body can be 'the endpoint's own' or given."""

    AUTO = "auto"


AUTO: Final = _Auto.AUTO
"""Default for ``trace_id``: a fresh random id for every reply (32 hex for Agenta, a
``chatcmpl-`` id for chat completions); for ``Status.body``: the endpoint's error body."""

# Anything JSON can hold, to test how the service treats odd trace ids (None: left out).
TraceId = str | int | float | bool | list[Any] | dict[str, Any] | _Auto | None


def check_loopback(host: str) -> str:
    """Return ``host`` if it is 127.0.0.1 or ::1; refuse anything else (no accidental exposure)."""
    try:
        literal = str(ipaddress.ip_address(host))
    except ValueError:
        literal = ""
    if literal not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing to bind {host!r}: the stand-in only serves 127.0.0.1 or ::1")
    return literal


def _trace_id(value: TraceId) -> Any:
    if isinstance(value, _Auto):
        return secrets.token_hex(16)
    return value


def _envelope(data: Any, trace_id: TraceId, trace_key: str) -> dict[str, Any]:
    envelope: dict[str, Any] = {"version": "3.0", "data": data}
    tid = _trace_id(trace_id)
    if tid is not None:
        envelope[trace_key] = tid
    envelope["span_id"] = secrets.token_hex(8)
    return envelope


def _json_response(
    status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type=_JSON,
        headers=dict(headers) if headers else None,
    )


def refine_template(template_json: str) -> list[dict[str, Any]]:
    """Refine a template the way the stand-in does, so tests can predict the exact output.

    Roles, order and the whole original content (and so every template variable) are kept;
    ``REFINE_SUFFIX`` is appended. Content given as a list of text parts comes back as one
    string, as the deployed refine prompt answers with plain ``{role, content}`` messages.
    Raises ``ValueError`` when the template is not an object with a ``messages`` list of objects.
    """
    template = json.loads(template_json)
    if not isinstance(template, dict) or not isinstance(template.get("messages"), list):
        raise ValueError("template must be a JSON object with a 'messages' list")
    refined: list[dict[str, Any]] = []
    for message in template["messages"]:
        if not isinstance(message, dict):
            raise ValueError("every message must be a JSON object")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        text = content if isinstance(content, str) else ""
        refined.append({"role": message.get("role"), "content": text + REFINE_SUFFIX})
    return refined


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as it arrived, so tests can assert on what the service really sent."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or None when the body is not JSON
    raw: bytes


class Exchange:
    """What a scenario gets to act on: the request, its parsed body, which endpoint was called
    (``chat``: the OpenAI-compatible one) and the server's hooks."""

    __slots__ = ("body", "chat", "request", "upstream")

    def __init__(
        self, upstream: StandinUpstream, request: web.BaseRequest, body: Any, chat: bool = False
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.body = body
        self.chat = chat

    def error(
        self, status: int, message: str, kind: str = "server_error", code: Any = None
    ) -> web.Response:
        """An error in this endpoint's shape: OpenAI's error body or Agenta's ``detail``."""
        if self.chat:
            return _json_response(status, openai.error_body(message, kind, code=code))
        return _json_response(status, {"detail": message})

    def answer(
        self, content: str | None, trace_id: TraceId = AUTO, finish_reason: str = "stop"
    ) -> web.Response:
        """Model output ``content`` in this endpoint's shape: a ``chat.completion`` (no choices
        when None) or an Agenta envelope with ``content`` as its data."""
        if not self.chat:
            return _json_response(200, _envelope(content, trace_id, "trace_id"))
        return _json_response(200, self.completion(content, trace_id, finish_reason))

    def completion(
        self,
        content: str | None,
        trace_id: TraceId = AUTO,
        finish_reason: str = "stop",
        *,
        prompt_tokens: int | None = None,
    ) -> dict[str, Any]:
        """A ``chat.completion`` answering this request (its model, its prompt's tokens: counted
        here unless the caller, who parsed the request already, gives them)."""
        if prompt_tokens is None:
            try:
                prompt_tokens = openai.parse_chat_request(self.body).prompt_tokens
            except openai.ChatRequestError:
                prompt_tokens = 0
        cid = openai.response_id() if isinstance(trace_id, _Auto) else trace_id
        return openai.completion(
            openai.request_model(self.body),
            content,
            completion_id=cid,
            prompt_tokens=prompt_tokens,
            finish_reason=finish_reason,
        )

    def declared_schema(self) -> dict[str, Any] | None:
        """The output schema a declared tool's request asks for: from the chat request itself,
        or the one the stand-in was given for the Agenta app called; None for anything else."""
        if self.chat:
            return declared_schema(self.body)
        app = self.body.get("app") if isinstance(self.body, dict) else None
        return self.upstream.apps.get(app) if isinstance(app, str) else None

    def declared_body(
        self, content: str, trace_id: TraceId, finish_reason: str = "stop"
    ) -> dict[str, Any]:
        """A declared tool's answer ``content`` in this endpoint's shape."""
        if self.chat:
            return self.completion(content, trace_id, finish_reason, prompt_tokens=0)
        return _envelope(content, trace_id, "trace_id")

    async def pause(self, seconds: float | None, gate: Gate | None = None) -> None:
        """Wait (forever when None, or until `gate` opens) in a way ``stop()`` can interrupt, so
        shutdown never blocks."""
        task = asyncio.current_task()
        assert task is not None
        waiting = self.upstream._waiting
        waiting.add(task)
        try:
            if gate is not None:
                await gate.wait()
            elif seconds is None:
                await asyncio.get_running_loop().create_future()
            else:
                await asyncio.sleep(seconds)
        finally:
            waiting.discard(task)

    def abort(self) -> web.Response:
        """Reset the TCP connection (SO_LINGER 0 makes close send RST) and give aiohttp a dummy.

        aiohttp treats the failed write of the returned response as a premature disconnect and
        stays quiet, so the handler ends without hanging on a cancellation that may never come.
        """
        transport = self.request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=204)


class Scenario(ABC):
    """How one request is answered; subclasses are small frozen dataclasses."""

    __slots__ = ()

    @abstractmethod
    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        """Produce the response (or misbehave) for this request."""


def json_schema_refusal(structured: bool = True) -> web.Response:
    """The 400 a server without structured outputs gives a ``json_schema`` request: OpenAI's,
    with ``param: "response_format"``, or (not ``structured``) the message alone, as vLLM's and
    Ollama's OpenAI-compatible endpoints may give it."""
    param = "response_format" if structured else None
    return _json_response(400, openai.error_body(openai.JSON_SCHEMA_REFUSAL, param=param))


def openai_unauthorized() -> web.Response:
    """OpenAI's 401 for a wrong key."""
    body = openai.error_body(
        "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"
    )
    return _json_response(401, body)


def chat_only(exchange: Exchange, scenario: Scenario) -> web.Response | None:
    """A 501 naming ``scenario`` when it is used on the Agenta endpoint, where it means nothing."""
    if exchange.chat:
        return None
    name = type(scenario).__name__
    return exchange.error(501, f"stand-in: {name}() only answers chat completions")


@dataclass(frozen=True, slots=True)
class Refine(Scenario):
    """The happy path: a deterministic refinement that keeps roles, order and variables.

    ``summary=None`` sends ``"summary": null``; ``trace_id=None`` leaves the trace id (for chat
    completions: the response id) out; any other JSON value is sent as it is.
    """

    summary: str | None = "Tightened the wording."
    trace_id: TraceId = AUTO

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        refined = refined_body(exchange, self.summary, self.trace_id)
        if isinstance(refined, web.StreamResponse):
            return refined
        return _json_response(200, refined)


def refined_body(
    exchange: Exchange, summary: str | None, trace_id: TraceId, finish_reason: str = "stop"
) -> dict[str, Any] | web.StreamResponse:
    """The reply body of a refinement of the request's template (an Agenta envelope or a
    ``chat.completion``), or the error the endpoint gives for a request it cannot read: 422 from
    Agenta, OpenAI's 400 naming the field. A ``length`` finish cuts the content in half.

    A declared tool's request (see ``tests.standin.schemas``) is answered with an instance of
    the schema it asks for."""
    schema = exchange.declared_schema()
    if schema is not None:
        return exchange.declared_body(json.dumps(instance(schema)), trace_id, finish_reason)
    if exchange.chat:
        try:
            request = openai.parse_chat_request(exchange.body)
            messages = refine_template(request.template_json)
        except openai.ChatRequestError as exc:
            return _json_response(400, openai.error_body(exc.message, param=exc.param))
        except ValueError as exc:
            message = f"cannot parse prompt template: {exc}"
            return _json_response(400, openai.error_body(message, param="messages"))
        content = json.dumps({"messages": messages, "summary": summary})
        if finish_reason == "length":
            content = content[: len(content) // 2]
        return exchange.completion(
            content, trace_id, finish_reason, prompt_tokens=request.prompt_tokens
        )
    body = exchange.body
    try:
        inputs = body["inputs"]
        messages = refine_template(inputs["__ag_prompt_template_json"])
    except (KeyError, TypeError, ValueError) as exc:
        return _json_response(422, {"detail": f"cannot parse prompt template: {exc}"})
    data = json.dumps({"messages": messages, "summary": summary})
    return _envelope(data, trace_id, "trace_id")


@dataclass(frozen=True, slots=True)
class OffSchema(Scenario):
    """A declared tool's answer that breaks the schema it asks for (``schemas.off_schema``): valid
    JSON, the wrong value in its first required property. A request that is no declared tool's
    gets a 501 saying so."""

    trace_id: TraceId = AUTO

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        schema = exchange.declared_schema()
        if schema is None:
            return exchange.error(501, "stand-in: OffSchema() only answers declared tools")
        body = exchange.declared_body(json.dumps(off_schema(schema)), self.trace_id)
        return _json_response(200, body)


@dataclass(frozen=True, slots=True)
class Reply(Scenario):
    """Answer exactly ``data``, e.g. model output that must fail the service's checks.

    With ``data_as_string`` a non-str ``data`` is JSON-encoded into a string (a str is sent as
    is, so a broken JSON string can be tested); otherwise ``data`` is embedded as an object.
    On the chat completions endpoint ``data`` (as a string) is the message content and
    ``trace_id`` the response id, so one scenario serves tests of either upstream.
    """

    data: Any
    trace_id: TraceId = AUTO
    status: int = 200
    data_as_string: bool = True
    trace_key: str = "trace_id"

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        data = self.data
        if exchange.chat:
            content = data if isinstance(data, str) else json.dumps(data)
            return _json_response(self.status, exchange.completion(content, self.trace_id))
        if self.data_as_string and not isinstance(data, str):
            data = json.dumps(data)
        return _json_response(self.status, _envelope(data, self.trace_id, self.trace_key))


@dataclass(frozen=True, slots=True)
class Status(Scenario):
    """A plain error status (500, 503, 429 + Retry-After...). ``body`` None sends no body;
    ``AUTO`` sends the endpoint's error body (Agenta's ``detail`` or OpenAI's ``error``)."""

    code: int
    body: Any = AUTO
    headers: Mapping[str, str] = field(default_factory=dict)

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        if isinstance(self.body, _Auto):
            response = exchange.error(self.code, "stand-in upstream error")
            response.headers.update(self.headers)
            return response
        if self.body is None:
            return web.Response(status=self.code, headers=dict(self.headers))
        if isinstance(self.body, bytes):
            return web.Response(status=self.code, body=self.body, headers=dict(self.headers))
        return _json_response(self.code, self.body, self.headers)


@dataclass(frozen=True, slots=True)
class Slow(Scenario):
    """Wait ``seconds`` then behave as ``then``: exercises client timeouts and pool limits."""

    seconds: float
    then: Scenario = Refine()

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        await exchange.pause(self.seconds)
        return await self.then.respond(exchange)


class Gate:
    """Holds the requests of `Held` scenarios until the test calls `open()`, from any thread: a
    call kept in flight for exactly as long as the test needs, however slow the machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is already closed
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._opened:
                return
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        await future


@dataclass(frozen=True, slots=True)
class Held(Scenario):
    """Wait until ``gate`` opens, then behave as ``then``."""

    gate: Gate
    then: Scenario = Refine()

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        await exchange.pause(None, self.gate)
        return await self.then.respond(exchange)


@dataclass(frozen=True, slots=True)
class Hang(Scenario):
    """Never answer; the handler ends when the client goes away (counted) or on ``stop()``."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        await exchange.pause(None)
        raise AssertionError("unreachable: pause(None) only ends by cancellation")


@dataclass(frozen=True, slots=True)
class Garbage(Scenario):
    """A non-JSON body (an HTML error page from a proxy, say)."""

    body: bytes = b"<html>oops</html>"
    status: int = 200
    content_type: str = "text/html"

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        return web.Response(status=self.status, body=self.body, content_type=self.content_type)


@dataclass(frozen=True, slots=True)
class Reset(Scenario):
    """Close the TCP connection abruptly without any response: the client sees a reset."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        return exchange.abort()


@dataclass(frozen=True, slots=True)
class RawBytes(Scenario):
    """Write these bytes instead of an HTTP response, then close: a broken proxy in between."""

    data: bytes = b"HELLO NOT HTTP\r\n\r\n"

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        transport = exchange.request.transport
        if transport is not None:
            transport.write(self.data)
            transport.close()  # FIN after the bytes; aiohttp's own reply then fails quietly
        return web.Response()


@dataclass(frozen=True, slots=True)
class Truncated(Scenario):
    """Send the headers and half of a valid body, then close cleanly: an incomplete response."""

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        reply = exchange.completion("{}") if exchange.chat else _envelope("{}", AUTO, "trace_id")
        body = json.dumps(reply).encode()
        response = web.StreamResponse(status=200, headers={"Content-Type": _JSON})
        response.content_length = len(body)
        await response.prepare(exchange.request)
        await response.write(body[: len(body) // 2])
        transport = exchange.request.transport
        if transport is not None:
            transport.close()  # FIN after the buffered half; aiohttp's write_eof then fails quietly
        return response


async def _stream(
    exchange: Exchange,
    status: int,
    chunks: Iterable[bytes],
    *,
    length: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Send ``chunks`` as one body (chunked when ``length`` is None) until they run out, the
    client goes away (counted as a disconnect) or the stand-in stops.

    A write waits while the socket's buffers are full, so a client that stops reading stops
    the stream and memory stays at a chunk or two.
    """
    response = web.StreamResponse(status=status, headers=dict(headers) if headers else None)
    response.content_type = _JSON
    if length is not None:
        response.content_length = length
    upstream = exchange.upstream
    task = asyncio.current_task()
    assert task is not None
    upstream._waiting.add(task)  # stop() cancels it like a pause
    try:
        await response.prepare(exchange.request)
        for chunk in chunks:
            if upstream._closing:
                break
            await response.write(chunk)
            # A write into a socket with room returns without yielding: yield here, so the
            # loop sees a disconnect or stop() between chunks instead of spinning.
            await asyncio.sleep(0)
        else:
            await response.write_eof()
    except ConnectionResetError:
        upstream._count_disconnect()
    finally:
        upstream._waiting.discard(task)
    return response


def _repeat(chunk: bytes, total: int | None) -> Iterator[bytes]:
    """``chunk`` again and again: ``total`` bytes in all, or forever when None."""
    left = total
    while left is None or left > 0:
        piece = chunk if left is None or left >= len(chunk) else chunk[:left]
        if left is not None:
            left -= len(piece)
        yield piece


@dataclass(frozen=True, slots=True)
class Large(Scenario):
    """A refinement padded to exactly ``size`` bytes of valid JSON, streamed in small chunks
    (a ``padding`` key in the Agenta envelope or the ``chat.completion``).

    With Content-Length, unless ``chunked``. A size under the service's cap must succeed, one
    over it must be refused; with an error ``status`` it is an error page that big.
    """

    size: int
    chunked: bool = False
    status: int = 200

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        refined = refined_body(exchange, "Padded.", AUTO)
        if isinstance(refined, web.StreamResponse):
            return refined
        refined["padding"] = ""
        head = json.dumps(refined).encode()[: -len(b'"}')]  # ends inside the padding string
        padding = self.size - len(head) - len(b'"}')
        if padding < 0:
            raise ValueError(f"a refinement needs at least {len(head) + 2} bytes")
        parts = itertools.chain([head], _repeat(b" " * _CHUNK, padding), [b'"}'])
        return await _stream(
            exchange, self.status, parts, length=None if self.chunked else self.size
        )


@dataclass(frozen=True, slots=True)
class Endless(Scenario):
    """A chunked body that never ends; it stops when the client goes away (counted)."""

    status: int = 200

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        parts = itertools.chain([b'{"padding": "'], _repeat(b" " * _CHUNK, None))
        return await _stream(exchange, self.status, parts)


@dataclass(frozen=True, slots=True)
class GzipBomb(Scenario):
    """``Content-Encoding: gzip``: a small body that inflates to ``inflated`` zero bytes.

    Compressed on the fly, a MiB at a time, so the stand-in never holds more than that; a
    client that decodes it whole holds all of it.
    """

    inflated: int = 1024 * 1024 * 1024
    status: int = 200

    async def respond(self, exchange: Exchange) -> web.StreamResponse:
        headers = {"Content-Encoding": "gzip"}
        return await _stream(exchange, self.status, _gzip_zeros(self.inflated), headers=headers)


def _gzip_zeros(total: int) -> Iterator[bytes]:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    for zeros in _repeat(bytes(1024 * 1024), total):
        yield compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()


@dataclass(slots=True)
class _AsyncWaiter:
    predicate: Callable[[], bool]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class StandinUpstream:
    """The stand-in upstream on 127.0.0.1 (or ::1), in a loop or its own thread: the Agenta
    completion runner at ``RUN_PATH`` and OpenAI-compatible chat completions at ``CHAT_PATHS``.

    ``apps`` maps an Agenta app's slug to the output schema of the declared tool that runs it,
    so the Agenta endpoint can answer that tool (see ``tests.standin.schemas``).

    ``api_key`` guards the Agenta endpoint (``Authorization: ApiKey KEY``), ``openai_api_key``
    the chat endpoint (``Authorization: Bearer KEY``); each is open when None, as a local model
    server is. With ``reject_json_schema`` every ``json_schema`` request gets the 400 of a server
    without structured outputs, before and without consuming a scenario, as a refused key does.

    Counters and the request log are guarded by one ``threading.Condition`` so a test in any
    thread (or any event loop) can wait for "n requests arrived" instead of sleeping.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        openai_api_key: str | None = None,
        reject_json_schema: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        default: Scenario | None = None,
        record: bool = True,
        backlog: int = 4096,
        apps: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        self._host = check_loopback(host)
        self.apps: dict[str, dict[str, Any]] = dict(apps or {})
        self._requested_port = port
        self._auth = f"ApiKey {api_key}" if api_key is not None else None
        self._openai_auth = f"Bearer {openai_api_key}" if openai_api_key is not None else None
        self.reject_json_schema = reject_json_schema
        self.default: Scenario = default if default is not None else Refine()
        self._record = record
        self._backlog = backlog

        self._cond = threading.Condition()
        self._queue: deque[Scenario] = deque()
        self._requests: list[RecordedRequest] = []
        self._request_count = 0
        self._disconnects = 0
        self._async_waiters: list[_AsyncWaiter] = []
        self.in_flight = 0
        self.max_in_flight = 0

        self._runner: web.ServerRunner | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._waiting: set[asyncio.Task[Any]] = set()
        self._thread: threading.Thread | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("the stand-in upstream is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``; the service appends ``RUN_PATH``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """OpenAI base URL, ``http://127.0.0.1:PORT/v1`` (``url`` without ``/v1`` works too)."""
        return self.url + "/v1"

    # -- scenarios and observations --------------------------------------------------------

    def push(self, *scenarios: Scenario) -> None:
        """Queue scenarios; each request takes the next one, then ``default`` answers."""
        with self._cond:
            self._queue.extend(scenarios)

    @property
    def pending(self) -> int:
        """Scenarios queued and not yet consumed."""
        with self._cond:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests recorded so far (safe to read from any thread)."""
        with self._cond:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """Requests received, counted even when recording is off."""
        with self._cond:
            return self._request_count

    @property
    def disconnects(self) -> int:
        """Clients that went away while a handler was still working (Slow, Hang...)."""
        with self._cond:
            return self._disconnects

    def clear(self) -> None:
        """Forget recorded requests, counters and queued scenarios between test phases."""
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._request_count = 0
            self._disconnects = 0
            self.max_in_flight = self.in_flight

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests arrived; False on timeout."""
        return self._wait(lambda: self._request_count >= n, timeout)

    def wait_for_disconnects(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` client disconnects were seen; False on timeout."""
        return self._wait(lambda: self._disconnects >= n, timeout)

    # The timeout parameter mirrors the sync twins on purpose (ASYNC109 prefers asyncio.timeout).
    async def until_requests(self, n: int, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Async twin of ``wait_for_requests`` that never blocks the calling loop."""
        return await self._until(lambda: self._request_count >= n, timeout)

    async def until_disconnects(self, n: int, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Async twin of ``wait_for_disconnects``."""
        return await self._until(lambda: self._disconnects >= n, timeout)

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = self._loop
        if loop is not None and self._in_loop_thread():
            raise RuntimeError("this would block the stand-in's own loop: use the async twin")
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def _in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _until(self, predicate: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        with self._cond:
            if predicate():
                return True
            waiter = _AsyncWaiter(predicate, loop, loop.create_future())
            self._async_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter.future, timeout)
        except TimeoutError:
            with self._cond:
                return predicate()
        finally:
            with self._cond, contextlib.suppress(ValueError):
                self._async_waiters.remove(waiter)
        return True

    def _notify_locked(self) -> None:
        """Wake sync and async waiters; the caller holds ``self._cond``."""
        self._cond.notify_all()
        if not self._async_waiters:
            return
        for waiter in list(self._async_waiters):
            if waiter.predicate():
                self._async_waiters.remove(waiter)
                with contextlib.suppress(RuntimeError):  # that loop is already closed
                    waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    # -- the handler -----------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            raw = await request.read()
            try:
                body: Any = json.loads(raw) if raw else None
            except ValueError:
                body = None
            with self._cond:
                self._request_count += 1
                if self._record:
                    headers = {k.lower(): v for k, v in request.headers.items()}
                    self._requests.append(
                        RecordedRequest(request.method, request.path, headers, body, raw)
                    )
                self._notify_locked()
            chat = request.path in openai.CHAT_PATHS
            if request.path != RUN_PATH and not chat:
                return _json_response(404, {"detail": "Not Found"})
            if request.method != "POST":
                return _json_response(405, {"detail": "Method Not Allowed"})
            refused = self._refuse(request, body, chat)
            if refused is not None:
                return refused
            with self._cond:
                scenario = self._queue.popleft() if self._queue else self.default
            return await scenario.respond(Exchange(self, request, body, chat))
        except asyncio.CancelledError:
            # aiohttp cancels the handler (handler_cancellation=True) when the client goes away;
            # stop() cancels too, but sets _closing first so that is not counted.
            self._count_disconnect()
            raise
        finally:
            self.in_flight -= 1

    def _refuse(self, request: web.BaseRequest, body: Any, chat: bool) -> web.Response | None:
        """The answer to a request refused before any scenario: a wrong key, or ``json_schema``
        asked of a server set to reject it."""
        given = request.headers.get("Authorization")
        if not chat:
            if self._auth is not None and given != self._auth:
                return _json_response(401, {"detail": "invalid api key"})
            return None
        if self._openai_auth is not None and given != self._openai_auth:
            return openai_unauthorized()
        if self.reject_json_schema and openai.asks_json_schema(body):
            return json_schema_refusal()
        return None

    def _count_disconnect(self) -> None:
        """A client went away mid-answer (not counted while the stand-in itself stops)."""
        if not self._closing:
            with self._cond:
                self._disconnects += 1
                self._notify_locked()

    # -- running inside the caller's loop --------------------------------------------------

    async def start(self) -> Self:
        """Bind and serve in the running loop; returns self for chaining."""
        if self._runner is not None:
            raise RuntimeError("the stand-in upstream is already running")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, backlog=self._backlog)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = site.port
        return self

    async def stop(self) -> None:
        """Stop serving; interrupts Slow/Hang handlers so shutdown is quick."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing = True
        for task in list(self._waiting):
            task.cancel()
        try:
            await runner.cleanup()
        finally:
            self._port = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- running in its own thread ---------------------------------------------------------

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Serve from a daemon thread with its own loop, for sync tests or other loops."""
        if self._thread is not None or self._runner is not None:
            raise RuntimeError("the stand-in upstream is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="standin-upstream", daemon=True)
        thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the stand-in upstream did not start in time")
        if failure:
            thread.join(timeout)
            raise failure[0]
        self._thread = thread
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop the threaded server and join its thread."""
        thread, self._thread = self._thread, None
        loop = self._loop
        if thread is None or loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()
