"""The baselines: a bare grpc.aio server for the same proto, with trivial handlers.

``python -m bench.baseline [--status-file F] [--upstream URL]`` listens on 127.0.0.1 (a free
port, printed as one JSON line ``{"port": N}`` on stdout) until SIGTERM or SIGINT.

- GetStatus and ListTools answer a message built once at start: the real server's GetStatus
  reply read from ``--status-file`` (so both servers put the same bytes on the wire), or
  ``enabled: true`` alone. No interceptors, no logging, no metrics.
- CallTool does the least a refine_prompt call needs: one POST with a plain aiohttp session to
  the upstream (the same body and header the real service sends), parse the reply, return the
  summary and the refined messages. No schema checks, no rate limit, no auth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from bench.common import ENVIRONMENT_SLUG, REFINE_PROMPT_KEY, UPSTREAM_API_KEY

RUN_PATH = "/services/completion/run"
MAX_CONNECTIONS = 1000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class BaselineServicer(pb_grpc.ToolServiceServicer):
    def __init__(self, status: pb.GetStatusResponse, upstream: str | None) -> None:
        self._status = status
        self._tools = pb.ListToolsResponse(tools=status.tools)
        self._url = None if upstream is None else upstream.rstrip("/") + RUN_PATH
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._url is not None:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=60.0),
                headers={"Authorization": f"ApiKey {UPSTREAM_API_KEY}"},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        return self._status

    async def ListTools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListToolsResponse:
        return self._tools

    async def CallTool(
        self, request: pb.CallToolRequest, context: grpc.aio.ServicerContext
    ) -> pb.CallToolResponse:
        if self._session is None or self._url is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no upstream")
            raise AssertionError("unreachable")
        fields = request.arguments.fields
        body = {
            "inputs": {
                "__ag_prompt_template_json": fields["prompt_template_json"].string_value,
                "__ag_guidelines": "",
                "__ag_context": "",
            },
            "environment": ENVIRONMENT_SLUG,
            "app": REFINE_PROMPT_KEY,
        }
        async with self._session.post(self._url, json=body) as response:
            status = response.status
            payload = await response.read()
        if status != 200:
            return pb.CallToolResponse(
                is_error=True,
                content=[pb.ContentBlock(text=pb.TextContent(text=f"upstream HTTP {status}"))],
            )
        reply: dict[str, Any] = json.loads(payload)
        data = reply["data"]
        if isinstance(data, str):
            data = json.loads(data)
        structured = struct_pb2.Struct()
        structured.update(data)
        return pb.CallToolResponse(
            content=[pb.ContentBlock(text=pb.TextContent(text=str(data.get("summary") or "")))],
            structured_content=structured,
            meta=pb.CallToolMeta(trace_id=str(reply.get("trace_id") or "")),
        )


async def serve(status: pb.GetStatusResponse, upstream: str | None) -> None:
    servicer = BaselineServicer(status, upstream)
    await servicer.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_ToolServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"msg": "serving", "port": port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        await servicer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--status-file", type=Path, help="serialized GetStatusResponse")
    parser.add_argument("--upstream", help="base URL of the stand-in upstream (127.0.0.1)")
    args = parser.parse_args(argv)
    status = pb.GetStatusResponse(enabled=True)
    if args.status_file is not None:
        status = pb.GetStatusResponse.FromString(args.status_file.read_bytes())
    asyncio.run(serve(status, args.upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
