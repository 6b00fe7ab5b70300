"""Assembles the server from settings and injected parts, and runs its lifecycle."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import httpx
from aiservices.v1 import tool_service_pb2 as pb
from aiservices.v1 import tool_service_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import Settings
from server.service.dispatch import ToolDispatcher
from server.tools.base import Tool
from server.tools.refine_prompt import RefinePromptTool
from server.transport.interceptors.request_context import RequestContextInterceptor
from server.transport.servicer import ToolServicer
from server.upstream.agenta import AgentaCompletionClient
from server.upstream.http import build_http_client

log = logging.getLogger("aiservices.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ToolService"].full_name


class BindError(RuntimeError):
    """The listening address could not be bound."""


def build_tools(settings: Settings, http: httpx.AsyncClient) -> list[Tool]:
    if not settings.upstream_enabled:
        return []
    assert settings.api_key and settings.api_url  # guaranteed by upstream_enabled
    client = AgentaCompletionClient(
        http,
        base_url=settings.api_url,
        api_key=settings.api_key.get_secret_value(),
        environment=str(settings.environment_slug).strip(),
        timeout=settings.upstream_timeout,
    )
    return [RefinePromptTool(client, app=str(settings.refine_prompt_key).strip())]


class AiServicesServer:
    """One grpc.aio server with the ToolService, health and reflection.

    Pass `http_client` to share or inspect the upstream client; otherwise the server makes
    one at start and closes it at stop.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http_client: httpx.AsyncClient | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> None:
        self.settings = settings
        self._http = http_client
        self._owns_http = http_client is None
        self._tools = tools
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        settings = self.settings
        if self._http is None:
            self._http = build_http_client(
                max_connections=settings.upstream_max_connections,
                timeout=settings.upstream_timeout,
            )
        tools = list(self._tools) if self._tools is not None else build_tools(settings, self._http)
        dispatcher = ToolDispatcher(tools, enabled=settings.upstream_enabled)
        server = grpc.aio.server(
            interceptors=[RequestContextInterceptor()],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_ToolServiceServicer_to_server(ToolServicer(dispatcher), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        try:
            self.port = server.add_insecure_port(settings.grpc_address)
        except RuntimeError as exc:
            raise BindError(f"cannot listen on {settings.grpc_address}: {exc}") from None
        await server.start()
        self._server = server
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "address": settings.grpc_address,
                "port": self.port,
                "enabled": settings.upstream_enabled,
                "reflection": settings.reflection,
            },
        )
        return self.port

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let calls in flight finish, close."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace if grace is None else grace)
        if self._owns_http and self._http is not None:
            await self._http.aclose()
        log.info("stopped")
