"""Assembles the server from settings and injected parts, and runs its lifecycle."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import httpx
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aiservices.v1 import tool_service_pb2 as pb
from aiservices_server.auth import KeysFileError, KeyStore
from aiservices_server.auth.reload import KeysReloader
from aiservices_server.config import (
    ENV_PREFIX,
    AuthMode,
    EventLoop,
    Settings,
    UpstreamKind,
    split_host_port,
)
from aiservices_server.core.auth import Authenticator
from aiservices_server.core.drain import Drain
from aiservices_server.core.gate import CallGate
from aiservices_server.core.limits import RateLimits
from aiservices_server.core.service import ToolService, ToolSet
from aiservices_server.faces.envelope import Envelope
from aiservices_server.faces.grpc.auth import AuthenticationInterceptor
from aiservices_server.faces.grpc.convert import tool_message
from aiservices_server.faces.grpc.handlers import generic_handler
from aiservices_server.faces.grpc.outermost import OutermostInterceptor
from aiservices_server.faces.grpc.servicer import ToolServicer
from aiservices_server.filereload import FileState, file_state
from aiservices_server.logs import LineSampler
from aiservices_server.metrics import METRICS_MAX_CONNECTIONS, Metrics
from aiservices_server.ratelimit import (
    FailoverRateLimiter,
    RateLimit,
    RateLimiter,
    limiter_from_url,
)
from aiservices_server.startup import StartupError as StartupError  # noqa: PLC0414 (re-exported)
from aiservices_server.tls import server_credentials
from aiservices_server.tools.base import Tool
from aiservices_server.tools.declared import DeclaredToolSpec, ToolsFileError, load_tools_file
from aiservices_server.tools.declared_tool import DeclaredUpstream, declared_tools
from aiservices_server.tools.plugins import ToolContext, load_plugin_tools
from aiservices_server.tools.refine_prompt import NAME as REFINE_PROMPT_NAME
from aiservices_server.tools.refine_prompt import OUTPUT_SCHEMA, RefinePromptTool
from aiservices_server.tools.reload import ToolsReloader
from aiservices_server.tracing import NO_TRACER, Tracer, from_environment, shutdown_within
from aiservices_server.upstream.agenta import AgentaCompletionClient, AgentaRefiner
from aiservices_server.upstream.chat import OpenAIChat
from aiservices_server.upstream.http import UpstreamLimits, build_http_transport
from aiservices_server.upstream.openai import OpenAIRefiner
from aiservices_server.upstream.refiner import Refiner

if TYPE_CHECKING:
    from aiservices_server.faces.mcp.face import McpFace
    from aiservices_server.faces.mcp.listener import McpListener

log = logging.getLogger("aiservices.server")

T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ToolService"].full_name
# The health of the rate limiter's store (see AiServicesServer.report_rate_limit_store).
RATE_LIMIT_HEALTH = "aiservices.ratelimit"


DRAINING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: EventLoop) -> T:
    """Run `main` on the configured event loop implementation."""
    if event_loop is EventLoop.UVLOOP:
        return uvloop.run(main)
    return asyncio.run(main)


def load_keys(settings: Settings) -> KeyStore | None:
    """The key store, or None when authentication is disabled (which the settings allow only
    with every listener that serves tools on loopback)."""
    if settings.auth is AuthMode.DISABLED:
        log.warning(
            "AUTHENTICATION IS DISABLED: every local caller may call every tool",
            extra={"address": settings.grpc_address, "mcp_address": settings.mcp_address},
        )
        return None
    if settings.api_keys_file is None:
        raise StartupError(
            "AGENTA_AI_SERVICES_API_KEYS_FILE is not set: point it at a keys file "
            "(`aiservices-server keys new --help`), or set AGENTA_AI_SERVICES_AUTH=disabled "
            "for local development"
        )
    try:
        return KeyStore.from_file(settings.api_keys_file)
    except KeysFileError as exc:
        raise StartupError(str(exc)) from None


RESERVED_FILE_DESCRIPTORS = 128
"""Beyond the connection caps: listeners, Redis, metrics scrapes, files read, logs, and grpc's
and the event loop's own."""


def check_file_descriptors(settings: Settings) -> None:
    """Raise the soft limit on open files to the hard one, and check that every connection the
    caps allow, plus the upstream pool and a reserve, fits under it: connections coming in must
    never take the descriptors the upstream needs. StartupError when the caps do not fit."""
    parts = {
        "GRPC_MAX_CONNECTIONS": settings.grpc_max_connections,
        "MCP_MAX_CONNECTIONS": settings.mcp_max_connections if settings.mcp_address else 0,
        "UPSTREAM_MAX_CONNECTIONS": settings.upstream_max_connections,
        "metrics": METRICS_MAX_CONNECTIONS if settings.metrics_address else 0,
        "reserve": RESERVED_FILE_DESCRIPTORS,
    }
    needed = sum(parts.values())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is no soft one a system takes (Linux stops at fs.nr_open, macOS at
    # OPEN_MAX): then what the caps need is asked for.
    for wanted in (hard, needed):
        if soft == resource.RLIM_INFINITY or wanted <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            continue
        soft = wanted
        break
    if soft != resource.RLIM_INFINITY and needed > soft:
        terms = " + ".join(f"{value} ({name})" for name, value in parts.items() if value)
        raise StartupError(
            f"the open-file limit ({soft}; raise it with `ulimit -n` or LimitNOFILE=) is below "
            f"what the connection caps need: {terms} = {needed}; lower the AGENTA_AI_SERVICES_ "
            "caps or raise the limit"
        )


def ensure_bindable(address: str, setting: str, *, reuse_port: bool = False) -> None:
    """Fail with one line naming the setting before grpc logs its own multi-line bind error.
    `reuse_port`: the port is shared with the other workers (SO_REUSEPORT)."""
    host, port = split_host_port(address)
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"invalid setting AGENTA_AI_SERVICES_{setting}: cannot listen on {address}: "
                f"{exc.strerror}"
            ) from None


def check_listeners(settings: Settings, *, reuse_port: bool = False) -> None:
    """Before anything is read or built: the connection caps fit the open-file limit, and every
    configured address can be listened on."""
    check_file_descriptors(settings)
    ensure_bindable(settings.grpc_address, "GRPC_ADDRESS", reuse_port=reuse_port)
    if settings.metrics_address is not None:
        ensure_bindable(settings.metrics_address, "METRICS_ADDRESS")
    if settings.mcp_address is not None:
        ensure_bindable(settings.mcp_address, "MCP_ADDRESS", reuse_port=reuse_port)


def listen_grpc(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind `server` to GRPC_ADDRESS (TLS with `credentials`, plaintext without); the port."""
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        raise StartupError(
            f"invalid setting AGENTA_AI_SERVICES_GRPC_ADDRESS: cannot listen on {address}"
        ) from None


def build_refiner(
    settings: Settings,
    transport: httpx.AsyncBaseTransport,
    metrics: Metrics,
    tracer: Tracer = NO_TRACER,
) -> Refiner:
    """The adapter of the upstream the settings choose (complete: see `upstream_enabled`)."""
    limits = upstream_limits(settings, metrics, tracer)
    if settings.upstream is UpstreamKind.OPENAI:
        assert settings.openai_base_url and settings.openai_model
        key = settings.openai_api_key
        return OpenAIRefiner(
            transport,
            limits,
            base_url=settings.openai_base_url,
            model=settings.openai_model.strip(),
            output_schema=OUTPUT_SCHEMA,
            api_key=key.get_secret_value() if key else None,
            temperature=settings.openai_temperature,
            max_tokens=settings.openai_max_tokens,
        )
    client = agenta_client(settings, transport, limits)
    return AgentaRefiner(client, app=str(settings.refine_prompt_key).strip())


def upstream_limits(
    settings: Settings, metrics: Metrics, tracer: Tracer = NO_TRACER
) -> UpstreamLimits:
    """The bounds of every upstream request, whichever tool makes it; each attempt is counted
    in `metrics` and, when traces are on, is a client span of `tracer`."""
    return UpstreamLimits(
        timeout=settings.upstream_timeout,
        max_retries=settings.upstream_retries,
        max_reply_bytes=settings.upstream_max_reply_bytes,
        observer=metrics.upstream_request,
        tracer=tracer,
    )


def agenta_client(
    settings: Settings, transport: httpx.AsyncBaseTransport, limits: UpstreamLimits
) -> AgentaCompletionClient:
    """The Agenta completion runner the settings name (complete: see `upstream_enabled`)."""
    assert settings.api_key and settings.api_url
    return AgentaCompletionClient(
        transport,
        limits,
        base_url=settings.api_url,
        api_key=settings.api_key.get_secret_value(),
        environment=str(settings.environment_slug).strip(),
    )


def build_tools(
    settings: Settings,
    transport: httpx.AsyncBaseTransport,
    metrics: Metrics,
    tracer: Tracer = NO_TRACER,
) -> list[Tool]:
    """refine_prompt when the upstream is configured, and the tools of the plugins (loaded
    either way, so a broken plugin stops start-up whatever the upstream settings)."""
    enabled = settings.upstream_enabled
    refiner = build_refiner(settings, transport, metrics, tracer) if enabled else None
    built: list[Tool] = [] if refiner is None else [RefinePromptTool(refiner)]
    return [*built, *build_plugin_tools(settings, transport, metrics, refiner, tracer)]


def build_plugin_tools(
    settings: Settings,
    transport: httpx.AsyncBaseTransport,
    metrics: Metrics,
    refiner: Refiner | None,
    tracer: Tracer = NO_TRACER,
) -> list[Tool]:
    """The tools of the plugins PLUGINS selects, each factory given what a tool may use: the
    shared transport, the upstream limits, the refine port and its own settings from the
    environment. PluginError (a StartupError, one line naming the plugin) when one fails."""
    context = ToolContext(
        plugin="",
        transport=transport,
        limits=upstream_limits(settings, metrics, tracer),
        upstream=settings.upstream.value if settings.upstream_enabled else "",
        refiner=refiner,
    )
    return load_plugin_tools(
        context, selected=settings.plugins, environ=os.environ, reserved_names=BUILT_IN_TOOL_NAMES
    )


BUILT_IN_TOOL_NAMES = frozenset({REFINE_PROMPT_NAME})
"""Names no declared tool may take, whether or not the built-in tools are served."""


def load_declared_tools(
    settings: Settings, reserved_names: frozenset[str]
) -> tuple[DeclaredToolSpec, ...]:
    """The tools TOOLS_FILE declares (none when it is unset); StartupError, the loader's one
    line naming the file, the tool and the field, for a file that does not load."""
    if settings.tools_file is None:
        return ()
    try:
        return load_tools_file(settings.tools_file, reserved_names=reserved_names)
    except ToolsFileError as exc:
        raise StartupError(str(exc)) from None


def build_declared_upstream(
    settings: Settings,
    transport: httpx.AsyncBaseTransport,
    metrics: Metrics,
    tracer: Tracer = NO_TRACER,
) -> DeclaredUpstream | None:
    """What declared tools ask through, made once and kept across reloads of the tools file
    (so what it learned of the endpoint, such as a model's response-format verdict, stays);
    None when the upstream is not configured. It shares `transport` and the upstream limits
    with refine_prompt."""
    if not settings.upstream_enabled:
        return None
    limits = upstream_limits(settings, metrics, tracer)
    if settings.upstream is UpstreamKind.OPENAI:
        assert settings.openai_base_url and settings.openai_model
        key = settings.openai_api_key
        chat = OpenAIChat(
            transport,
            limits,
            base_url=settings.openai_base_url,
            model=settings.openai_model.strip(),
            api_key=key.get_secret_value() if key else None,
            temperature=settings.openai_temperature,
            max_tokens=settings.openai_max_tokens,
        )
        return DeclaredUpstream(settings.upstream.value, chat=chat)
    apps = agenta_client(settings, transport, limits)
    return DeclaredUpstream(settings.upstream.value, apps=apps)


def build_declared_tools(
    specs: Sequence[DeclaredToolSpec], upstream: DeclaredUpstream | None
) -> list[Tool]:
    """The declared tools `upstream` serves, made from their specs; at start-up and at each
    reload of the tools file. A spec with nothing for the configured upstream (no `messages`
    for openai, no `agenta_app` for agenta) is left out, with one line saying so."""
    if upstream is None or not specs:
        return []
    tools, left_out = declared_tools(specs, upstream)
    for tool in left_out:
        log.warning(
            "declared tool not served",
            extra={"tool": tool.name, "reason": tool.reason, "upstream": upstream.name},
        )
    return list(tools)


def check_status_fits(tools: Sequence[Tool], max_reply_bytes: int) -> None:
    """GetStatus answers with every tool a caller may see in one message: ValueError when all
    their definitions together would not fit in one this server may send (MAX_MESSAGE_BYTES),
    which would fail GetStatus for every caller allowed them all."""
    size = pb.GetStatusResponse(tools=[tool_message(t.definition) for t in tools]).ByteSize()
    if size > max_reply_bytes:
        raise ValueError(
            f"its tools' definitions take {size} bytes together, over the {max_reply_bytes} "
            f"a GetStatus reply may hold ({ENV_PREFIX}MAX_MESSAGE_BYTES)"
        )


def grpc_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC listener's bounds: message sizes, connections, how long each may live, and how
    it pings its clients and lets them ping it."""
    milliseconds = {
        "grpc.server_handshake_timeout_ms": settings.grpc_handshake_timeout,
        "grpc.max_connection_idle_ms": settings.grpc_idle_timeout,
        "grpc.max_connection_age_ms": settings.grpc_max_connection_age,
        "grpc.max_connection_age_grace_ms": settings.grpc_max_connection_age_grace,
        "grpc.keepalive_time_ms": settings.grpc_keepalive_time,
        "grpc.keepalive_timeout_ms": settings.grpc_keepalive_timeout,
        "grpc.http2.min_ping_interval_without_data_ms": settings.grpc_min_client_ping_interval,
    }
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", int(reuse_port)),  # only workers share a port
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams),
        ("grpc.keepalive_permit_without_calls", 1),  # a client's pings are welcome even idle
    ]
    options += [(name, round(seconds * 1000)) for name, seconds in milliseconds.items() if seconds]
    return options


class AiServicesServer:
    """One grpc.aio server with the ToolService, health and reflection.

    The parts a test or an embedding program may want to inject: `tools` (instead of those the
    settings enable), `limiter` (instead of the one REDIS_URL selects; the server then neither
    starts nor closes it) and `unauthenticated_lines` (which access lines of UNAUTHENTICATED
    calls are written; default 10 a second). `reuse_port`: a worker, listening on ports the
    other workers listen on too (SO_REUSEPORT), the kernel spreading connections over them.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tools: Sequence[Tool] | None = None,
        limiter: RateLimiter | None = None,
        unauthenticated_lines: LineSampler | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self._http: httpx.AsyncBaseTransport | None = None
        self._tools = tools
        self._limiter = limiter
        self._owns_limiter = limiter is None
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.metrics = Metrics()
        # Traces, when the OTEL_* variables ask for them (tracing.from_environment).
        self.tracer = from_environment(os.environ, on_dropped=self.metrics.spans_dropped.inc)
        self._drain = Drain()
        self._signalled = asyncio.Event()
        self._handling_signals = False
        self._envelope = Envelope(
            self.metrics,
            self._drain,
            unauthenticated_lines=unauthenticated_lines,
            tracer=self.tracer,
        )
        self._outermost = OutermostInterceptor(self._envelope)
        self._unauthenticated_lines = self._envelope.unauthenticated_lines
        self._mcp: McpListener | None = None
        self._mcp_face: McpFace | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.mcp_port: int | None = None
        self._keys_reloader: KeysReloader | None = None
        self._tools_reloader: ToolsReloader[ToolSet] | None = None
        self._refusal_lines: list[LineSampler] = []
        self._nothing_to_reload = LineSampler(
            lambda left_out: log.info(
                "nothing to reload: authentication is disabled", extra={"signals": left_out}
            ),
            per_second=1 / 60,
            burst=1,
            summary_every=60.0,
        )

    def _build_service(self, settings: Settings, limiter: RateLimiter) -> ToolService:
        metrics = self.metrics
        declare: Callable[[Sequence[DeclaredToolSpec]], list[Tool]]
        if self._tools is not None:
            built = list(self._tools)
            declare = lambda specs: []  # noqa: E731 (injected tools only)
        else:
            http = self._http = build_http_transport(
                max_connections=settings.upstream_max_connections
            )
            tracer = self.tracer
            built = build_tools(settings, http, metrics, tracer)
            upstream = build_declared_upstream(settings, http, metrics, tracer)
            declare = lambda specs: build_declared_tools(specs, upstream)  # noqa: E731
        reserved = BUILT_IN_TOOL_NAMES | {tool.definition.name for tool in built}
        # Taken before the file is read, so a change made while it loads is not missed.
        tools_state = file_state(settings.tools_file) if settings.tools_file else None
        declared = load_declared_tools(settings, reserved)
        tools = [*built, *declare(declared)]
        try:
            check_status_fits(tools, settings.max_message_bytes)
        except ValueError as exc:
            raise StartupError(f"invalid setting {ENV_PREFIX}TOOLS_FILE: {exc}") from None
        gate = CallGate(
            settings.max_concurrent_calls,
            max_wait=settings.queue_timeout,
            on_refusal=metrics.overloaded.inc,
        )
        metrics.in_flight.set_function(lambda: gate.in_flight)
        metrics.in_flight_limit.set(settings.max_concurrent_calls)
        default_limit = RateLimit(
            burst=settings.rate_limit_burst, per_minute=settings.rate_limit_per_minute
        )
        service = ToolService(
            tools,
            enabled=settings.upstream_enabled,
            limits=RateLimits(limiter, default_limit, metrics),
            gate=gate,
            upstream=settings.upstream.value if self._tools is None else "",
        )
        if settings.tools_file is not None:
            self._tools_reloader = self._tools_file_reloader(
                settings.tools_file,
                service,
                built,
                declare,
                declared,
                tools_state,
                reserved,
                settings.max_message_bytes,
            )
        return service

    @staticmethod
    def _tools_file_reloader(
        path: Path,
        service: ToolService,
        built: list[Tool],
        declare: Callable[[Sequence[DeclaredToolSpec]], list[Tool]],
        declared: tuple[DeclaredToolSpec, ...],
        state: FileState | None,
        reserved: frozenset[str],
        max_reply_bytes: int,
    ) -> ToolsReloader[ToolSet]:
        """The reloader that has the core serve each version of the tools file that loads, in
        one swap of its whole tool set (the other tools stay as they are). The set is made, and
        its schemas compiled, off the event loop."""

        def prepare(specs: tuple[DeclaredToolSpec, ...]) -> ToolSet:
            try:
                tools = [*built, *declare(specs)]
                check_status_fits(tools, max_reply_bytes)
                return ToolSet(tools)
            except ValueError as exc:
                raise ToolsFileError(path, f"cannot serve its tools ({exc})") from None

        return ToolsReloader(
            path,
            prepare,
            service.use_tools,
            specs=declared,
            state=state,
            reserved_names=reserved,
        )

    async def start(self) -> int:
        """Check the settings and the files they name, build the service and its listeners,
        start them and say "serving"; returns the gRPC port. StartupError, in one line naming
        the setting, for what cannot be served."""
        settings = self.settings
        check_listeners(settings, reuse_port=self.reuse_port)
        # Taken before the file is read, so a change made while it loads is not missed.
        keys_state = file_state(settings.api_keys_file) if settings.api_keys_file else None
        keys = load_keys(settings)
        credentials = server_credentials(settings)
        service = self._build_service(settings, self._build_limiter(settings))
        authenticator = self._build_authenticator(settings, keys, keys_state)
        server = self._build_grpc_server(settings, service, authenticator)
        self.port = listen_grpc(server, settings.grpc_address, credentials)
        if settings.metrics_address is not None:
            self._start_metrics(settings.metrics_address)
        if settings.mcp_address is not None:
            await self._start_mcp(settings, service, authenticator)
        await self._start_serving(server)
        self._report_serving(settings, keys, tls=credentials is not None)
        return self.port

    def _build_limiter(self, settings: Settings) -> RateLimiter:
        """The injected limiter, or the one REDIS_URL selects (in memory without it)."""
        if self._limiter is None:
            url = settings.redis_url.get_secret_value() if settings.redis_url else None
            self._limiter = limiter_from_url(
                url,
                on_fallback=self.metrics.redis_fallbacks.inc,
                on_state_change=self.report_rate_limit_store,
                timeout=settings.redis_timeout,
                connect_timeout=settings.redis_connect_timeout,
            )
        return self._limiter

    def _build_authenticator(
        self, settings: Settings, keys: KeyStore | None, keys_state: FileState | None
    ) -> Authenticator:
        """Who calls, for every face; with a keys file, the reloader that swaps its keys."""
        authenticator = Authenticator(keys, self.metrics)
        if keys is not None and settings.api_keys_file is not None:
            self._keys_reloader = KeysReloader(
                settings.api_keys_file, authenticator.use_keys, keys=keys, state=keys_state
            )
        return authenticator

    def _build_grpc_server(
        self, settings: Settings, service: ToolService, authenticator: Authenticator
    ) -> grpc.aio.Server:
        """The gRPC server with the ToolService behind its interceptors, health and (when the
        settings say so) reflection; not listening yet."""
        servicer = ToolServicer(
            service,
            log_payloads=settings.log_payloads,
            max_reply_bytes=settings.max_message_bytes,
            tracer=self.tracer,
        )
        server = grpc.aio.server(options=grpc_options(settings, reuse_port=self.reuse_port))
        authentication = AuthenticationInterceptor(authenticator)
        server.add_generic_rpc_handlers(
            [generic_handler(SERVICE_NAME, servicer.methods(), self._outermost, [authentication])]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if settings.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        return server

    async def _start_serving(self, server: grpc.aio.Server) -> None:
        """Start gRPC, report SERVING, and start watching the rate-limit store and the keys."""
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._start_rate_limit_store()
        if self._keys_reloader is not None:
            self._keys_reloader.start()
        if self._tools_reloader is not None:
            self._tools_reloader.start()

    def _report_serving(self, settings: Settings, keys: KeyStore | None, *, tls: bool) -> None:
        log.info(
            "serving",
            extra={
                "address": settings.grpc_address,
                "port": self.port,
                "enabled": settings.upstream_enabled,
                "upstream": settings.upstream.value,
                "reflection": settings.reflection,
                "tls": tls,
                "mtls": settings.tls_client_ca_file is not None,
                "keys": len(keys) if keys is not None else 0,
                "redis": settings.redis_url is not None,
                "metrics_port": self.metrics_port,
                "mcp_port": self.mcp_port,
                "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            },
        )

    def _start_metrics(self, address: str) -> None:
        """Prometheus metrics on `address`, served from a thread of their own."""
        refused = self._refused_connection("metrics")
        loop = asyncio.get_running_loop()

        def refused_in_thread() -> None:
            loop.call_soon_threadsafe(refused)

        try:
            self.metrics_port = self.metrics.serve(
                *split_host_port(address),
                on_refused=refused_in_thread,
                serving=lambda: not self._drain.draining,
            )
        except OSError as exc:
            raise StartupError(
                f"invalid setting AGENTA_AI_SERVICES_METRICS_ADDRESS: cannot listen on "
                f"{address}: {exc.strerror}"
            ) from None

    async def _start_mcp(
        self, settings: Settings, service: ToolService, authenticator: Authenticator
    ) -> None:
        """MCP on MCP_ADDRESS, over the same core, drained with gRPC; HTTPS with the server's
        TLS settings when they are set."""
        # Imported only when MCP is on: the SDK and uvicorn take about 30 MB in every replica.
        from aiservices_server.faces.mcp.face import McpFace  # noqa: PLC0415
        from aiservices_server.faces.mcp.listener import (  # noqa: PLC0415
            ConnectionBounds,
            McpListener,
        )
        from aiservices_server.faces.mcp.origins import OriginPolicy  # noqa: PLC0415

        host, port = settings.mcp_host_port or ("127.0.0.1", 0)

        def origins(port: int) -> OriginPolicy:
            return OriginPolicy.for_listener(
                host,
                port,
                hosts=settings.mcp_allowed_hosts,
                origins=settings.mcp_allowed_origins,
            )

        face = McpFace(
            service,
            authenticator,
            self._envelope,
            max_body_bytes=settings.max_message_bytes,
            body_timeout=settings.mcp_body_timeout,
            origins=origins(port),
            log_payloads=settings.log_payloads,
        )
        certificate = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            certificate = (settings.tls_cert_file, settings.tls_key_file)
        bounds = ConnectionBounds(
            header_timeout=settings.mcp_header_timeout,
            idle_timeout=settings.mcp_idle_timeout,
            max_connections=settings.mcp_max_connections,
            on_refused=self._refused_connection("mcp"),
        )
        listener = McpListener(
            face,
            host,
            port,
            bounds,
            certificate=certificate,
            client_ca=settings.tls_client_ca_file,
            reuse_port=self.reuse_port,
        )
        await face.start()
        self._mcp_face = face
        try:
            self.mcp_port = await listener.start()
        except (OSError, SystemExit):
            raise StartupError(
                f"invalid setting AGENTA_AI_SERVICES_MCP_ADDRESS: cannot listen on "
                f"{settings.mcp_address}"
            ) from None
        face.origins = origins(self.mcp_port)  # port 0 became a port
        self._mcp = listener

    def _refused_connection(self, listener: str) -> Callable[[], None]:
        """What a listener calls when its cap closes a connection: a count, and a line at most
        once a second (with how many were left out since)."""
        counter = self.metrics.connections_refused.labels(listener)
        lines = LineSampler(
            lambda left_out: log.warning(
                "connections refused: too many open",
                extra={"listener": listener, "refused": left_out},
            ),
            per_second=1.0,
            burst=1,
            summary_every=10.0,
        )
        self._refusal_lines.append(lines)

        def refused() -> None:
            counter.inc()
            if lines.admit():
                log.warning(
                    "connection refused: too many open", extra={"listener": listener, "refused": 1}
                )

        return refused

    async def _start_rate_limit_store(self) -> None:
        """Report the store's state and start watching it (only a limiter this server built
        reports to it; the limiter's close() at stop ends the watcher)."""
        limiter = self._limiter
        if isinstance(limiter, FailoverRateLimiter) and self._owns_limiter:
            await self.report_rate_limit_store(limiter.store_up)
            limiter.start()
        else:
            await self.report_rate_limit_store(True)

    async def report_rate_limit_store(self, up: bool) -> None:
        """Publish whether rate-limit decisions come from the shared store (Redis): the gauge
        `aiservices_rate_limit_store_up` and the health of `RATE_LIMIT_HEALTH`.

        The store has a health name of its own, SERVING while Redis decides calls and
        NOT_SERVING while they fail open to memory (and until the first check has passed).
        "" and the ToolService stay SERVING meanwhile: failing open is by design, so a balancer
        must not take a replica out of rotation for it. The name is not a gRPC service (no
        `aiservices.v1.` prefix), so it cannot be mistaken for the readiness of one. Without
        Redis the in-memory limiter is the store: SERVING.
        """
        self.metrics.rate_limit_store_up.set(1 if up else 0)
        status = health_pb2.HealthCheckResponse
        await self.health.set(RATE_LIMIT_HEALTH, status.SERVING if up else status.NOT_SERVING)

    def reload_keys(self) -> None:
        """Reload the keys file and the tools file soon (SIGHUP). With authentication disabled
        there is no keys file; during start-up there is nothing to do: start() reads the files
        as they are then."""
        if self._tools_reloader is not None:
            self._tools_reloader.request("sighup")
        if self.settings.auth is AuthMode.DISABLED:
            if self.settings.tools_file is None and self._nothing_to_reload.admit():
                log.info("nothing to reload: authentication is disabled", extra={"signals": 1})
        elif self._keys_reloader is not None:
            self._keys_reloader.request("sighup")

    def stop_soon(self) -> None:
        """Drain and stop, as on SIGTERM (`serve_until_signalled` returns once stopped)."""
        self._signalled.set()

    def handle_signals(self) -> None:
        """From now on SIGINT, SIGTERM and SIGQUIT drain the server (see
        `serve_until_signalled`), SIGHUP reloads the keys file, and SIGUSR1, SIGUSR2 and SIGALRM
        are ignored. Called before `start()`, so a signal sent during start-up, or as soon as
        the "serving" line is out, is answered as documented instead of ending the process with
        the signal's default action."""
        loop = asyncio.get_running_loop()
        for signum in DRAINING_SIGNALS:
            loop.add_signal_handler(signum, self._signalled.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        self._handling_signals = True

    async def serve_until_signalled(self) -> None:
        """Run until SIGINT or SIGTERM, then drain and stop; a second signal stops at once.
        SIGHUP reloads the keys file meanwhile."""
        if not self._handling_signals:
            self.handle_signals()
        signalled = self._signalled
        await signalled.wait()
        signalled.clear()
        log.info("draining", extra={"grace_seconds": self.settings.shutdown_grace})
        stopping = asyncio.ensure_future(self.stop())
        again = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({stopping, again}, return_when=asyncio.FIRST_COMPLETED)
        if again.done() and not stopping.done():
            log.warning("second signal: calls still in flight are cancelled now")
            self._drain.hurry()
        again.cancel()
        await stopping

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls, let calls in flight finish, close."""
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        if self._keys_reloader is not None:
            await self._keys_reloader.stop()
        if self._tools_reloader is not None:
            await self._tools_reloader.stop()
        if self._server is not None:
            drain = self._drain
            in_flight = drain.in_flight
            if not await drain.drain(grace):
                log.warning(
                    "calls still in flight after the grace period are cancelled",
                    extra={"in_flight": drain.in_flight, "grace_seconds": grace},
                )
            elif in_flight:
                log.info("drained", extra={"finished_calls": in_flight})
            left = 0.0 if drain.hurried else max(0.0, deadline - time.monotonic())
            if self._mcp is not None:
                await self._mcp.stop(left)
            await self._server.stop(left)
        if self._http is not None:
            await self._http.aclose()
        if self._owns_limiter and self._limiter is not None:
            await self._limiter.close()
        if self._mcp_face is not None:
            await self._mcp_face.stop()
        self._unauthenticated_lines.flush()
        for lines in (*self._refusal_lines, self._nothing_to_reload):
            lines.flush()
        # Spans still queued go out within what is left of the grace period (a second at least).
        shutdown_within(self.tracer, max(1.0, deadline - time.monotonic()))
        self.metrics.close()
        log.info("stopped")
