"""A plain MCP server from the SDK the service's MCP face uses, doing the same work.

``python -m bench.sdk --port N --keys-file F --upstream URL`` serves MCP Streamable HTTP at
``/mcp`` on 127.0.0.1: the SDK's ``MCPServer`` with one decorated tool, stateless with JSON
responses, on one uvicorn worker (uvloop, httptools, uvicorn's access log on). The tool does
what the REST design does (bench/rest.py's ``RefinePrompt``: keys file, permission, GCRA
limiter, input schema and template checks, one POST through one shared ``httpx.AsyncClient``,
output checks) and answers as the service does: the summary as text, the checked object as
structured content. Refusals are tool errors. Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from bench.rest import RefinePrompt, Refused
from server.auth import KeyStore
from server.tools.refine_prompt import NAME


def make_server(work: RefinePrompt) -> MCPServer:
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

    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sdk", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--keys-file", required=True, help="the keys file the service uses")
    parser.add_argument("--upstream", required=True, help="base URL of the stand-in upstream")
    args = parser.parse_args(argv)
    work = RefinePrompt(KeyStore.from_file(args.keys_file), args.upstream)
    server = make_server(work)
    app = server.streamable_http_app(stateless_http=True, json_response=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", workers=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
