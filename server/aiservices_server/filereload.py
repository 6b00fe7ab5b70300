"""Reloading a file the server runs from (the keys file, the tools file) while it runs: on
SIGHUP, and when the file changes.

A reload either installs what a whole new version of the file holds or changes nothing: a file
that fails to load keeps what is in use and logs one error line (the line start-up would print),
so a typo never takes down what works.

The watcher looks at the file's state (its inode, size, and modification and change times) each
WATCH_INTERVAL and reads it only when that changed: an edit in place that keeps the size and
restores the modification time still changes the change time, which no writer can set. What is
installed is decided by content (a SHA-256 of the text read), so a file whose content is that of
what is in use is never loaded again. The watcher loads a changed file only once it has stopped
changing, so a writer that writes in pieces (rather than renaming a finished file into place)
does not get half its file installed. SIGHUP means "the file is ready" and loads at once.
Requests never pile up: at most one reload runs and one more waits, however many signals
arrive, and all of it runs in one task, off the event loop for the reading and parsing.

`FileReloader` is that machinery; a subclass says how its file is read and parsed, how two
loaded versions compare, and what its log lines say.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Generic, NamedTuple, TypeVar

__all__ = [
    "REPEAT_LOG_INTERVAL",
    "SETTLE",
    "WATCH_INTERVAL",
    "FileReloader",
    "FileState",
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

T = TypeVar("T")


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
    # The loaders' text is strict UTF-8, so encoding it again gives back the bytes they read.
    return hashlib.sha256(text.encode("utf-8")).digest()


class FileReloader(ABC, Generic[T]):
    """Keeps what is in use (a `T`, loaded from the file at `path`) in step with the file.

    `install` receives each version that loaded; calls already under way keep what they found.
    An `install` that raises `error` refuses the version as a file that fails to load would.
    `current` is what is in use and `state` the file's state taken before it was read, so a
    change made while it loaded still counts as one.

    One task (started by `start`) does all the work: it looks at the file every `interval`
    seconds and runs the reloads `request` asks for, one at a time, so at most one reload runs
    and one waits whatever the number of signals or changes, and the last one is never missed.

    A subclass names its `error` (what its loader raises, with one line as `str()`), its log
    lines and logger, and implements `read`, `parse`, `same` and the fields of its lines.
    """

    error: ClassVar[type[Exception]]
    """What `read` and `parse` raise for a file that cannot be used."""
    reloaded_line: ClassVar[str]
    refused_line: ClassVar[str]
    unchanged_line: ClassVar[str]
    failed_line: ClassVar[str]
    """What the watcher logs when a look fails unexpectedly (it goes on watching)."""
    task_name: ClassVar[str]
    log: ClassVar[logging.Logger]

    def __init__(
        self,
        path: Path,
        install: Callable[[T], None],
        *,
        current: T,
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
        self._current = current
        self._installed: bytes | None = None
        """Digest of the content what is in use came from; None until known."""
        self._seen: bytes | None = None
        """Digest of the last content a reload read, so each new one is logged once."""
        self._rejected: tuple[bytes, Exception] | None = None
        """Digest of the last content that did not load, and why: it is not parsed again."""
        self._quiet_until = 0.0
        self._requested: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = False

    # --- what a subclass says ----------------------------------------------------------------

    @abstractmethod
    def read(self, path: Path) -> str:
        """The file's text, bounded; `error` otherwise. Runs in a thread."""

    @abstractmethod
    def parse(self, text: str, path: Path) -> T:
        """What the text holds, every rule checked; `error` otherwise. Runs in a thread."""

    @abstractmethod
    def same(self, first: T, second: T) -> bool:
        """Whether two loaded versions hold the same (start-up's and the first one reread)."""

    @abstractmethod
    def reloaded_fields(self, old: T, new: T) -> Mapping[str, object]:
        """The fields of the line logged when `new` replaces `old`."""

    @abstractmethod
    def count_fields(self, current: T) -> Mapping[str, object]:
        """The fields of the line logged when the file holds what is in use."""

    # --- the machinery -----------------------------------------------------------------------

    def start(self) -> None:
        """Start watching the file (on the running loop); requests made before run now."""
        if self._watcher is None and not self._stopped:
            self._watcher = asyncio.create_task(self._watch(), name=self.task_name)

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
        """Load the file and install what it holds unless its content is that of what is in
        use; True when a new version was installed. A file that fails to load keeps what is in
        use and logs one error line. With `expected` (the state the watcher saw hold still), a
        file that has changed again since is left for the watcher's next look."""
        async with self._lock:
            # Taken before the read: a change made while it reads is a new state to look at.
            before = await asyncio.to_thread(file_state, self._path)
            if expected is not None and before != expected:
                return False
            try:
                text = await asyncio.to_thread(self.read, self._path)
            except self.error as exc:
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
                loaded = await asyncio.to_thread(self.parse, text, self._path)
            except self.error as exc:
                self._rejected = (digest, exc)
                self._refused(trigger, exc, news=True)
                return False
            self._rejected = None
            if self._installed is None and self.same(loaded, self._current):
                # The first version read since start-up holds what start-up loaded.
                self._installed = digest
                self._unchanged(trigger, news=news)
                return False
            try:
                self._install(loaded)
            except self.error as exc:  # what is in use could not take it: nothing changed
                self._rejected = (digest, exc)
                self._refused(trigger, exc, news=True)
                return False
            old, self._current = self._current, loaded
            self._installed = digest
            self.log.info(
                self.reloaded_line,
                extra={"trigger": trigger, **self.reloaded_fields(old, loaded)},
            )
            return True

    def _refused(self, trigger: str, exc: Exception, *, news: bool) -> None:
        """A version not seen before is logged once; a SIGHUP finding the same one again is
        logged at most once per REPEAT_LOG_INTERVAL."""
        if self._may_repeat(news):
            self.log.error(self.refused_line, extra={"reason": str(exc), "trigger": trigger})

    def _unchanged(self, trigger: str, *, news: bool) -> None:
        """A file back at what is in use is logged once; a SIGHUP finding nothing new is
        logged at most once per REPEAT_LOG_INTERVAL."""
        if self._may_repeat(news):
            self.log.info(
                self.unchanged_line,
                extra={"trigger": trigger, **self.count_fields(self._current)},
            )

    def _may_repeat(self, news: bool) -> bool:
        """Whether to log: always for news, which starts a quiet REPEAT_LOG_INTERVAL as a
        repeat logged does (so a SIGHUP right after a new version is logged says nothing)."""
        now = time.monotonic()
        if not news and now < self._quiet_until:
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
                self.log.error(self.failed_line, extra={"error": type(exc).__name__})

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
