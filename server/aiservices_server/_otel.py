"""The OpenTelemetry SDK behind `tracing.Tracer`: imported only by `tracing.from_environment`,
when the variables ask for traces (the `otel` extra)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace import Span as ApiSpan

from aiservices_server import __version__
from aiservices_server.tracing import Attributes, Span, Tracer

_HEX = frozenset("0123456789abcdef")


def parent_context(traceparent: str | None) -> Context | None:
    """The context a W3C traceparent names (version 00, as `core.headers.traceparent_in` has
    checked it); None (a new trace) for anything else. Read here, not by a propagator, so no
    global context is involved."""
    if traceparent is None or len(traceparent) != 55:
        return None
    parts = traceparent.split("-")
    if len(parts) != 4 or parts[0] != "00" or not _HEX.issuperset("".join(parts[1:])):
        return None
    trace_id, span_id, flags = (int(part, 16) for part in parts[1:])
    if not trace_id or not span_id:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))
    return set_span_in_context(NonRecordingSpan(context))


class _SpanOf(Span):
    """An SDK span behind the facade."""

    __slots__ = ("_span",)
    recording = True

    def __init__(self, span: ApiSpan) -> None:
        self._span = span

    def traceparent(self, fallback: str | None) -> str | None:
        context = self._span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    def ids(self) -> tuple[str, str] | None:
        context = self._span.get_span_context()
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def set(self, attributes: Attributes) -> None:
        self._span.set_attributes(attributes)

    def rename(self, name: str) -> None:
        self._span.update_name(name)

    def end(self, error_type: str | None = None) -> None:
        if error_type is not None:
            self._span.set_attribute("error.type", error_type)
            self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of every export that failed (dropped)."""

    def __init__(self, inner: SpanExporter, done: Callable[[int, bool], None]) -> None:
        self._inner = inner
        self._done = done

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        finally:
            self._done(len(spans), result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _BoundedProcessor(SpanProcessor):
    """A BatchSpanProcessor that is never handed more than `max_queue` spans not yet exported:
    one more is dropped and counted here (the batch processor would drop one silently)."""

    def __init__(self, exporter: SpanExporter, max_queue: int, on_dropped: Callable[[int], None]):
        self._lock = threading.Lock()
        self._pending = 0
        self._max_queue = max_queue
        self._on_dropped = on_dropped
        self._batch = BatchSpanProcessor(
            _CountingExporter(exporter, self._exported), max_queue_size=max_queue
        )

    def _exported(self, count: int, ok: bool) -> None:
        with self._lock:
            self._pending = max(0, self._pending - count)
        if not ok:
            self._on_dropped(count)

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return  # recorded but not sampled: the batch processor would never export it
        with self._lock:
            full = self._pending >= self._max_queue
            if not full:
                self._pending += 1
        if full:
            self._on_dropped(1)
            return
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


def _exporter(protocol: str) -> SpanExporter:
    """The OTLP exporter for `protocol` (`grpc`, or `http/protobuf`), configured by the
    standard variables (endpoint, headers, timeout, TLS)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcSpanExporter,  # only when asked for: it loads grpc's sync API
        )

        return GrpcSpanExporter()
    return OTLPSpanExporter()


class SdkTracer(Tracer):
    """Spans of the SDK, exported over OTLP (HTTP or gRPC) as the standard variables say."""

    enabled = True

    def __init__(
        self,
        service_name: str,
        protocol: str,
        max_queue: int,
        on_dropped: Callable[[int], None],
    ) -> None:
        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        # OTEL_TRACES_SAMPLER(_ARG). No shutdown at exit: `tracing.shutdown_within` bounds it,
        # and the SDK's own would wait for a collector that never answers.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_span_processor(
            _BoundedProcessor(_exporter(protocol), max_queue, on_dropped)
        )
        self._tracer = self._provider.get_tracer("aiservices_server", __version__)

    def server(self, name: str, parent: str | None, attributes: Attributes) -> Span:
        return _SpanOf(
            self._tracer.start_span(
                name, parent_context(parent), SpanKind.SERVER, attributes=attributes
            )
        )

    def child(self, name: str, parent: str | None, attributes: Attributes, *, client: bool) -> Span:
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return _SpanOf(
            self._tracer.start_span(name, parent_context(parent), kind, attributes=attributes)
        )

    def shutdown(self, timeout: float) -> None:
        self._provider.force_flush(int(timeout * 1000))
        self._provider.shutdown()
