"""What the harness, the load generator and the baseline server share: the call, and /proc."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Final

TOOL_NAME: Final = "tools.agenta.api.refine_prompt"
PROMPT_TEMPLATE_JSON: Final = json.dumps(
    {
        "messages": [
            {"role": "system", "content": "You are helpful to {{name}}."},
            {"role": "user", "content": "{{question}}"},
        ]
    }
)
ARGUMENTS: Final = {"prompt_template_json": PROMPT_TEMPLATE_JSON}

UPSTREAM_API_KEY: Final = "bench-upstream-key"
ENVIRONMENT_SLUG: Final = "production"
REFINE_PROMPT_KEY: Final = "bench-refine-prompt"

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds (user + system, all threads) and memory of one process at one instant."""

    cpu_s: float
    rss_kb: int
    hwm_kb: int


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat, in seconds (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # Fields 14 and 15 of stat(5), counted from 1 with pid and comm as 1 and 2.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB from /proc/<pid>/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def sample(pid: int) -> ProcSample:
    rss, hwm = memory_kb(pid)
    return ProcSample(cpu_seconds(pid), rss, hwm)


def cpu_busy_ticks(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks since boot of each CPU in ``cpus``, from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or not line[3].isdigit():
                continue
            name, *values = line.split()
            cpu = int(name[3:])
            if cpu in cpus:
                ticks = [int(v) for v in values[:8]]
                idle = ticks[3] + ticks[4]  # idle + iowait
                out[cpu] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_fraction(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    """How busy each CPU was between two ``cpu_busy_ticks`` readings (0..1)."""
    out: dict[int, float] = {}
    for cpu, (busy1, total1) in after.items():
        busy0, total0 = before.get(cpu, (busy1, total1))
        out[cpu] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return out
