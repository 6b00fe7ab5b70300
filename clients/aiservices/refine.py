"""refine_prompt as a typed call: its arguments built from Python values, its result checked
into a frozen `RefinedPrompt`, its failure raised as `ToolError`.

Pure functions, no I/O: both clients run the call itself (`call_tool`) and use these around it.
Every other tool, declared ones included, stays on `call_tool`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from aiservices._convert import ToolResult
from aiservices.errors import ToolError, error_for

__all__ = ["REFINE_PROMPT", "PromptMessage", "RefinedPrompt", "refine_arguments", "refined_prompt"]

REFINE_PROMPT = "tools.agenta.api.refine_prompt"


@dataclass(frozen=True)
class PromptMessage:
    """One refined message: its role (the input's, in the same place) and its new content."""

    role: str
    content: str


@dataclass(frozen=True)
class RefinedPrompt:
    """What refine_prompt returns: the refined messages (as many as the template had, roles and
    template variables kept; the server checks that before answering), a short summary of what
    changed, the upstream's trace id and the server's request id."""

    messages: tuple[PromptMessage, ...]
    summary: str
    trace_id: str
    request_id: str

    def apply_to(self, template: Mapping[str, Any]) -> dict[str, Any]:
        """`template` with its `messages` replaced by the refined ones, every other key
        (`template_format`, model settings...) kept."""
        messages = [{"role": m.role, "content": m.content} for m in self.messages]
        return {**template, "messages": messages}


def refine_arguments(
    template: Mapping[str, Any] | str,
    *,
    guidelines: str | None = None,
    context: str | None = None,
    test_cases: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The tool's arguments. A mapping template is encoded as the JSON string the tool takes
    (`prompt_template_json`); a string is sent exactly as it is (a file's text, say). Raises
    TypeError or ValueError, before anything is sent, for a template JSON cannot encode."""
    if isinstance(template, str):
        text = template
    elif isinstance(template, Mapping):
        try:
            text = json.dumps(template, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"template: {exc}") from None
    else:
        raise TypeError(f"template must be a mapping or a str, not {type(template).__name__}")
    arguments: dict[str, Any] = {"prompt_template_json": text}
    if guidelines is not None:
        arguments["guidelines"] = guidelines
    if context is not None:
        arguments["context"] = context
    if test_cases is not None:
        arguments["test_cases"] = [dict(case) for case in test_cases]
    return arguments


def refined_prompt(result: ToolResult) -> RefinedPrompt:
    """The typed result of a refine_prompt call; ToolError for a tool error, and Internal when a
    result breaks the tool's output schema (a server this client cannot trust to refine)."""
    if result.is_error:
        raise ToolError(result)
    content = result.structured_content or {}
    messages = content.get("messages")
    summary = content.get("summary")
    if not (
        isinstance(messages, list)
        and messages
        and all(_is_message(item) for item in messages)
        and isinstance(summary, str)
    ):
        raise error_for(
            grpc.StatusCode.INTERNAL,
            f"{REFINE_PROMPT} answered without the messages and summary of its output schema",
        )
    return RefinedPrompt(
        messages=tuple(PromptMessage(item["role"], item["content"]) for item in messages),
        summary=summary,
        trace_id=result.trace_id,
        request_id=result.request_id,
    )


def _is_message(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("role"), str)
        and isinstance(item.get("content"), str)
    )
