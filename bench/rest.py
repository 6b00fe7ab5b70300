"""The third-party servers the service is compared with, doing the same work as it does.

``python -m bench.rest --port N --keys-file F --upstream URL --client shared|per-call|mcp``
serves on 127.0.0.1 with one uvicorn worker (uvloop, httptools, uvicorn's access log on). Each
call does what the service does for refine_prompt with the same building blocks (keys file,
permission, GCRA limiter, input schema and template checks, one upstream POST, output checks).

- ``shared`` and ``per-call``: the REST design this service replaced, FastAPI serving ``POST
  /tools/call`` (JSON ``{"name", "arguments"}``); refusals are HTTP 401, 403, 404, 422 or 429,
  upstream failures a 200 with ``isError``. ``shared`` ("REST, tuned") posts through one
  ``httpx.AsyncClient``; ``per-call`` ("REST, as merged") builds one per call, as the merged
  design did: each builds an SSL context, tens of ms of CPU.
- ``mcp``: a plain MCP server from the SDK the service's MCP face uses: ``MCPServer`` with one
  decorated tool at ``/mcp``, stateless with JSON responses, one shared ``httpx.AsyncClient``. It
  answers as the service does (the summary as text, the checked object as structured content);
  refusals are tool errors.

Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import mcp_types as types
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from jsonschema import Draft202012Validator
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel
from starlette.applications import Starlette

from aiservices_server.auth import KeyStore, parse_authorization
from aiservices_server.errors import retry_after_seconds
from aiservices_server.ratelimit import InMemoryRateLimiter, RateLimit
from aiservices_server.tools.refine_prompt import INPUT_SCHEMA, NAME, PERMISSION, check_output
from aiservices_server.tools.templates import TemplateError, parse_template
from bench.common import (
    RATE_LIMIT_BURST,
    RATE_LIMIT_PER_MINUTE,
    REST_PATH,
    RUN_PATH,
    UPSTREAM_API_KEY,
    upstream_body,
)

TIMEOUT_S = 60.0


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class Refused(Exception):
    """A call refused before the upstream: the HTTP status the REST design answered, a detail,
    and headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class RefinePrompt:
    """One refine_prompt call as the REST design made it, from the API key to the checked
    output, with the service's building blocks. The REST app and the plain MCP server share it,
    so the two do the same work."""

    def __init__(self, keys: KeyStore, upstream: str, per_call_client: bool = False) -> None:
        self._keys = keys
        self._url = upstream.rstrip("/") + RUN_PATH
        self._per_call_client = per_call_client
        self._limiter = InMemoryRateLimiter()
        self._limit = RateLimit(RATE_LIMIT_BURST, RATE_LIMIT_PER_MINUTE)
        self._validator = Draft202012Validator(INPUT_SCHEMA)
        # httpx's default pool limits: wider ones measured slower at 64 calls in flight.
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"ApiKey {UPSTREAM_API_KEY}"}
        if self._per_call_client:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                return await client.post(self._url, json=body, headers=headers)
        return await self.client.post(self._url, json=body, headers=headers)

    async def call(
        self, authorization: str | None, name: str, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """The result as MCP shapes it (content, structuredContent, isError, meta); Refused
        when the key, permission, rate limit or arguments do not allow the call."""
        key = self._keys.authenticate(parse_authorization(authorization) or "")
        if key is None:
            raise Refused(401, "missing or unknown API key", {"WWW-Authenticate": "Bearer"})
        if name != NAME:
            raise Refused(404, "unknown tool")
        if not key.principal().may(PERMISSION):
            raise Refused(403, "this key may not call the tool")
        decision = await self._limiter.acquire(f"{key.organization}:{key.id}:{NAME}", self._limit)
        if not decision.allowed:
            retry_after = str(retry_after_seconds(decision.retry_after))
            raise Refused(429, "rate limited", {"Retry-After": retry_after})
        problems = [error.message for error in self._validator.iter_errors(arguments)]
        if problems:
            raise Refused(422, problems)
        template_json: str = arguments["prompt_template_json"]
        try:
            template = parse_template(template_json)
        except TemplateError as exc:
            raise Refused(422, [str(exc)]) from None
        try:
            response = await self._post(upstream_body(template_json))
        except httpx.HTTPError as exc:
            return _tool_error(f"upstream unavailable: {type(exc).__name__}")
        if response.status_code != 200:
            return _tool_error(f"upstream HTTP {response.status_code}")
        reply = response.json()
        trace_id = str(reply.get("trace_id") or "")
        try:
            refined = check_output(reply.get("data"), template, trace_id)
        except Exception as failure:  # the tool's own failure type: the output was rejected
            return _tool_error(str(failure))
        return {
            "content": [{"type": "text", "text": refined["summary"]}],
            "structuredContent": refined,
            "isError": False,
            "meta": {"traceId": trace_id},
        }


def make_app(work: RefinePrompt) -> FastAPI:
    """The REST app: ``POST /tools/call`` in front of ``work``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with work.client:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post(REST_PATH)
    async def call_tool(
        call: ToolCall, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        try:
            return await work.call(authorization, call.name, call.arguments)
        except Refused as refused:
            raise HTTPException(refused.status, refused.detail, refused.headers) from None

    return app


def make_mcp_app(work: RefinePrompt) -> Starlette:
    """The plain MCP SDK server: one tool at ``/mcp`` in front of ``work``."""
    server: MCPServer = MCPServer("bench-sdk")

    @server.tool(name=NAME)
    async def refine_prompt(
        prompt_template_json: str,
        ctx: Context,
        guidelines: str | None = None,
        context: str | None = None,
    ) -> types.CallToolResult:
        arguments: dict[str, Any] = {"prompt_template_json": prompt_template_json}
        arguments |= {
            k: v for k, v in (("guidelines", guidelines), ("context", context)) if v is not None
        }
        authorization = (ctx.headers or {}).get("authorization")
        try:
            result = await work.call(authorization, NAME, arguments)
        except Refused as refused:
            raise ToolError(f"{refused.status}: {refused.detail}") from None
        return types.CallToolResult.model_validate(result)

    return server.streamable_http_app(stateless_http=True, json_response=True)


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--keys-file", required=True, help="the keys file the service uses")
    parser.add_argument("--upstream", required=True, help="base URL of the stand-in upstream")
    parser.add_argument("--client", choices=("shared", "per-call", "mcp"), default="shared")
    args = parser.parse_args(argv)
    work = RefinePrompt(
        KeyStore.from_file(args.keys_file), args.upstream, args.client == "per-call"
    )
    app = make_mcp_app(work) if args.client == "mcp" else make_app(work)
    # uvicorn's defaults otherwise, its access log included (the service logs every call too).
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
