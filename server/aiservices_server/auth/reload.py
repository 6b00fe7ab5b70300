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
arrive, and all of it runs in one task, off the event loop for the reading and parsing. The
machinery is `aiservices_server.filereload`, shared with the tools file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from aiservices_server.auth.keys import (
    KeysFileError,
    KeyStore,
    load_keys_text,
    read_keys_text,
)
from aiservices_server.filereload import (
    REPEAT_LOG_INTERVAL,
    SETTLE,
    WATCH_INTERVAL,
    FileReloader,
    FileState,
    file_state,
)

__all__ = [
    "REPEAT_LOG_INTERVAL",
    "SETTLE",
    "WATCH_INTERVAL",
    "FileState",
    "KeysReloader",
    "file_state",
]

log = logging.getLogger("aiservices.auth")


class KeysReloader(FileReloader[KeyStore]):
    """Keeps the keys in use in step with the keys file at `path`.

    `install` receives each store that loaded; calls already authenticated keep the key they
    found. `keys` are those in use and `state` the file's state taken before they were read, so a
    change made while they loaded still counts as one. See `FileReloader` for the rest.
    """

    error = KeysFileError
    reloaded_line = "API keys reloaded"
    refused_line = "API keys file not reloaded: the keys in use stay"
    unchanged_line = "API keys file unchanged: nothing to reload"
    failed_line = "API keys file watcher failed"
    task_name = "keys-file-watcher"
    log = log

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
        super().__init__(path, install, current=keys, state=state, interval=interval, settle=settle)

    def read(self, path: Path) -> str:
        return read_keys_text(path)

    def parse(self, text: str, path: Path) -> KeyStore:
        return KeyStore(load_keys_text(text, path))

    def same(self, first: KeyStore, second: KeyStore) -> bool:
        return list(first) == list(second)

    def reloaded_fields(self, old: KeyStore, new: KeyStore) -> Mapping[str, object]:
        before, after = frozenset(old.ids()), frozenset(new.ids())
        return {"keys": len(new), "added": len(after - before), "removed": len(before - after)}

    def count_fields(self, current: KeyStore) -> Mapping[str, object]:
        return {"keys": len(current)}
