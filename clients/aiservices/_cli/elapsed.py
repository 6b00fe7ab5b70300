"""The spinner and elapsed seconds shown on a terminal while a call runs."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TextIO

# The line appears only for calls that make a person wonder whether anything runs.
ELAPSED_AFTER = 1.0
ELAPSED_TICK = 0.1


class Elapsed:
    """While a call runs longer than ELAPSED_AFTER seconds, a spinner and the seconds elapsed on
    `stream`, if it is a terminal; the line is cleared when the call ends. Scripts reading a
    pipe never see it."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Elapsed:
        if self._stream.isatty():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        start = time.monotonic()
        if self._done.wait(ELAPSED_AFTER):
            return
        frames = "|/-\\"
        tick = 0
        while True:
            seconds = time.monotonic() - start
            frame = frames[tick % len(frames)]
            self._stream.write(f"\r{frame} {self._label}: {seconds:.1f} s elapsed")
            self._stream.flush()
            tick += 1
            if self._done.wait(ELAPSED_TICK):
                break
        self._stream.write("\r\x1b[2K")
        self._stream.flush()
