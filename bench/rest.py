"""The third-party servers the service is compared with, doing the same work as it does.

``python -m bench.rest --port N --keys-file F --upstream URL --client shared|per-call|mcp``
serves on 127.0.0.1 with one uvicorn worker (uvloop, httptools, access log on); each call does
what the service does for refine_prompt with the same building blocks. ``shared`` and
``per-call``: the REST design it replaced, tuned (one shared ``httpx.AsyncClient``) and as merged
(one client, and so one SSL context, per call); ``mcp``: a plain MCP server from the SDK the
service's MCP face uses. Needs ``pip install -e '.[bench]'``."""

from __future__ import annotations

import argparse
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
from bench import common

TIMEOUT_S = 60.0


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class RefinePrompt:
    """One refine_prompt call as the REST design made it, from the API key to the checked output:
    the REST app and the plain MCP server share it, so the two do the same work."""

    def __init__(self, keys: KeyStore, upstream: str, per_call_client: bool = False) -> None:
        self._keys = keys
        self._url = upstream.rstrip("/") + common.RUN_PATH
        self._per_call_client = per_call_client
        self._limiter = InMemoryRateLimiter()
        self._limit = RateLimit(common.RATE_LIMIT_BURST, common.RATE_LIMIT_PER_MINUTE)
        self._validator = Draft202012Validator(INPUT_SCHEMA)
        # httpx's default pool limits: wider ones measured slower at 64 calls in flight.
        self.client = httpx.AsyncClient(timeout=TIMEOUT_S)

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"ApiKey {common.UPSTREAM_API_KEY}"}
        if self._per_call_client:
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                return await client.post(self._url, json=body, headers=headers)
        return await self.client.post(self._url, json=body, headers=headers)

    async def call(self, auth: str | None, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The result as MCP shapes it; HTTPException (the status the REST design answered) when
        the key, permission, rate limit or arguments do not allow the call."""
        key = self._keys.authenticate(parse_authorization(auth) or "")
        if key is None:
            raise HTTPException(401, "missing or unknown API key", {"WWW-Authenticate": "Bearer"})
        if name != NAME:
            raise HTTPException(404, "unknown tool")
        if not key.principal().may(PERMISSION):
            raise HTTPException(403, "this key may not call the tool")
        decision = await self._limiter.acquire(f"{key.organization}:{key.id}:{NAME}", self._limit)
        if not decision.allowed:
            retry_after = str(retry_after_seconds(decision.retry_after))
            raise HTTPException(429, "rate limited", {"Retry-After": retry_after})
        problems = [error.message for error in self._validator.iter_errors(arguments)]
        if problems:
            raise HTTPException(422, problems)
        template_json: str = arguments["prompt_template_json"]
        try:
            template = parse_template(template_json)
        except TemplateError as exc:
            raise HTTPException(422, [str(exc)]) from None
        try:
            response = await self._post(common.upstream_body(template_json))
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
        content, meta = [{"type": "text", "text": refined["summary"]}], {"traceId": trace_id}
        return {"content": content, "structuredContent": refined, "isError": False, "meta": meta}


def make_app(work: RefinePrompt) -> FastAPI:
    """The REST app: ``POST /tools/call`` in front of ``work``; refusals are HTTP 401, 403, 404,
    422 or 429, upstream failures a 200 with ``isError``."""
    app = FastAPI()

    @app.post(common.REST_PATH)
    async def call_tool(
        call: ToolCall, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        return await work.call(authorization, call.name, call.arguments)

    return app


def make_mcp_app(work: RefinePrompt) -> Starlette:
    """The plain MCP SDK server: one tool at ``/mcp`` in front of ``work``, refusing as tools."""
    server: MCPServer = MCPServer("bench-sdk")

    @server.tool(name=NAME)
    async def refine_prompt(
        prompt_template_json: str,
        ctx: Context,
        guidelines: str | None = None,
        context: str | None = None,
    ) -> types.CallToolResult:
        arguments: dict[str, Any] = {"prompt_template_json": prompt_template_json}
        optional = (("guidelines", guidelines), ("context", context))
        arguments |= {k: v for k, v in optional if v is not None}
        authorization = (ctx.headers or {}).get("authorization")
        try:
            result = await work.call(authorization, NAME, arguments)
        except HTTPException as refused:
            raise ToolError(f"{refused.status_code}: {refused.detail}") from None
        return types.CallToolResult.model_validate(result)

    return server.streamable_http_app(stateless_http=True, json_response=True)


def _tool_error(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": True}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--keys-file", required=True, help="the keys file the service uses")
    parser.add_argument("--upstream", required=True, help="base URL of the stand-in upstream")
    parser.add_argument("--client", choices=("shared", "per-call", "mcp"), default="shared")
    args = parser.parse_args()
    keys = KeyStore.from_file(args.keys_file)
    work = RefinePrompt(keys, args.upstream, per_call_client=args.client == "per-call")
    app = make_mcp_app(work) if args.client == "mcp" else make_app(work)
    # uvicorn's defaults otherwise, its access log included (the service logs every call too).
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", workers=1)
