"""Reloading the keys file while the server runs: on SIGHUP, and when the file changes.

Rotation needs no restart: an operator adds the new key, hands it out, then removes the old one,
and every replica picks each step up within seconds. A reload either installs a whole new store
or changes nothing: a file that fails to load keeps the keys in use and logs one error line (the
line start-up would print), so a typo in the file never locks every caller out.

The watcher looks at the file's state (its inode, size, and modification and change times) each
WATCH_INTERVAL and reads it only when that changed: an edit in place that keeps the size and
restores the modification time still changes the change time, which no writer can set. What is
installed is decided by content (a SHA-256 of the text read), so a file whose content is that of
the keys in use is never loaded again. The watcher loads a changed file only once it has stopped
changing, so a writer that writes in pieces (rather than renaming a finished
file into place) does not get half its file installed. SIGHUP means "the file is ready" and loads
at once. Requests never pile up: at most one reload runs and one more waits, however many signals
arrive, and all of it runs in one task, off the event loop for the reading and parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from aiservices_server.auth.keys import (
    KeysFileError,
    KeyStore,
    load_keys_text,
    read_keys_text,
)

__all__ = [
    "REPEAT_LOG_INTERVAL",
    "SETTLE",
    "WATCH_INTERVAL",
    "FileState",
    "KeysReloader",
    "file_state",
]

WATCH_INTERVAL = 1.0
"""Seconds between two looks at the file (a stat): a change is in use within about this long
(plus SETTLE)."""

SETTLE = 0.3
"""Seconds a changed file must stay as it is before it is loaded: a writer writing in pieces
pauses for milliseconds between them, so what holds still this long is taken as finished."""

REPEAT_LOG_INTERVAL = 60.0
"""A SIGHUP that finds nothing new logs at most one line this often, so a script sending signals
in a loop cannot flood the log."""

log = logging.getLogger("aiservices.auth")


class FileState(NamedTuple):
    """What tells one version of the file from the next without reading it: an editor's save
    changes the modification time or size, an atomic replace (`keys revoke`, a Kubernetes
    secret update) the inode, and any write, `touch -d` or chmod the change time."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: Path) -> FileState | None:
    """The file's state, or None when it cannot be looked at (gone, unreadable directory)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileState(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _digest(text: str) -> bytes:
    # The loader's text is strict UTF-8, so encoding it again gives back the bytes it read.
    return hashlib.sha256(text.encode("utf-8")).digest()


def _parse(text: str, path: Path) -> KeyStore:
    return KeyStore(load_keys_text(text, path))


class KeysReloader:
    """Keeps the keys in use in step with the keys file at `path`.

    `install` receives each store that loaded; calls already authenticated keep the key they
    found. `keys` are those in use and `state` the file's state taken before they were read, so a
    change made while they loaded still counts as one.

    One task (started by `start`) does all the work: it looks at the file every `interval`
    seconds and runs the reloads `request` asks for, one at a time, so at most one reload runs
    and one waits whatever the number of signals or changes, and the last one is never missed.
    """

    def __init__(
        self,
        path: Path,
        install: Callable[[KeyStore], None],
        *,
        keys: KeyStore,
        state: FileState | None,
        interval: float = WATCH_INTERVAL,
        settle: float = SETTLE,
    ) -> None:
        self._path = path
        self._install = install
        self._interval = interval
        self._settle = settle
        self._state = state
        """The file's state last dealt with: the watcher reloads when a look finds another."""
        self._keys = keys
        self._installed: bytes | None = None
        """Digest of the content the keys in use came from; None until known."""
        self._seen: bytes | None = None
        """Digest of the last content a reload read, so each new one is logged once."""
        self._rejected: tuple[bytes, KeysFileError] | None = None
        """Digest of the last content that did not load, and why: it is not parsed again."""
        self._quiet_until = 0.0
        self._requested: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start watching the file (on the running loop); requests made before run now."""
        if self._watcher is None and not self._stopped:
            self._watcher = asyncio.create_task(self._watch(), name="keys-file-watcher")

    def request(self, trigger: str) -> None:
        """Reload soon, without waiting (for a signal handler); nothing once stopped.

        A request made while another waits adds nothing; one made while a reload runs makes
        exactly one more run after it, which reads the file as it is then.
        """
        if self._stopped or self._requested is not None:
            return
        self._requested = trigger
        self._wake.set()

    async def reload(self, trigger: str, *, expected: FileState | None = None) -> bool:
        """Load the file and install its keys unless its content is that of the keys in use;
        True when new keys were installed. A file that fails to load keeps the keys in use and
        logs one error line. With `expected` (the state the watcher saw hold still), a file that
        has changed again since is left for the watcher's next look."""
        async with self._lock:
            # Taken before the read: a change made while it reads is a new state to look at.
            before = await asyncio.to_thread(file_state, self._path)
            if expected is not None and before != expected:
                return False
            try:
                text = await asyncio.to_thread(read_keys_text, self._path)
            except KeysFileError as exc:
                self._refused(trigger, exc, news=before != self._state)
                self._state = before
                return False
            self._state = before
            digest = _digest(text)
            news = digest != self._seen
            self._seen = digest
            if digest == self._installed:
                self._unchanged(trigger, news=news)
                return False
            if self._rejected is not None and digest == self._rejected[0]:
                # The content that did not load last time: the same reason, without parsing.
                self._refused(trigger, self._rejected[1], news=news)
                return False
            try:
                store = await asyncio.to_thread(_parse, text, self._path)
            except KeysFileError as exc:
                self._rejected = (digest, exc)
                self._refused(trigger, exc, news=True)
                return False
            self._rejected = None
            if self._installed is None and list(store) == list(self._keys):
                # The first version read since start-up holds the keys start-up loaded.
                self._installed = digest
                self._unchanged(trigger, news=news)
                return False
            self._install(store)
            old, new = frozenset(self._keys.ids()), frozenset(store.ids())
            self._keys = store
            self._installed = digest
            log.info(
                "API keys reloaded",
                extra={
                    "trigger": trigger,
                    "keys": len(store),
                    "added": len(new - old),
                    "removed": len(old - new),
                },
            )
            return True

    def _refused(self, trigger: str, exc: KeysFileError, *, news: bool) -> None:
        """A version not seen before is logged once; a SIGHUP finding the same one again is
        logged at most once per REPEAT_LOG_INTERVAL."""
        if news or self._may_repeat():
            log.error(
                "API keys file not reloaded: the keys in use stay",
                extra={"reason": str(exc), "trigger": trigger},
            )

    def _unchanged(self, trigger: str, *, news: bool) -> None:
        """A file back at the keys in use is logged once; a SIGHUP finding nothing new is
        logged at most once per REPEAT_LOG_INTERVAL."""
        if news or self._may_repeat():
            log.info(
                "API keys file unchanged: nothing to reload",
                extra={"trigger": trigger, "keys": len(self._keys)},
            )

    def _may_repeat(self) -> bool:
        now = time.monotonic()
        if now < self._quiet_until:
            return False
        self._quiet_until = now + REPEAT_LOG_INTERVAL
        return True

    async def _woken(self, seconds: float) -> bool:
        """Wait `seconds`, or less when a reload is requested meanwhile; whether one is."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        return self._wake.is_set()

    async def _watch(self) -> None:
        while True:
            await self._woken(self._interval)
            # Taken before the run: a request arriving from now on makes one more.
            trigger, self._requested = self._requested, None
            self._wake.clear()
            try:
                if trigger is not None:
                    await self.reload(trigger)
                else:
                    await self._check()
            except Exception as exc:  # the watcher outlives any one failed look
                log.error("API keys file watcher failed", extra={"error": type(exc).__name__})

    async def _check(self) -> None:
        """Reload when the file's state differs from the one last dealt with, once it has held
        still: two looks SETTLE apart agree. A half-written file is installed only if its
        writer pauses longer than that, which is why writers should rename a finished file into
        place."""
        state = await asyncio.to_thread(file_state, self._path)
        while state != self._state:
            if await self._woken(self._settle):
                return  # a SIGHUP says the file is ready: the watcher loads it at once
            again = await asyncio.to_thread(file_state, self._path)
            if again == state:
                await self.reload("file_changed", expected=state)
                return
            state = again

    async def stop(self) -> None:
        """Stop watching; a reload under way finishes or is cancelled with the watcher."""
        self._stopped = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
