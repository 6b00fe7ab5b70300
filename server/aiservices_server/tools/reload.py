"""Reloading the tools file while the server runs: with the keys file, on SIGHUP, and when the
file itself changes, by the same rules (`aiservices_server.filereload`).

A version that loads whole replaces the declared tools at once (the core swaps its tool set in
one step: calls under way keep their tool); one that does not keeps the tools in use and logs one
error line, the line start-up would print.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from aiservices_server.filereload import SETTLE, WATCH_INTERVAL, FileReloader, FileState
from aiservices_server.tools.declared import (
    DeclaredToolSpec,
    ToolsFileError,
    load_tools_text,
    read_tools_text,
)

__all__ = ["DeclaredTools", "LoadedTools", "ToolsReloader"]

DeclaredTools = tuple[DeclaredToolSpec, ...]
P = TypeVar("P")

log = logging.getLogger("aiservices.tools")


@dataclass(frozen=True, slots=True)
class LoadedTools(Generic[P]):
    """One version of the tools file: its specs, and what `prepare` made of them (None for the
    version start-up loaded, which is in use already)."""

    specs: DeclaredTools
    prepared: P | None


class ToolsReloader(FileReloader[LoadedTools[P]]):
    """Keeps the declared tools in step with the tools file at `path`.

    Each version that loads is handed to `prepare`, in the thread that read and checked it, so
    the work of making tools of its specs (compiling their schemas) never holds the event loop;
    `prepare` may refuse it by raising ToolsFileError. `install` then receives what `prepare`
    made, on the loop, and puts it in use at once. `specs` are those in use and `state` the
    file's state taken before they were read. `reserved_names` are the names of the tools
    served otherwise, which a declared tool may not take."""

    error = ToolsFileError
    reloaded_line = "tools file reloaded"
    refused_line = "tools file not reloaded: the tools in use stay"
    unchanged_line = "tools file unchanged: nothing to reload"
    failed_line = "tools file watcher failed"
    task_name = "tools-file-watcher"
    log = log

    def __init__(
        self,
        path: Path,
        prepare: Callable[[DeclaredTools], P],
        install: Callable[[P], None],
        *,
        specs: DeclaredTools,
        state: FileState | None,
        reserved_names: frozenset[str],
        interval: float = WATCH_INTERVAL,
        settle: float = SETTLE,
    ) -> None:
        def install_loaded(loaded: LoadedTools[P]) -> None:
            assert loaded.prepared is not None  # every version but start-up's is prepared
            install(loaded.prepared)

        super().__init__(
            path,
            install_loaded,
            current=LoadedTools(specs, None),
            state=state,
            interval=interval,
            settle=settle,
        )
        self._prepare = prepare
        self._reserved = reserved_names

    def read(self, path: Path) -> str:
        return read_tools_text(path)

    def parse(self, text: str, path: Path) -> LoadedTools[P]:
        specs = load_tools_text(text, path, reserved_names=self._reserved)
        return LoadedTools(specs, self._prepare(specs))

    def same(self, first: LoadedTools[P], second: LoadedTools[P]) -> bool:
        return first.specs == second.specs

    def reloaded_fields(self, old: LoadedTools[P], new: LoadedTools[P]) -> Mapping[str, object]:
        before = {spec.definition.name: spec for spec in old.specs}
        after = {spec.definition.name: spec for spec in new.specs}
        kept = before.keys() & after.keys()
        return {
            "tools": len(after),
            "added": len(after.keys() - before.keys()),
            "removed": len(before.keys() - after.keys()),
            "changed": sum(1 for name in kept if before[name] != after[name]),
        }

    def count_fields(self, current: LoadedTools[P]) -> Mapping[str, object]:
        return {"tools": len(current.specs)}
