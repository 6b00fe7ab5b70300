"""A real OTLP trace receiver on 127.0.0.1, for the tracing tests: it takes what an
OpenTelemetry exporter posts to `/v1/traces` (`ExportTraceServiceRequest`, protobuf) and what
one sends to the OTLP/gRPC `TraceService` on another port, decodes it with `opentelemetry-proto`
and keeps each span in a plain form a test can assert on."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

MAX_BODY_BYTES = 16 * 1024 * 1024
# Span kinds as OTLP numbers them.
KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS_ERROR = 2


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return None if kind is None else getattr(value, kind)


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span: ids in hex (parent "" for a root), its kind, attributes, whether its
    status is ERROR, and the attributes of the resource that sent it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict[str, Any]
    error: bool
    resource: dict[str, Any]


class OtlpReceiver:
    """Serves `POST /v1/traces` in a thread, and OTLP/gRPC's `TraceService`; `spans` is
    everything received so far, by either."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                if self.path != "/v1/traces" or not 0 <= length <= MAX_BODY_BYTES:
                    self.send_error(404 if self.path != "/v1/traces" else 413)
                    return
                request = ExportTraceServiceRequest.FromString(self.rfile.read(length))
                receiver._add(request)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Service(TraceServiceServicer):
            def Export(
                self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
            ) -> ExportTraceServiceResponse:
                receiver._add(request)
                return ExportTraceServiceResponse()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._grpc = grpc.server(ThreadPoolExecutor(2))
        add_TraceServiceServicer_to_server(Service(), self._grpc)  # type: ignore[no-untyped-call]
        self._grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def grpc_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to with the `grpc` protocol."""
        return f"http://127.0.0.1:{self._grpc_port}"

    def _add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=KINDS.get(span.kind, "unspecified"),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            error=span.status.code == STATUS_ERROR,
                            resource=resource,
                        )
                    )
        with self._changed:
            self._spans.extend(found)
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(self, count: int, timeout: float = 15.0) -> list[ReceivedSpan]:
        """The spans once at least `count` have arrived; AssertionError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._spans) >= count, timeout):
                raise AssertionError(f"{len(self._spans)} spans arrived, {count} expected")
            return list(self._spans)

    def start(self) -> Self:
        self._thread.start()
        self._grpc.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(None)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
