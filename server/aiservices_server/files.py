"""Reading the small files an operator points the server at: the API keys file, certificates.

Each is opened without blocking (a FIFO in its place is refused, not waited on), must be a
regular file, and is read up to a byte bound: a larger file is the wrong one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable


class NotRegularFile(ValueError):
    """The path names a directory, a FIFO, a device: anything but a regular file."""


class FileTooLarge(ValueError):
    """The file holds more than the bound its reader allows."""


def read_small_file(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    check_mode: Callable[[int], None] | None = None,
) -> bytes:
    """The file's bytes, at most `max_bytes` of them.

    `check_mode(st_mode)` runs before anything is read, so it may refuse the file by raising.
    Raises NotRegularFile or FileTooLarge (saying so in a few words), and OSError as the
    system reports it.
    """
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile("not a regular file")
        if check_mode is not None:
            check_mode(mode)
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLarge(f"too large (over {max_bytes >> 20} MiB)")
    return data
