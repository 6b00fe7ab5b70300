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
# ... and in the status message, whose trailer the caller's gRPC library caps at a few KB.
_NAME_IN_MESSAGE = 64
MAX_PAGE_SIZE = 100
_CURSOR_PREFIX = "v1:"
# Offsets this server issues are below the number of tools: nine digits is more than enough.
_MAX_OFFSET_DIGITS = 9
# Base64 of the prefix and the longest offset, with room to spare: anything longer is not ours.
MAX_CURSOR_CHARS = 32


@dataclass(frozen=True)
class ToolPage:
    tools: list[ToolDefinition]
    next_cursor: str


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    """The offset in a cursor this server issued; InvalidArgument for any other text.

    Only the exact text `_encode_cursor` gives is accepted: short, ASCII, `v1:` and up to
    `_MAX_OFFSET_DIGITS` ASCII digits without leading zeros (`str.isdigit` alone would let in
    other scripts' digits and superscripts, and `int` refuses more than 4,300 digits)."""
    bad = InvalidArgument(
        "cursor is not one this server issued",
        [FieldViolation("cursor", "must be a next_cursor returned by ListTools")],
    )
    if len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    offset = text.removeprefix(_CURSOR_PREFIX)
    if (
        not text.startswith(_CURSOR_PREFIX)
        or not 0 < len(offset) <= _MAX_OFFSET_DIGITS
        or not offset.isdigit()
    ):
        raise bad
    start = int(offset)
    if _encode_cursor(start) != cursor:
        raise bad
    return start


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
            named = repr(name[:_NAME_IN_MESSAGE]) + ("..." if len(name) > _NAME_IN_MESSAGE else "")
            raise ToolNotFound(f"no tool named {named}", metadata={"tool": shown})
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
