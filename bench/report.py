"""What a run produces (rows of repeated measurements, ratios, targets) and how it is shown:
a JSON document (bench/results/latest.json) and a Markdown table rendered from that document."""

from __future__ import annotations

import json
import operator
import os
import platform
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult

SATURATED = 0.85
"""A process using this share of its core is what limits the run."""

METRICS = {  # the medians each row reports, with their format in the table
    "rps": ",.0f",
    "p50_ms": ",.1f",
    "p99_ms": ",.1f",
    "server_cpu_us_per_call": ",.0f",
    "server_util": ".0%",
    "client_util": ".0%",
}
PACKAGES = ("grpcio", "protobuf", "httpx", "aiohttp", "fastapi", "uvicorn", "uvloop", "mcp")
COMPARE = {">=": operator.ge, "<": operator.lt, "==": operator.eq}


@dataclass
class Row:
    """One server at one load, measured ``len(runs)`` times."""

    label: str
    concurrency: int
    runs: list[LoadResult] = field(default_factory=list)
    ratio_to: Row | None = None
    """The row this one's req/s is shown against, measured in the same rounds."""
    fresh_server: bool = False
    """A fresh server per run: its VmHWM is the peak RSS of exactly that load."""

    def median(self, metric: str) -> float | None:
        values = [value for run in self.runs if (value := getattr(run, metric)) is not None]
        return statistics.median(values) if values else None

    def ratio(self, other: Row | None) -> float | None:
        """Median of per-round req/s ratios this / other: drift on a busy machine cancels out."""
        if other is None:
            return None
        pairs = [a.rps / b.rps for a, b in zip(self.runs, other.runs, strict=False) if b.rps > 0]
        return statistics.median(pairs) if pairs else None

    @property
    def errors(self) -> Counter[str]:
        return sum((Counter(run.errors) for run in self.runs), Counter())

    @property
    def rss_mb(self) -> float | None:
        return self.median("server_hwm_mb" if self.fresh_server else "server_rss_peak_mb")

    def bound(self) -> str:
        """What limited the run: the server's CPU, the load generator's, another process on the
        server's core, or none of them (then latency, e.g. a slow upstream, set the pace)."""
        if (self.median("server_util") or 0.0) >= SATURATED:
            return "server CPU"
        if (self.median("client_util") or 0.0) >= SATURATED:
            return "CLIENT CPU"
        if (self.median("server_cpu_busy") or 0.0) >= 0.95:
            return "server core shared"
        return "latency"

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "median": {metric: self.median(metric) for metric in METRICS},
            "ratio": self.ratio(self.ratio_to),
            "ratio_to": self.ratio_to.label if self.ratio_to else None,
            "errors": dict(self.errors),
            "rss_mb": self.rss_mb,
            "bound": self.bound(),
            "runs": [asdict(run) for run in self.runs],
        }


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    op: str  # a key of COMPARE
    threshold: float

    @property
    def passed(self) -> bool:
        return self.value is not None and bool(COMPARE[self.op](self.value, self.threshold))


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
            "targets": [{**asdict(t), "passed": t.passed} for t in self.targets],
            "notes": self.notes,
        }


def machine(pinning: str) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cores": os.cpu_count(), "cpu_model": model, "pinning": pinning, "versions": versions}


def document(scenarios: list[Scenario], **info: Any) -> dict[str, Any]:
    """The whole run, every single measurement included: what is written and what is shown."""
    rendered = [s.to_json() for s in scenarios]
    targets = [t for s in rendered for t in s["targets"]]
    return {
        **info,
        "scenarios": rendered,
        "targets": targets,
        "all_targets_passed": all(t["passed"] for t in targets),
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write the document atomically: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def render(doc: dict[str, Any]) -> str:
    """The report as Markdown: how it was run, one table row per Row, notes, then targets."""
    m, runs = doc["machine"], doc["profile"]["runs"]
    lines = [
        f"Command: `{doc['command']}` ({doc['elapsed_s']:.0f} s, median of {runs} "
        f"run{'s' if runs > 1 else ''} per row)",
        f"Machine: {m['cores']} cores, {m['cpu_model']}; {m['pinning']}",
        "Versions: " + ", ".join(f"{name} {v}" for name, v in m["versions"].items()),
        "",
        "| # | variant | conc. | req/s | p50 ms | p99 ms | server CPU µs/call | server CPU "
        "| client CPU | errors | RSS MB | ratio | bound by |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for scenario in doc["scenarios"]:
        for row in scenario["rows"]:
            med, errors = row["median"], row["errors"]
            worst = f"{sum(errors.values())} ({max(errors, key=errors.get)})" if errors else "0"
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f} of {row['ratio_to']}"
            cells = [scenario["key"], row["label"], f"{row['concurrency']:,}"]
            cells += [_num(med[metric], spec) for metric, spec in METRICS.items()]
            cells += [worst, _num(row["rss_mb"], ".1f"), ratio, row["bound"]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "server/client CPU: share of one core the server / the load generator used; RSS: peak "
        "VmRSS sampled in the window, or VmHWM where the server was fresh for the run; ratio: "
        "median of per-round req/s ratios to the named row; bound by: the side whose CPU was "
        "at least 85 % busy (CLIENT CPU: the load generator limited the run, so its req/s is "
        "a floor for the server, not its limit).",
    ]
    notes = [f"- {s['key']}. {note}" for s in doc["scenarios"] for note in s["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    if doc["targets"]:
        lines += ["", "| target | this run | pass |", "|---|---:|---|"]
        for t in doc["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:,.2f}".rstrip("0").rstrip(".")
            verdict = "PASS" if t["passed"] else "FAIL"
            lines.append(f"| {t['name']} {t['op']} {t['threshold']:,g} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"
