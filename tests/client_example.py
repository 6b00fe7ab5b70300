"""The first lines a service writes against aiservices, as a script: checked by `mypy --strict`
and run against a real server by tests/test_client_helpers.py, so every helper keeps the types
it promises (a name typed `Any` would let a misuse through the type check unnoticed).

Run it with the environment the `aiservices` command reads (AISERVICES_TARGET,
AISERVICES_API_KEY); it prints one JSON object of what it got.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiservices import (
    AsyncToolClient,
    InvalidArgument,
    PromptMessage,
    RefinedPrompt,
    Status,
    ToolClient,
    ToolError,
    ToolInfo,
    ToolResult,
    __version__,
    as_json,
)

TEMPLATE: dict[str, Any] = {
    "template_format": "curly",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{company}}."},
        {"role": "user", "content": "{{question}}"},
    ],
}


def blocking() -> dict[str, Any]:
    with ToolClient.from_env() as client:
        status: Status = client.status()
        tools: list[ToolInfo] = client.list_tools()
        refined: RefinedPrompt = client.refine_prompt(
            TEMPLATE, guidelines="be concise", context="a help desk"
        )
        first: PromptMessage = refined.messages[0]
        template: dict[str, Any] = refined.apply_to(TEMPLATE)
        try:
            client.refine_prompt("not json")
            refused: list[tuple[str, str]] = []
        except InvalidArgument as err:
            refused = err.field_violations
        result: ToolResult = client.call_tool(
            "tools.agenta.api.refine_prompt", {"prompt_template_json": json.dumps(TEMPLATE)}
        )
    return {
        "enabled": status.enabled,
        "tools": [tool.name for tool in tools],
        "first": [first.role, first.content],
        "summary": refined.summary,
        "kept": sorted(key for key in template if key != "messages"),
        "refused": refused,
        # The helper's result is call_tool's structured content, typed.
        "sameAsCallTool": result.structured_content
        == {"messages": as_json(refined)["messages"], "summary": refined.summary},
    }


async def concurrent() -> dict[str, Any]:
    async with AsyncToolClient.from_env(timeout=20.0) as client:
        refined, status = await asyncio.gather(
            client.refine_prompt(json.dumps(TEMPLATE)), client.status()
        )
        try:
            await client.refine_prompt(TEMPLATE, test_cases=[{"inputs": {}}])
            failure: str | None = None
        except InvalidArgument as err:
            failure = err.reason
        except ToolError as err:  # the tool ran and failed: code, retryable, retry_after
            failure = f"{err.code} {err.retryable} {err.retry_after}"
    return {
        "upstream": status.upstream,
        "messages": len(refined.messages),
        "traceId": bool(refined.trace_id),
        "failure": failure,
    }


def main() -> None:
    shown = {"version": __version__, "blocking": blocking(), "async": asyncio.run(concurrent())}
    print(json.dumps(shown, sort_keys=True))


if __name__ == "__main__":
    main()
