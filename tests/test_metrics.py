"""The series as Prometheus reads them: the standard per-RPC names, inclusive bucket bounds,
histograms whose count always equals their +Inf bucket, and the process and platform series."""

from __future__ import annotations

import platform
import threading

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiservices_server.metrics import LATENCY_BUCKETS, Metrics

METHOD = "/aiservices.v1.ToolService/GetStatus"
LABELS = {
    "grpc_type": "unary",
    "grpc_service": "aiservices.v1.ToolService",
    "grpc_method": "GetStatus",
}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({**LABELS, **labels}.items())


def test_calls_are_counted_by_code_with_inclusive_bucket_bounds() -> None:
    metrics = Metrics()
    for code, seconds in (("OK", 0.001), ("OK", 0.0011), ("UNAUTHENTICATED", 500.0)):
        metrics.rpc_handled(metrics.rpc_started(METHOD), code, seconds)
    metrics.rpc_started(METHOD)  # still running

    got = samples(metrics)
    assert got[key("grpc_server_started_total")] == 4
    assert got[key("grpc_server_handled_total", grpc_code="OK")] == 2
    assert got[key("grpc_server_handled_total", grpc_code="UNAUTHENTICATED")] == 1
    assert got[key("grpc_server_handling_seconds_bucket", le="0.001")] == 1  # le is inclusive
    assert got[key("grpc_server_handling_seconds_bucket", le="0.0025")] == 2
    assert got[key("grpc_server_handling_seconds_bucket", le="120.0")] == 2
    assert got[key("grpc_server_handling_seconds_bucket", le="+Inf")] == 3
    assert got[key("grpc_server_handling_seconds_count")] == 3
    assert abs(got[key("grpc_server_handling_seconds_sum")] - 500.0021) < 1e-9
    assert key("grpc_server_started_created") in got
    buckets = [
        got[key("grpc_server_handling_seconds_bucket", le=repr(float(bound)))]
        for bound in LATENCY_BUCKETS
    ]
    assert buckets == sorted(buckets)


def test_a_scrape_during_traffic_always_sees_a_consistent_histogram() -> None:
    metrics = Metrics()
    stop = threading.Event()
    inconsistent: list[tuple[float, float]] = []

    def scrape() -> None:
        while not stop.is_set():
            got = samples(metrics)
            count = got.get(key("grpc_server_handling_seconds_count"), 0.0)
            infinite = got.get(key("grpc_server_handling_seconds_bucket", le="+Inf"), 0.0)
            if count != infinite:
                inconsistent.append((count, infinite))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for index in range(50_000):
            metrics.rpc_handled(metrics.rpc_started(METHOD), "OK", (index % 7) / 100)
    finally:
        stop.set()
        scraper.join()
    assert inconsistent == []
    assert samples(metrics)[key("grpc_server_handling_seconds_count")] == 50_000


def test_each_registry_exports_the_process_and_python_series_and_only_its_own_calls() -> None:
    first, second = Metrics(), Metrics()
    first.rpc_handled(first.rpc_started(METHOD), "OK", 0.01)

    for metrics in (first, second):
        got = samples(metrics)
        assert got[("process_cpu_seconds_total", frozenset())] > 0
        assert got[("process_resident_memory_bytes", frozenset())] > 0
        python = {labels: value for (name, labels), value in got.items() if name == "python_info"}
        assert [dict(labels)["version"] for labels in python] == [platform.python_version()]
    assert samples(first)[key("grpc_server_started_total")] == 1
    assert key("grpc_server_started_total") not in samples(second)
