"""OpenTelemetry traces, opt-in through the standard `OTEL_*` variables and free when off.

The faces and the upstream client see only the small facade here, `Tracer` and `Span`, injected
where they are built. Spans are linked by passing a W3C `traceparent` explicitly (the face gives
the server span's to the `Call`, the tool span's goes to the upstream client, the client span's
goes upstream), so no global context is read or set on the hot path.

Off (no `OTEL_EXPORTER_OTLP_ENDPOINT` nor `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): `NO_TRACER`,
whose spans are one shared object whose methods do nothing, and the SDK is never imported. On:
`from_environment` imports the SDK (the `otel` extra) and exports over OTLP through a
`BatchSpanProcessor` whose queue is bounded, in its own thread, so a collector that is down, slow
or refusing costs callers nothing; spans that do not fit the queue, or that the collector
refuses, are counted (`on_dropped`), never retried at a caller's expense.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence

from aiservices_server.startup import StartupError

AttributeValue = str | bool | int | float | Sequence[str]
Attributes = Mapping[str, AttributeValue]

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
DEFAULT_PROTOCOL = "http/protobuf"
PROTOCOLS = (DEFAULT_PROTOCOL, "grpc")
DEFAULT_SERVICE_NAME = "aiservices"
# The SDK's own default, kept explicit: spans waiting for export are bounded whatever the
# collector does (OTEL_BSP_MAX_QUEUE_SIZE may set another bound).
DEFAULT_MAX_QUEUE = 2048
MAX_QUEUE_VARIABLE = "OTEL_BSP_MAX_QUEUE_SIZE"
EXTRA_HINT = "pip install 'aiservices-server[otel]'"


class Span:
    """One span as the server's code sees it; this base is the span of tracing off, whose
    methods do nothing and cost a call."""

    __slots__ = ()
    recording = False

    def traceparent(self, fallback: str | None) -> str | None:
        """The W3C `traceparent` naming this span, to parent the next one on; `fallback` (the
        caller's own, passed on unchanged) when tracing is off."""
        return fallback

    def ids(self) -> tuple[str, str] | None:
        """(trace id, span id) in hex, for the access line; None when tracing is off."""
        return None

    def set(self, attributes: Attributes) -> None:
        """Adds attributes (no prompt text, arguments or keys: sizes and names only)."""

    def rename(self, name: str) -> None:
        """The span's name, once what it is is known (MCP: the method, after the body)."""

    def end(self, error_type: str | None = None) -> None:
        """Ends the span; `error_type` marks it failed, with `error.type` set to it."""


NO_SPAN = Span()


class Tracer:
    """Starts spans; this base is tracing off: every span is NO_SPAN, nothing is imported."""

    enabled = False

    def server(self, name: str, parent: str | None, attributes: Attributes) -> Span:
        """A server span, child of the caller's `parent` traceparent (a new trace if None)."""
        return NO_SPAN

    def child(self, name: str, parent: str | None, attributes: Attributes, *, client: bool) -> Span:
        """A span inside the one `parent` names: internal, or a client span for a request
        this server sends."""
        return NO_SPAN

    def shutdown(self, timeout: float) -> None:
        """Exports what is queued, waiting at most `timeout` seconds."""


NO_TRACER = Tracer()


def configured(environ: Mapping[str, str]) -> bool:
    """Whether the variables ask for traces: an OTLP endpoint is set and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def from_environment(
    environ: Mapping[str, str] | None = None,
    *,
    on_dropped: Callable[[int], None] = lambda count: None,
) -> Tracer:
    """NO_TRACER unless the variables ask for traces; then the SDK's tracer, configured by the
    standard variables (endpoint, headers, timeout, `OTEL_SERVICE_NAME`,
    `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_BSP_*`). StartupError, in one
    line, for a protocol other than http/protobuf or grpc, or when the `otel` extra is not
    installed."""
    environ = os.environ if environ is None else environ
    if not configured(environ):
        return NO_TRACER
    protocol = next(
        (environ[name].strip() for name in PROTOCOL_VARIABLES if environ.get(name, "").strip()),
        DEFAULT_PROTOCOL,
    )
    if protocol not in PROTOCOLS:
        raise StartupError(
            f"invalid setting OTEL_EXPORTER_OTLP_PROTOCOL: {protocol[:40]!r} is not supported; "
            f"use {' or '.join(PROTOCOLS)}"
        )
    try:
        from aiservices_server import _otel  # noqa: PLC0415 (only when traces are asked for)
    except ImportError:
        raise StartupError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed: "
            + EXTRA_HINT
        ) from None
    try:
        return _otel.SdkTracer(DEFAULT_SERVICE_NAME, protocol, _max_queue(environ), on_dropped)
    except ValueError as exc:  # an OTEL_BSP_* or exporter value the SDK refuses
        raise StartupError(f"invalid OpenTelemetry setting: {str(exc)[:200]}") from None


def _max_queue(environ: Mapping[str, str]) -> int:
    """The bound on spans waiting for export: OTEL_BSP_MAX_QUEUE_SIZE, a positive integer."""
    text = environ.get(MAX_QUEUE_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_QUEUE
    if not (text.isascii() and text.isdigit() and 0 < len(text) <= 9 and int(text) > 0):
        raise StartupError(f"invalid setting {MAX_QUEUE_VARIABLE}: expected a positive integer")
    return int(text)


def shutdown_within(tracer: Tracer, timeout: float) -> None:
    """`tracer.shutdown`, in a daemon thread waited for at most `timeout` seconds, so a
    collector that does not answer never holds the server's exit past its grace period."""
    if not tracer.enabled:
        return
    done = threading.Thread(target=tracer.shutdown, args=(timeout,), daemon=True)
    done.start()
    done.join(max(0.0, timeout))
