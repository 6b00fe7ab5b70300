"""Reading the small files an operator points the server at: the API keys and tools files,
certificates.

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


def read_text_file(
    path: str | os.PathLike[str],
    max_bytes: int,
    *,
    fail: Callable[[str], Exception],
    check_mode: Callable[[int], None] | None = None,
) -> str:
    """An operator's TOML file as text (`read_small_file`, then UTF-8); each way it can fail is
    raised as `fail(reason)`, the reader's own one-line error saying why."""
    try:
        return read_small_file(path, max_bytes, check_mode=check_mode).decode("utf-8")
    except NotRegularFile as exc:
        raise fail(f"cannot read it ({exc})") from None
    except FileTooLarge as exc:
        raise fail(str(exc)) from None
    except UnicodeDecodeError:
        raise fail("not valid TOML (not UTF-8 text)") from None
    except OSError as exc:
        raise fail(f"cannot read it ({exc.strerror or exc})") from None


def refuse_writable_by_others(mode: int, could_add: str, fail: Callable[[str], Exception]) -> None:
    """Raise `fail(reason)` when group or others may write the file: they could add
    `could_add` (a key, a tool) to what the server trusts."""
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise fail(
            f"is writable by group or others (mode {stat.S_IMODE(mode):04o}), so they could add "
            f"{could_add}: run chmod go-w on it"
        )
