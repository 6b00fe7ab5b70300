"""The baseline: a bare grpc.aio server for the same proto, with trivial handlers, on uvloop as
the service is, importing no server code: ``python -m bench.baseline --port N --upstream URL
[--status-file F]``. GetStatus answers the service's own reply, read once from the status file,
so both put the same bytes on the wire. CallTool makes one POST with a plain aiohttp session to
the upstream (the body and header the service sends) and returns the summary and the refined
messages: no argument or output checks, no auth, no rate limit, no logging."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import uvloop
from google.protobuf import struct_pb2

from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from bench.common import RUN_PATH, UPSTREAM_API_KEY, upstream_body


class BaselineServicer(pb_grpc.ToolServiceServicer):
    def __init__(self, status: pb.GetStatusResponse, url: str, session: aiohttp.ClientSession):
        self._status, self._url, self._session = status, url, session

    async def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        return self._status

    async def ListTools(self, request: Any, context: Any) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(tools=self._status.tools)

    async def CallTool(self, request: pb.CallToolRequest, context: Any) -> pb.CallToolResponse:
        body = upstream_body(request.arguments.fields["prompt_template_json"].string_value)
        async with self._session.post(self._url, json=body) as response:
            status = response.status
            payload = await response.read()
        if status != 200:
            text = pb.TextContent(text=f"upstream HTTP {status}")
            return pb.CallToolResponse(is_error=True, content=[pb.ContentBlock(text=text)])
        reply = json.loads(payload)
        data = reply["data"] if isinstance(reply["data"], dict) else json.loads(reply["data"])
        structured = struct_pb2.Struct()
        structured.update(data)
        return pb.CallToolResponse(
            content=[pb.ContentBlock(text=pb.TextContent(text=str(data.get("summary") or "")))],
            structured_content=structured,
            meta=pb.CallToolMeta(trace_id=str(reply.get("trace_id") or "")),
        )


async def serve(port: int, status: pb.GetStatusResponse, upstream: str, limit: int) -> None:
    connector, timeout = aiohttp.TCPConnector(limit=limit), aiohttp.ClientTimeout(total=60.0)
    headers = {"Authorization": f"ApiKey {UPSTREAM_API_KEY}"}
    session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers)
    async with session:
        servicer = BaselineServicer(status, upstream.rstrip("/") + RUN_PATH, session)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ToolServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()  # until SIGTERM ends the process


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="base URL of the stand-in upstream")
    parser.add_argument("--status-file", type=Path, help="a serialized GetStatusResponse")
    parser.add_argument("--connections", type=int, default=1000, help="upstream connections")
    args = parser.parse_args()
    reply = pb.GetStatusResponse(enabled=True)
    if args.status_file is not None:
        reply.ParseFromString(args.status_file.read_bytes())
    uvloop.run(serve(args.port, reply, args.upstream, args.connections))
