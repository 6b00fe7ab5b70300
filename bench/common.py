"""What every benchmark process shares: the call it makes, the upstream's settings, and /proc."""

from __future__ import annotations

import json
import os
from typing import Any, Final

TOOL_NAME: Final = "tools.agenta.api.refine_prompt"
SYSTEM: Final = {"role": "system", "content": "You are helpful to {{name}}."}
USER: Final = {"role": "user", "content": "{{question}}"}
ARGUMENTS: Final = {"prompt_template_json": json.dumps({"messages": [SYSTEM, USER]})}

UPSTREAM_API_KEY: Final = "bench-upstream-key"
ENVIRONMENT_SLUG: Final = "production"
REFINE_PROMPT_KEY: Final = "bench-refine-prompt"
RUN_PATH: Final = "/services/completion/run"
REST_PATH: Final = "/tools/call"
MCP_PATH: Final = "/mcp"
MCP_PROTOCOL: Final = "2026-07-28"
# A tools/call as the SDK's own client posts it: the method and tool name in headers too, and
# the protocol version and client in every request's _meta (the protocol has no sessions).
MCP_HEADERS: Final = {
    "Accept": "application/json, text/event-stream",
    "MCP-Protocol-Version": MCP_PROTOCOL,
    "Mcp-Method": "tools/call",
    "Mcp-Name": TOOL_NAME,
}
MCP_CALL: Final = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {
        "name": TOOL_NAME,
        "arguments": ARGUMENTS,
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MCP_PROTOCOL,
            "io.modelcontextprotocol/clientInfo": {"name": "bench", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        },
    },
}

# High enough that no benchmark load is ever refused, while every call still pays for a decision.
RATE_LIMIT_BURST: Final = 1_000_000
RATE_LIMIT_PER_MINUTE: Final = 6_000_000

_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def upstream_body(prompt_template_json: str) -> dict[str, Any]:
    """The completion-runner request body the service sends for a refine_prompt call."""
    return {
        "inputs": {
            "__ag_prompt_template_json": prompt_template_json,
            "__ag_guidelines": "",
            "__ag_context": "",
        },
        "environment": ENVIRONMENT_SLUG,
        "app": REFINE_PROMPT_KEY,
    }


def sample(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system, all threads), VmRSS and VmHWM in kB of one process now."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    memory = {"VmRSS:": 0, "VmHWM:": 0}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            name, *values = line.split()
            if name in memory:
                memory[name] = int(values[0])
    return cpu_s, memory["VmRSS:"], memory["VmHWM:"]


def cpu_ticks(cpu: int | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks since boot of CPU ``cpu`` (None for None)."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            name, *values = line.split()
            if cpu is not None and name == f"cpu{cpu}":
                ticks = [int(v) for v in values[:8]]
                return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait
    return None


def busy_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """How busy a CPU was between two ``cpu_ticks`` readings (0..1), counting every process."""
    if before and after and after[1] > before[1]:
        return (after[0] - before[0]) / (after[1] - before[1])
    return None
