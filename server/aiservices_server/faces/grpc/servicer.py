"""aiservices.v1.ToolService: protobuf in, calls of the core, protobuf out.

Nothing here decides anything: the core does, and refuses with domain errors that the
outermost interceptor maps to status. A tool that ran but failed is a response with
`is_error`, not a status.
"""

from __future__ import annotations

from typing import Any

from aiservices.v1 import tool_service_pb2 as pb
from aiservices_server.core.service import ToolService
from aiservices_server.faces.definitions import ConvertedDefinitions
from aiservices_server.faces.envelope import ToolOutcome, traced_tool_call
from aiservices_server.faces.grpc.convert import (
    dict_from,
    failure_response,
    result_response,
    tool_message,
)
from aiservices_server.faces.grpc.handlers import Method
from aiservices_server.faces.grpc.rpc import Reply, Rpc
from aiservices_server.tools.base import ToolErrorCode, ToolFailure
from aiservices_server.tracing import NO_TRACER, Tracer


class ToolServicer:
    def __init__(
        self,
        service: ToolService,
        *,
        log_payloads: bool = False,
        max_reply_bytes: int,
        tracer: Tracer = NO_TRACER,
    ) -> None:
        """`max_reply_bytes`: the server's send limit (grpc.max_send_message_length); `tracer`
        runs each tool call in a tool span (`traced_tool_call`)."""
        self._service = service
        self._tracer = tracer
        self._log_payloads = log_payloads
        self._max_reply_bytes = max_reply_bytes
        # Converted once per definition: a reload of the tools file makes new ones.
        self._messages = ConvertedDefinitions(tool_message, service.definitions)

    def methods(self) -> dict[str, Method]:
        """The handler of each ToolService method, by method name."""
        return {
            "GetStatus": Method(pb.GetStatusRequest.FromString, self.get_status),
            "ListTools": Method(pb.ListToolsRequest.FromString, self.list_tools),
            "CallTool": Method(pb.CallToolRequest.FromString, self.call_tool),
        }

    async def get_status(self, request: pb.GetStatusRequest, rpc: Rpc) -> Reply:
        tools = self._service.visible_tools(rpc.call.principal)
        return Reply(
            pb.GetStatusResponse(
                enabled=self._service.enabled,
                tools=[self._messages.form(t) for t in tools],
                upstream=self._service.upstream,
            )
        )

    async def list_tools(self, request: pb.ListToolsRequest, rpc: Rpc) -> Reply:
        page = self._service.list_tools(rpc.call.principal, request.cursor, request.page_size)
        return Reply(
            pb.ListToolsResponse(
                tools=[self._messages.form(t) for t in page.tools], next_cursor=page.next_cursor
            )
        )

    async def call_tool(self, request: pb.CallToolRequest, rpc: Rpc) -> Reply:
        call = rpc.call
        arguments = dict_from(request.arguments)
        payload: dict[str, Any] | None = {"arguments": arguments} if self._log_payloads else None
        try:
            result = await traced_tool_call(
                self._tracer, self._service, call, request.name, arguments
            )
        except ToolFailure as failure:
            return _failed(failure, call.request_id, payload)
        response = result_response(result, call.request_id)
        if (size := response.ByteSize()) > self._max_reply_bytes:
            # grpc would refuse to send it, and the caller would see RESOURCE_EXHAUSTED while
            # the log and metrics said OK: answer with what can be sent, and record that.
            too_large = ToolFailure(
                ToolErrorCode.UPSTREAM_ERROR,
                f"the tool's result is larger than this server may send ({size} bytes, "
                f"limit {self._max_reply_bytes})",
                trace_id=result.trace_id,
                upstream=result.upstream,
                headers=result.headers,
            )
            return _failed(too_large, call.request_id, payload)
        if payload is not None:
            payload["result"] = result.structured
        outcome = ToolOutcome("OK", result.trace_id, result.upstream, payload)
        return Reply(response, result.headers, outcome)


def _failed(failure: ToolFailure, request_id: str, payload: dict[str, Any] | None) -> Reply:
    if payload is not None:
        payload["result"] = failure.message
    outcome = ToolOutcome(failure.code.value, failure.trace_id, failure.upstream, payload)
    return Reply(failure_response(failure, request_id), failure.headers, outcome)
