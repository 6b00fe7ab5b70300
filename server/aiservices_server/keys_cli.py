"""`aiservices-server keys ...`: mint keys, hash existing ones, list and revoke the file's keys.

`keys new` shows the clear key exactly once, with the `[[keys]]` entry that holds only its hash:
the server itself never sees or stores the key. With `--append FILE` it adds the entry to the
file and prints only the key on stdout (for scripts); without, it prints the entry on stdout
(valid TOML, for a file or a review) and the key on stderr. `keys hash` reads a key on stdin
(not argv, which lands in shell history and `ps`). `keys list` prints the file's entries in the
same TOML, without their hashes; `keys revoke ID` removes one.

Every edit of the file (`new --append`, `revoke`) holds an exclusive lock on its directory,
reads the file under it, and renames a complete new file into place, so concurrent editors
never lose an edit and a running server (which reloads the file when it changes) never reads
half a file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import re
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from aiservices_server.auth.keys import (
    KEY_ID_RULE,
    NAME_RULE,
    ApiKey,
    KeysFileError,
    generate_key,
    hash_key,
    is_valid_key_id,
    is_valid_key_text,
    is_valid_name,
    load_keys_file,
    load_keys_text,
    read_keys_text,
)
from aiservices_server.config import SettingsError, load_settings
from aiservices_server.core.auth import ACT_FOR_USERS
from aiservices_server.ratelimit.gcra import RateLimitError, check_rate_limit
from aiservices_server.tools import refine_prompt

__all__ = ["keys_main"]

_PROG = "aiservices-server keys"
_USAGE_EXIT = 2
# How long an edit waits for another keys command to finish its own.
_LOCK_TIMEOUT = 10.0
# What a key's permission may usefully name: a built-in tool's permission, every tool, or
# delegation. Anything else is most likely a typo (`edit_workflow`), which nothing would refuse.
_KNOWN_PERMISSIONS = frozenset({refine_prompt.PERMISSION, "*", ACT_FOR_USERS})


class _UsageError(Exception):
    """Bad usage; carries the one line to print before exiting with status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting, so the caller
    prints a single line and `keys_main` returns instead of killing the process."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def _build_parser() -> _Parser:
    parser = _Parser(prog=_PROG, description="Manage API keys for the aiservices keys file.")
    commands = parser.add_subparsers(dest="command", metavar="{new,hash,list,revoke}")
    commands.required = True

    new = commands.add_parser("new", help="generate a key and print its [[keys]] entry")
    new.add_argument("--id", required=True, help="key id shown in logs and metrics")
    new.add_argument(
        "--permission",
        dest="permissions",
        action="append",
        required=True,
        metavar="P",
        help='a permission (repeat for more; "*" grants all)',
    )
    new.add_argument("--organization", help="organization the key acts for")
    new.add_argument("--burst", type=int, help="rate-limit burst (with --per-minute)")
    new.add_argument("--per-minute", type=float, help="rate-limit rate (with --burst)")
    new.add_argument(
        "--append",
        type=Path,
        metavar="FILE",
        help="add the entry to the keys file FILE (created when missing) and print only the key",
    )

    commands.add_parser("hash", help="read a key on stdin and print its sha256: hash")

    listing = commands.add_parser("list", help="print the keys file's entries, without hashes")
    revoke = commands.add_parser("revoke", help="remove one key from the keys file")
    revoke.add_argument("id", help="id of the key to remove")
    for command in (listing, revoke):
        command.add_argument(
            "--file",
            type=Path,
            help="the keys file (default: AGENTA_AI_SERVICES_API_KEYS_FILE)",
        )
    return parser


def _toml_string(value: str) -> str:
    """A TOML basic string; escapes what TOML requires so any value round-trips."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _entry_lines(
    key_id: str,
    permissions: list[str],
    organization: str | None,
    rate_limit: tuple[int, float] | None,
    key_hash: str | None = None,
) -> list[str]:
    """One `[[keys]]` table, as `keys new` prints it (`keys list` leaves the hash out)."""
    lines = ["[[keys]]", f"id = {_toml_string(key_id)}"]
    if key_hash is not None:
        lines.append(f"hash = {_toml_string(key_hash)}")
    lines.append(f"permissions = [{', '.join(_toml_string(p) for p in permissions)}]")
    if organization is not None:
        lines.append(f"organization = {_toml_string(organization)}")
    if rate_limit is not None:
        burst, per_minute = rate_limit
        lines.append(f"rate_limit = {{ burst = {burst}, per_minute = {_toml_number(per_minute)} }}")
    return lines


def _check_name(what: str, value: str) -> None:
    """Same rule as the file loader, so a printed entry always loads."""
    if not is_valid_name(value):
        raise _UsageError(f"{_PROG} new: {what} {NAME_RULE}")


def _new(args: argparse.Namespace) -> int:
    if not is_valid_key_id(args.id):
        raise _UsageError(f"{_PROG} new: --id {KEY_ID_RULE}")
    for permission in args.permissions:
        _check_name("--permission", permission)
    if args.organization is not None:
        _check_name("--organization", args.organization)
    if (args.burst is None) != (args.per_minute is None):
        raise _UsageError(f"{_PROG} new: --burst and --per-minute go together")
    if args.burst is not None:
        # The rule the server applies when it loads the file: an entry printed here loads.
        try:
            check_rate_limit(args.burst, args.per_minute)
        except RateLimitError as exc:
            option = "--" + exc.field.replace("_", "-")
            raise _UsageError(f"{_PROG} new: {option} {exc.problem}") from None

    key = generate_key()
    entry = _entry_lines(
        args.id,
        list(dict.fromkeys(args.permissions)),
        args.organization,
        None if args.burst is None else (args.burst, args.per_minute),
        hash_key(key),
    )
    if args.append is not None:
        path, count = _append(args.append, args.id, "\n".join(entry) + "\n")
        _write_out(key + "\n")
        sys.stderr.write(f'added "{args.id}" to {path}: {_count(count)} in it\n')
    else:
        _write_out("\n".join(entry) + "\n")
        sys.stderr.write(
            f"key: {key}\n(shown only once: hand it to the caller now; the entry on stdout "
            "holds only its hash)\n"
        )
    for permission in dict.fromkeys(args.permissions):
        if permission not in _KNOWN_PERMISSIONS:
            sys.stderr.write(
                f'{_PROG} new: warning: no tool this server serves needs "{permission}" '
                f"(known: {', '.join(sorted(_KNOWN_PERMISSIONS))})\n"
            )
    return 0


def _write_out(text: str) -> None:
    """stdout, flushed: what follows on stderr comes after it, in a pipe as on a terminal."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _append(given: Path, key_id: str, entry: str) -> tuple[Path, int]:
    """Add `entry` to the keys file under the edit lock; the file's path and its key count.
    A missing file is created, readable by its owner only, as the server requires."""
    # The real file behind a symlink is replaced, not the link.
    path = Path(os.path.realpath(given))
    with _editing(path, "new"):
        exists = path.exists()
        with _refusing_bad_files("new"):
            text = read_keys_text(path) if exists else ""
            keys = load_keys_text(text, path) if exists else []
        if any(key.id == key_id for key in keys):
            raise _UsageError(f'{_PROG} new: {path} already has a key "{key_id}"')
        separator = "" if not text.strip() else ("\n" if text.endswith("\n") else "\n\n")
        appended = text + separator + entry
        loaded = _loads_as(path, appended)
        if loaded is None or [key.id for key in loaded] != [*[key.id for key in keys], key_id]:
            raise _UsageError(
                f"{_PROG} new: cannot append to {path} without changing its other entries "
                "(its last table is not [[keys]]): add the entry by hand"
            )
        mode = stat.S_IMODE(os.stat(path).st_mode) if exists else 0o600
        _write_atomically(path, appended, mode)
    return path, len(loaded)


def _hash() -> int:
    # A terminal gets a prompt without echo; a pipe is read as is.
    text = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.read()
    lines = text.strip().splitlines()
    if not lines:
        raise _UsageError(f"{_PROG} hash: no key on stdin")
    if len(lines) > 1:
        raise _UsageError(f"{_PROG} hash: expected one key on stdin, got {len(lines)} lines")
    key = lines[0]
    if not is_valid_key_text(key):
        raise _UsageError(
            f"{_PROG} hash: a key is printable ASCII without spaces (it could never be presented)"
        )
    sys.stdout.write(hash_key(key) + "\n")
    return 0


def _keys_file(command: str, given: Path | None) -> Path:
    """`--file`, else the server's own setting (environment or `.env`)."""
    if given is not None:
        return given
    try:
        path = load_settings().api_keys_file
    except SettingsError as exc:
        raise _UsageError(f"{_PROG} {command}: {exc}") from None
    if path is None:
        raise _UsageError(
            f"{_PROG} {command}: no keys file: pass --file or set AGENTA_AI_SERVICES_API_KEYS_FILE"
        )
    return path


@contextlib.contextmanager
def _refusing_bad_files(command: str) -> Iterator[None]:
    """A keys file that cannot be read or does not load ends the command with its one line."""
    try:
        yield
    except KeysFileError as exc:
        raise _UsageError(f"{_PROG} {command}: {exc}") from None


def _count(keys: int) -> str:
    return f"{keys} key" if keys == 1 else f"{keys} keys"


def _list(args: argparse.Namespace) -> int:
    path = _keys_file("list", args.file)
    blocks = []
    with _refusing_bad_files("list"):
        keys = load_keys_file(path)
    for key in keys:
        limit = key.rate_limit
        blocks.append(
            _entry_lines(
                key.id,
                sorted(key.permissions),
                key.organization,
                None if limit is None else (limit.burst, limit.per_minute),
            )
        )
    sys.stdout.write(f"# {_count(len(blocks))} in {path}\n\n")
    sys.stdout.write("\n\n".join("\n".join(block) for block in blocks) + "\n")
    return 0


_KEYS_HEADER = re.compile(r"\s*\[\[\s*keys\s*\]\]\s*(#.*)?")


def _without_entry(text: str, index: int) -> str | None:
    """`text` without its `index`-th `[[keys]]` table and the comment lines right above it; None
    when the tables cannot be told apart line by line (the caller checks the result anyway)."""
    lines = text.splitlines(keepends=True)
    headers = [n for n, line in enumerate(lines) if _KEYS_HEADER.fullmatch(line.rstrip("\r\n"))]
    if index >= len(headers):
        return None

    def start(header: int) -> int:
        while header > 0 and lines[header - 1].lstrip().startswith("#"):
            header -= 1
        return header

    end = start(headers[index + 1]) if index + 1 < len(headers) else len(lines)
    return "".join(lines[: start(headers[index])] + lines[end:])


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Replace `path` with `text`: a temp file in the same directory, written, synced and given
    `mode`, then renamed over it, so a reader sees the old file or the new one, never a part."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def _editing(path: Path, command: str) -> Iterator[None]:
    """Hold the exclusive edit lock of the keys file at `path`: a `flock` on its directory,
    which outlives the renames that replace the file and leaves no lock file behind."""
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _UsageError(f"{_PROG} {command}: cannot open {path.parent}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _UsageError(
                        f"{_PROG} {command}: another keys command has been editing {path} for "
                        f"{_LOCK_TIMEOUT:.0f} s; nothing was changed, try again"
                    ) from None
                time.sleep(0.02)  # a CLI waiting its turn: other editors finish in milliseconds
        yield
    finally:
        os.close(directory)  # releases the lock


def _revoke(args: argparse.Namespace) -> int:
    # The real file behind a symlink is replaced, not the link.
    path = Path(os.path.realpath(_keys_file("revoke", args.file)))
    with _editing(path, "revoke"):
        left = _revoke_under_lock(path, args.id)
    sys.stdout.write(f'revoked "{args.id}": {_count(left)} left in {path}\n')
    return 0


def _revoke_under_lock(path: Path, key_id: str) -> int:
    """Remove `key_id`'s entry from the file; how many keys are left."""
    with _refusing_bad_files("revoke"):
        text = read_keys_text(path)
        keys = load_keys_text(text, path)
    index = next((n for n, key in enumerate(keys) if key.id == key_id), None)
    if index is None:
        raise _UsageError(f'{_PROG} revoke: no key "{key_id}" in {path}')
    if len(keys) == 1:
        raise _UsageError(
            f'{_PROG} revoke: "{key_id}" is the only key in {path}, and the server refuses a '
            "file without keys: add its successor first"
        )
    rewritten = _without_entry(text, index)
    expected = keys[:index] + keys[index + 1 :]
    if rewritten is None or _loads_as(path, rewritten) != expected:
        raise _UsageError(
            f'{_PROG} revoke: cannot remove "{key_id}" from {path} without changing other '
            "entries (its layout is unusual): remove its [[keys]] table by hand"
        )
    _write_atomically(path, rewritten, stat.S_IMODE(os.stat(path).st_mode))
    return len(expected)


def _loads_as(path: Path, text: str) -> list[ApiKey] | None:
    """The keys `text` holds, checked as the server would check it; None if it fails."""
    try:
        return load_keys_text(text, path)
    except KeysFileError:
        return None


def keys_main(argv: list[str]) -> int:
    """Run `keys <argv...>`; returns the exit status (2 with one line on stderr on bad usage)."""
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "new":
            return _new(args)
        if args.command == "list":
            return _list(args)
        if args.command == "revoke":
            return _revoke(args)
        return _hash()
    except _UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return _USAGE_EXIT
    except SystemExit as exc:  # --help: argparse printed it and wants to exit
        return exc.code if isinstance(exc.code, int) else 0
