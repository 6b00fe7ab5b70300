"""Reloading the keys file while the server runs: on SIGHUP, and when the file changes.

Rotation needs no restart: an operator adds the new key, hands it out, then removes the old one,
and every replica picks each step up within seconds. A reload either installs a whole new store
or changes nothing: a file that fails to load keeps the keys in use and logs one error line (the
line start-up would print), so a typo in the file never locks every caller out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from aiservices_server.auth.keys import KeysFileError, KeyStore

__all__ = ["WATCH_INTERVAL", "FileState", "KeysReloader", "file_state"]

WATCH_INTERVAL = 1.0
"""Seconds between two looks at the file: a change is in use within about this long."""

log = logging.getLogger("aiservices.auth")


class FileState(NamedTuple):
    """What tells one version of the file from the next without reading it: an editor's save
    changes the modification time or size, an atomic replace (`keys revoke`, a Kubernetes
    secret update) the inode."""

    device: int
    inode: int
    size: int
    mtime_ns: int


def file_state(path: Path) -> FileState | None:
    """The file's state, or None when it cannot be looked at (gone, unreadable directory)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileState(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class KeysReloader:
    """Keeps the keys in use in step with the keys file at `path`.

    `install` receives each store that loaded; calls already authenticated keep the key they
    found. Reloads run one at a time, reading the file off the event loop with the same bounded
    reader and checks as start-up. `keys` are those in use and `state` the file's state taken
    before they were read, so a change made while they loaded still counts as one.
    """

    def __init__(
        self,
        path: Path,
        install: Callable[[KeyStore], None],
        *,
        keys: KeyStore,
        state: FileState | None,
        interval: float = WATCH_INTERVAL,
    ) -> None:
        self._path = path
        self._install = install
        self._interval = interval
        self._state = state
        self._ids = frozenset(keys.ids())
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[bool]] = set()
        self._stopped = False

    def start(self) -> None:
        """Start watching the file (on the running loop)."""
        if self._watcher is None and not self._stopped:
            self._watcher = asyncio.create_task(self._watch(), name="keys-file-watcher")

    def request(self, trigger: str) -> None:
        """Reload soon, without waiting (for a signal handler); nothing once stopped."""
        if self._stopped:
            return
        task = asyncio.create_task(self.reload(trigger), name="keys-file-reload")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def reload(self, trigger: str) -> bool:
        """Load the file and install it; False (old keys kept, one error line) on failure."""
        async with self._lock:
            state = await asyncio.to_thread(file_state, self._path)
            try:
                store = await asyncio.to_thread(KeyStore.from_file, self._path)
            except KeysFileError as exc:
                # Remembered even so: one error line per broken version, not one per look.
                self._state = state
                log.error(
                    "API keys file not reloaded: the keys in use stay",
                    extra={"reason": str(exc), "trigger": trigger},
                )
                return False
            self._state = state
            self._install(store)
            ids = frozenset(store.ids())
            log.info(
                "API keys reloaded",
                extra={
                    "trigger": trigger,
                    "keys": len(store),
                    "added": len(ids - self._ids),
                    "removed": len(self._ids - ids),
                },
            )
            self._ids = ids
            return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                state = await asyncio.to_thread(file_state, self._path)
                if state != self._state:
                    await self.reload("file_changed")
            except Exception as exc:  # the watcher outlives any one failed look
                log.error("API keys file watcher failed", extra={"error": type(exc).__name__})

    async def stop(self) -> None:
        """Stop watching; a reload under way finishes or is cancelled with the watcher."""
        self._stopped = True
        tasks = [*self._pending, *([self._watcher] if self._watcher is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watcher = None
