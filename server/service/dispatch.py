"""The tool catalog and call dispatch: feature gate, lookup, permission, arguments, handler."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import (
    FeatureDisabled,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ToolNotFound,
)
from server.identity import Principal
from server.service.arguments import ArgumentValidator
from server.service.concurrency import CallGate
from server.tools.base import CallContext, Tool, ToolDefinition, ToolFailure, ToolResult

DEFAULT_PAGE_SIZE = 50
# Names are echoed in errors and logs only this far: a caller may send megabytes.
MAX_NAME_SHOWN = 200
MAX_PAGE_SIZE = 100
_CURSOR_PREFIX = "v1:"


@dataclass(frozen=True)
class ToolPage:
    tools: list[ToolDefinition]
    next_cursor: str


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    bad = InvalidArgument(
        "cursor is not one this server issued",
        [FieldViolation("cursor", "must be a next_cursor returned by ListTools")],
    )
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    offset = text.removeprefix(_CURSOR_PREFIX)
    if not text.startswith(_CURSOR_PREFIX) or not offset.isdigit():
        raise bad
    return int(offset)


class ToolDispatcher:
    """Owns the registered tools and runs calls against them."""

    def __init__(
        self, tools: Sequence[Tool], *, enabled: bool, gate: CallGate | None = None
    ) -> None:
        self.enabled = enabled
        self.gate = gate
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, ArgumentValidator] = {}
        for tool in tools:
            name = tool.definition.name
            if name in self._tools:
                raise ValueError(f"tool {name!r} registered twice")
            self._tools[name] = tool
            self._validators[name] = ArgumentValidator(tool.definition.input_schema)

    def visible_tools(self, principal: Principal) -> list[ToolDefinition]:
        """The tools this caller may call, in a stable order; none while disabled."""
        if not self.enabled:
            return []
        return [
            tool.definition
            for name, tool in sorted(self._tools.items())
            if principal.may(tool.definition.permission)
        ]

    def list_tools(self, principal: Principal, cursor: str, page_size: int) -> ToolPage:
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative",
                [FieldViolation("page_size", "must be 0 (server default) or more")],
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = _decode_cursor(cursor) if cursor else 0
        tools = self.visible_tools(principal)
        page = tools[start : start + size]
        end = start + len(page)
        return ToolPage(page, _encode_cursor(end) if end < len(tools) else "")

    def tool_for(self, principal: Principal, name: str) -> Tool:
        if not self.enabled:
            raise FeatureDisabled("AI services are not configured on this server")
        tool = self._tools.get(name)
        if tool is None:
            shown = name[:MAX_NAME_SHOWN]
            raise ToolNotFound(f"no tool named {shown!r}", metadata={"tool": shown})
        if not principal.may(tool.definition.permission):
            raise PermissionDenied(
                f"this caller may not call {name}",
                metadata={"tool": name, "permission": tool.definition.permission},
            )
        return tool

    async def call(self, name: str, arguments: dict[str, Any], context: CallContext) -> ToolResult:
        tool = self.tool_for(context.principal, name)
        checked = self._validators[name].validate(arguments)
        try:
            if self.gate is None:
                output = await tool.call(checked, context)
            else:
                await self.gate.acquire()
                try:
                    output = await tool.call(checked, context)
                finally:
                    self.gate.release()
        except ToolFailure as failure:
            return ToolResult.failure(failure)
        return ToolResult.success(output)

    def may_call(self, principal: Principal, name: str) -> bool:
        """True when the call would reach the tool: enabled, known and permitted."""
        tool = self._tools.get(name)
        return self.enabled and tool is not None and principal.may(tool.definition.permission)
