"""Each served tool's definition in a face's own form (a protobuf message, an MCP SDK model),
made once per definition rather than on every listing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from aiservices_server.tools.base import ToolDefinition

M = TypeVar("M")

MAX_KEPT = 2048
"""Forms kept at most: above every tool a server serves at once, so only a long run of reloads
that rename tools ever clears them (and they are made again as listed)."""


class ConvertedDefinitions(Generic[M]):
    """The form `convert` makes of each definition, kept by name and made anew when the tool
    served under that name is another definition (the tool set is swapped at a reload: calls
    and listings are then answered from the new one, and nothing is left to look up)."""

    def __init__(
        self, convert: Callable[[ToolDefinition], M], definitions: Iterable[ToolDefinition]
    ) -> None:
        self._convert = convert
        self._made: dict[str, tuple[ToolDefinition, M]] = {}
        for definition in definitions:
            self.form(definition)

    def form(self, definition: ToolDefinition) -> M:
        made = self._made.get(definition.name)
        if made is None or made[0] is not definition:
            if len(self._made) >= MAX_KEPT:
                self._made.clear()
            made = (definition, self._convert(definition))
            self._made[definition.name] = made
        return made[1]
