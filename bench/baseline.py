"""The baselines: a bare grpc.aio server for the same proto, with trivial handlers.

``python -m bench.baseline [--status-file F] [--upstream URL] [--client aiohttp|service]
[--loop uvloop|asyncio]`` listens on 127.0.0.1 (a free port, printed as one JSON line
``{"port": N}`` on stdout) until SIGTERM or SIGINT.

- GetStatus and ListTools answer a message built once at start: the real server's GetStatus
  reply read from ``--status-file`` (so both servers put the same bytes on the wire), or
  ``enabled: true`` alone. No interceptors, no logging, no metrics.
- CallTool does the least a refine_prompt call needs: one POST with a plain aiohttp session to
  the upstream (the same body and header the real service sends), parse the reply, return the
  summary and the refined messages. No schema checks, no rate limit, no auth.
- It runs on the event loop the real server runs on (``--loop``, the server's EVENT_LOOP), so
  the comparison is of the service's own work, not of event loops.
- With ``--floor KEYS_FILE`` every call first goes through the floor interceptor
  (``bench/floor.py``): the least authentication, rate limiting, metrics and an access line
  can cost, against the keys file the real server uses.
- With ``--client service`` CallTool makes that POST through the service's own upstream client
  instead (``AgentaCompletionClient`` on httpx over aiohttp): the difference between the two
  baselines is what the HTTP client layer costs, apart from everything else the service does.
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
import httpx
import uvloop
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

from bench.common import ENVIRONMENT_SLUG, REFINE_PROMPT_KEY, UPSTREAM_API_KEY
from bench.floor import FloorInterceptor
from server.upstream.agenta import AgentaCompletionClient, UpstreamError
from server.upstream.http import build_http_transport

RUN_PATH = "/services/completion/run"
MAX_CONNECTIONS = 1000
TIMEOUT_S = 60.0
CLIENTS = ("aiohttp", "service")
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class BaselineServicer(pb_grpc.ToolServiceServicer):
    def __init__(
        self, status: pb.GetStatusResponse, upstream: str | None, client: str = "aiohttp"
    ) -> None:
        self._status = status
        self._tools = pb.ListToolsResponse(tools=status.tools)
        self._upstream = upstream
        self._url = None if upstream is None else upstream.rstrip("/") + RUN_PATH
        self._client = client
        self._session: aiohttp.ClientSession | None = None
        self._service_client: AgentaCompletionClient | None = None
        self._transport: httpx.AsyncBaseTransport | None = None

    async def start(self) -> None:
        if self._upstream is None:
            return
        if self._client == "service":
            self._transport = build_http_transport(max_connections=MAX_CONNECTIONS)
            self._service_client = AgentaCompletionClient(
                self._transport,
                base_url=self._upstream,
                api_key=UPSTREAM_API_KEY,
                environment=ENVIRONMENT_SLUG,
                timeout=TIMEOUT_S,
            )
            return
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            headers={"Authorization": f"ApiKey {UPSTREAM_API_KEY}"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._transport is not None:
            await self._transport.aclose()

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
        fields = request.arguments.fields
        inputs = {
            "__ag_prompt_template_json": fields["prompt_template_json"].string_value,
            "__ag_guidelines": "",
            "__ag_context": "",
        }
        if self._service_client is not None:
            try:
                reply = await self._service_client.run(REFINE_PROMPT_KEY, inputs)
            except UpstreamError as error:
                return _upstream_failed(error.message)
            return _refined(reply.data, reply.trace_id)
        if self._session is None or self._url is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no upstream")
            raise AssertionError("unreachable")
        body = {"inputs": inputs, "environment": ENVIRONMENT_SLUG, "app": REFINE_PROMPT_KEY}
        async with self._session.post(self._url, json=body) as response:
            status = response.status
            payload = await response.read()
        if status != 200:
            return _upstream_failed(f"upstream HTTP {status}")
        parsed: dict[str, Any] = json.loads(payload)
        return _refined(parsed["data"], str(parsed.get("trace_id") or ""))


def _upstream_failed(text: str) -> pb.CallToolResponse:
    return pb.CallToolResponse(
        is_error=True, content=[pb.ContentBlock(text=pb.TextContent(text=text))]
    )


def _refined(data: Any, trace_id: str) -> pb.CallToolResponse:
    if isinstance(data, str):
        data = json.loads(data)
    structured = struct_pb2.Struct()
    structured.update(data)
    return pb.CallToolResponse(
        content=[pb.ContentBlock(text=pb.TextContent(text=str(data.get("summary") or "")))],
        structured_content=structured,
        meta=pb.CallToolMeta(trace_id=trace_id),
    )


async def serve(
    status: pb.GetStatusResponse, upstream: str | None, client: str, floor: Path | None
) -> None:
    servicer = BaselineServicer(status, upstream, client)
    await servicer.start()
    server = grpc.aio.server(
        interceptors=[] if floor is None else [FloorInterceptor(floor)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
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
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop, as the real server's EVENT_LOOP",
    )
    parser.add_argument(
        "--client", choices=CLIENTS, default="aiohttp", help="how CallTool posts upstream"
    )
    parser.add_argument(
        "--floor", type=Path, metavar="KEYS_FILE", help="add the floor interceptor (bench.floor)"
    )
    args = parser.parse_args(argv)
    status = pb.GetStatusResponse(enabled=True)
    if args.status_file is not None:
        status = pb.GetStatusResponse.FromString(args.status_file.read_bytes())
    main = serve(status, args.upstream, args.client, args.floor)
    if args.loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
    return 0


if __name__ == "__main__":
    sys.exit(main())
