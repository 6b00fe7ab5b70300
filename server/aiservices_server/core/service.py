"""The tool service every face calls: the catalogue a caller may see, and running one call
through its steps in order."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from aiservices_server.call import Call, Principal
from aiservices_server.core.arguments import ArgumentValidator, check_bounds
from aiservices_server.core.gate import CallGate
from aiservices_server.core.limits import RateLimits
from aiservices_server.errors import (
    DeadlineExceeded,
    FeatureDisabled,
    FieldViolation,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    ServiceError,
    ToolNotFound,
)
from aiservices_server.tools.base import (
    JsonObject,
    Tool,
    ToolDefinition,
    ToolErrorCode,
    ToolFailure,
    ToolResult,
)

DEFAULT_PAGE_SIZE = 50
# Names are echoed in errors and logs only this far: a caller may send megabytes.
MAX_NAME_SHOWN = 200
# ... and in the status message, whose trailer the caller's gRPC library caps at a few KB.
_NAME_IN_MESSAGE = 64
MAX_PAGE_SIZE = 100
_CURSOR_PREFIX = "v1:"
# A tool timeout this close to the caller's deadline is the deadline passing.
_DEADLINE_SLACK = 0.05
# Offsets this server issues are below the number of tools: nine digits is more than enough.
_MAX_OFFSET_DIGITS = 9
# Base64 of the prefix and the longest offset, with room to spare: anything longer is not ours.
MAX_CURSOR_CHARS = 32


@dataclass(frozen=True)
class ToolPage:
    tools: list[ToolDefinition]
    next_cursor: str


@dataclass(frozen=True, slots=True)
class _Entry:
    """One served tool and its input validator, compiled once when the tool set is made."""

    tool: Tool
    validator: ArgumentValidator


class ToolSet:
    """Tools by name, each with its input validator compiled: made whole before it is served,
    so a reload can make one off the event loop (compiling hundreds of schemas takes a while)
    and the service then swaps it in at once (`ToolService.use_tools`). ValueError for a name
    given twice or a malformed input schema."""

    __slots__ = ("entries",)

    def __init__(self, tools: Sequence[Tool]) -> None:
        entries: dict[str, _Entry] = {}
        for tool in tools:
            name = tool.definition.name
            if name in entries:
                raise ValueError(f"tool {name!r} registered twice")
            entries[name] = _Entry(tool, ArgumentValidator(tool.definition.input_schema))
        self.entries: Mapping[str, _Entry] = entries


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


class ToolService:
    """The registered tools and the one way to call them.

    `call` runs these steps in order, each raising a domain error that refuses the call:
    bound the arguments' size (InvalidArgument), look the tool up (FeatureDisabled,
    ToolNotFound), check the caller's permission (PermissionDenied), charge the caller's rate
    limit (RateLimited), validate the arguments (InvalidArgument), take a slot of the bound on
    calls in flight (Overloaded: the unit charged is given back), run the tool. A tool that ran
    but failed raises ToolFailure; an upstream timeout at the caller's own deadline is
    DeadlineExceeded. Once charged, every answer carries the rate limit left in `headers`.
    """

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        enabled: bool,
        limits: RateLimits,
        gate: CallGate,
        upstream: str = "",
    ) -> None:
        """`upstream` names the upstream the tools call, for callers who ask (GetStatus)."""
        self.enabled = enabled
        self.upstream = upstream if enabled else ""
        self._limits = limits
        self._gate = gate
        self._entries = ToolSet(tools).entries

    def use_tools(self, tools: ToolSet) -> None:
        """Serve `tools` from now on, in place of those served so far (a reload of the tools
        file). The set was built whole beforehand (names checked, validators compiled) and is
        put in place as one reference, so each call sees either the old set or the new one: a
        call already past its look-up keeps running the tool it found."""
        self._entries = tools.entries

    @property
    def definitions(self) -> list[ToolDefinition]:
        """Every registered tool's definition, whoever may call it."""
        return [entry.tool.definition for entry in self._entries.values()]

    def definition(self, name: str) -> ToolDefinition | None:
        """The definition of the tool served under `name` now, or None."""
        entry = self._entries.get(name)
        return None if entry is None else entry.tool.definition

    def visible_tools(self, principal: Principal) -> list[ToolDefinition]:
        """The tools this caller may call, in a stable order; none while disabled."""
        if not self.enabled:
            return []
        return [
            entry.tool.definition
            for name, entry in sorted(self._entries.items())
            if principal.may(entry.tool.definition.permission)
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

    async def call(self, call: Call, name: str, arguments: JsonObject) -> ToolResult:
        check_bounds(arguments)
        # One look-up for the tool and its validator: a reload swapping the set while this
        # call waits for its charge cannot take either away from it.
        entry = self._look_up(name)
        tool = entry.tool
        self._check_permission(call.principal, tool)
        charge = await self._limits.charge(call.principal, name)
        try:
            checked = entry.validator.validate(arguments)
            async with self._gate:
                result = await self._run(tool, checked, call)
        except Overloaded as refused:
            charge = await self._limits.refund(charge)
            raise refused.with_headers(charge.headers()) from None
        except (ServiceError, ToolFailure) as error:
            raise error.with_headers(charge.headers()) from None
        return replace(result, headers=charge.headers())

    def _look_up(self, name: str) -> _Entry:
        if not self.enabled:
            raise FeatureDisabled("AI services are not configured on this server")
        entry = self._entries.get(name)
        if entry is None:
            shown = name[:MAX_NAME_SHOWN]
            named = repr(name[:_NAME_IN_MESSAGE]) + ("..." if len(name) > _NAME_IN_MESSAGE else "")
            raise ToolNotFound(f"no tool named {named}", metadata={"tool": shown})
        return entry

    @staticmethod
    def _check_permission(principal: Principal, tool: Tool) -> None:
        definition = tool.definition
        if not principal.may(definition.permission):
            raise PermissionDenied(
                f"this caller may not call {definition.name}",
                metadata={"tool": definition.name, "permission": definition.permission},
            )

    @staticmethod
    async def _run(tool: Tool, arguments: JsonObject, call: Call) -> ToolResult:
        try:
            return await tool.call(arguments, call)
        except ToolFailure as failure:
            time_left = call.time_left()
            if (
                failure.code is ToolErrorCode.UPSTREAM_TIMEOUT
                and time_left is not None
                and time_left <= _DEADLINE_SLACK
            ):
                raise DeadlineExceeded(
                    "the call's deadline passed before the upstream answered"
                ) from None
            raise
