"""MCP callers for tests: the SDK's own client for a key, and raw HTTP posts for what a client
hides (status codes, headers, bodies refused before any MCP processing).

The client records every HTTP response it gets, so a test can read the headers of the exchange
that answered a call (`x-request-id`, `Retry-After`, the rate limit left) as a caller would.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.servers import ServerThread

PROTOCOL_VERSION = "2026-07-28"
TIMEOUT = 10.0


def mcp_url(server: ServerThread) -> str:
    """Where the running server serves MCP (it must have been started with an MCP address)."""
    assert server.server.mcp_port, "the server was started without MCP_ADDRESS"
    return f"http://127.0.0.1:{server.server.mcp_port}/mcp"


def auth_headers(key: str | None, scheme: str = "Bearer") -> dict[str, str]:
    return {} if key is None else {"Authorization": f"{scheme} {key}"}


@asynccontextmanager
async def mcp_client(
    url: str,
    key: str | None,
    *,
    scheme: str = "Bearer",
    headers: Mapping[str, str] | None = None,
    **http_options: Any,
) -> AsyncIterator[Client]:
    """The SDK's Streamable HTTP client for `url`, sending `key` (and `headers`) with every
    request over an HTTP client made with `http_options`; both are closed on leaving."""
    http = httpx2.AsyncClient(
        headers={**auth_headers(key, scheme), **(headers or {})}, **http_options
    )
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


@dataclass
class McpCaller:
    """An SDK client connected to the server, and the HTTP responses it has received so far."""

    client: Client
    responses: list[httpx2.Response] = field(default_factory=list)

    def response_to(self, method: str) -> httpx2.Response:
        """The last HTTP response to a request of this JSON-RPC method (`tools/call`, ...)."""
        answered = [r for r in self.responses if r.request.headers.get("mcp-method") == method]
        assert answered, f"no HTTP response to {method} was seen"
        return answered[-1]


@asynccontextmanager
async def mcp_caller(
    server: ServerThread,
    key: str | None,
    *,
    scheme: str = "Bearer",
    headers: Mapping[str, str] | None = None,
    responses: list[httpx2.Response] | None = None,
) -> AsyncIterator[McpCaller]:
    """The SDK's Streamable HTTP client, sending `key` (and `headers`) with every request. The
    HTTP responses go to `responses` when given, so they can be read even when connecting fails."""
    seen: list[httpx2.Response] = [] if responses is None else responses

    async def record(response: httpx2.Response) -> None:
        seen.append(response)

    async with mcp_client(
        mcp_url(server),
        key,
        scheme=scheme,
        headers=headers,
        timeout=TIMEOUT,
        event_hooks={"response": [record]},
    ) as client:
        yield McpCaller(client, seen)


def rpc(method: str, params: Mapping[str, Any] | None = None, request_id: int = 1) -> bytes:
    """A well-formed JSON-RPC request body of the protocol version the server speaks."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": PROTOCOL_VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "raw-http-test", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    sent = {**(params or {}), "_meta": meta}
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "method": method, "params": sent}
    ).encode()


async def post(
    server: ServerThread, body: bytes, headers: Mapping[str, str] | None = None
) -> httpx2.Response:
    """One raw HTTP POST to /mcp with the content type and accept headers MCP asks for."""
    sent = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": PROTOCOL_VERSION,
        **(headers or {}),
    }
    async with httpx2.AsyncClient(timeout=TIMEOUT) as http:
        return await http.post(mcp_url(server), content=body, headers=sent)


async def post_rpc(
    server: ServerThread,
    method: str,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx2.Response:
    """One well-formed JSON-RPC request over raw HTTP, with the headers the protocol asks for
    (`Mcp-Method`, and `Mcp-Name` for a tool call), as an SDK client would send it."""
    sent = {"Mcp-Method": method}
    if params is not None and "name" in params:
        sent["Mcp-Name"] = str(params["name"])
    return await post(server, rpc(method, params), {**sent, **(headers or {})})
