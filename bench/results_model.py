"""What a scenario produces: rows of repeated runs, their medians, ratios and targets."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.loadgen import LoadResult

# A side whose CPU is this busy is what limits the run.
SATURATED = 0.85

METRICS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "server_cpu_us_per_call",
    "server_util",
    "server_rss_peak_mb",
    "server_hwm_mb",
    "client_cpu_us_per_call",
    "client_util",
    "upstream_util",
    "server_cpu_busy",
    "load_cpu_busy",
    "inflight_min",
    "inflight_max",
)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Row:
    """One variant of a scenario (a server at one load), measured ``len(runs)`` times."""

    label: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)
    idle_rss_mb: list[float] = field(default_factory=list)
    ratio_to: Row | None = None
    """Pairs run i with run i of this row: the ratio is the median of per-pair req/s ratios."""
    rss_from_hwm: bool = False
    """A fresh server per run: VmHWM is the peak RSS of the whole run."""

    def median(self, metric: str) -> float | None:
        return median([getattr(run, metric) for run in self.runs])

    @property
    def ratio(self) -> float | None:
        if self.ratio_to is None:
            return None
        pairs = [
            a.rps / b.rps for a, b in zip(self.runs, self.ratio_to.runs, strict=False) if b.rps > 0
        ]
        return statistics.median(pairs) if pairs else None

    @property
    def cpu_ratio(self) -> float | None:
        """Median of per-pair (baseline server µs/call / this server µs/call): how much of the
        baseline's one-core capacity this server keeps, whatever else ran on the machine."""
        if self.ratio_to is None:
            return None
        pairs = [
            b.server_cpu_us_per_call / a.server_cpu_us_per_call
            for a, b in zip(self.runs, self.ratio_to.runs, strict=False)
            if a.server_cpu_us_per_call and b.server_cpu_us_per_call
        ]
        return statistics.median(pairs) if pairs else None

    @property
    def capacity(self) -> float | None:
        """Calls per second one dedicated core would serve at the measured CPU cost per call."""
        cost = self.median("server_cpu_us_per_call")
        return 1e6 / cost if cost else None

    @property
    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for run in self.runs:
            total.update(run.errors)
        return total

    @property
    def rss_mb(self) -> float | None:
        return self.median("server_hwm_mb" if self.rss_from_hwm else "server_rss_peak_mb")

    @property
    def bound(self) -> str:
        """What limited the run, from the medians: which CPU was saturated, if any.

        "CLIENT CPU" only when the load generator saturated and the server did not: then the
        req/s is the client's limit, not the server's.
        """
        server = self.median("server_util") or 0.0
        client = self.median("client_util") or 0.0
        load_busy = self.median("load_cpu_busy")
        server_busy = self.median("server_cpu_busy")
        if server >= SATURATED:
            return "server CPU (client near its limit too)" if client >= SATURATED else "server CPU"
        if server_busy is not None and server_busy >= 0.95:
            return "server core shared"
        if client >= SATURATED:
            return "CLIENT CPU"
        if load_busy is not None and load_busy >= 0.95:
            return "load core"
        return "latency"

    @property
    def other_load(self) -> tuple[float | None, float | None]:
        """CPU taken by processes outside the benchmark on the server and load cores."""
        server_busy = self.median("server_cpu_busy")
        load_busy = self.median("load_cpu_busy")
        on_server = None if server_busy is None else server_busy - (self.median("server_util") or 0)
        on_load = (
            None
            if load_busy is None
            else load_busy - (self.median("client_util") or 0) - (self.median("upstream_util") or 0)
        )
        return on_server, on_load

    def to_json(self) -> dict[str, Any]:
        other_server, other_load = self.other_load
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "median": {metric: self.median(metric) for metric in METRICS},
            "ratio": self.ratio,
            "cpu_ratio": self.cpu_ratio,
            "capacity_rps": self.capacity,
            "errors": dict(self.errors),
            "rss_mb": self.rss_mb,
            "idle_rss_mb": median(list(self.idle_rss_mb)),
            "bound": self.bound,
            "other_load": {"server_cpu": other_server, "load_cpu": other_load},
            "runs": [asdict(run) for run in self.runs],
        }


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    op: str  # ">=", "<" or "=="
    threshold: float

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        if self.op == ">=":
            return self.value >= self.threshold
        if self.op == "<":
            return self.value < self.threshold
        return self.value == self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "op": self.op,
            "threshold": self.threshold,
            "passed": self.passed,
        }


@dataclass
class Scenario:
    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "rows": [row.to_json() for row in self.rows],
            "targets": [target.to_json() for target in self.targets],
            "notes": self.notes,
        }
