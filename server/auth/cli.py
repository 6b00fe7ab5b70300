"""`python -m server keys ...`: mint keys and hash existing ones for the keys file.

`keys new` prints the clear key exactly once, then the `[[keys]]` entry (with the hash only)
that an operator pastes into the keys file: the server itself never sees or stores the key.
`keys hash` reads a key on stdin (not argv, which lands in shell history and `ps`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import NoReturn

from server.auth.keys import (
    KEY_ID_RULE,
    NAME_RULE,
    generate_key,
    hash_key,
    is_valid_key_id,
    is_valid_key_text,
    is_valid_name,
)
from server.ratelimit.gcra import RateLimitError, check_rate_limit

__all__ = ["keys_main"]

_PROG = "python -m server keys"
_USAGE_EXIT = 2


class _UsageError(Exception):
    """Bad usage; carries the one line to print before exiting with status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting, so the caller
    prints a single line and `keys_main` returns instead of killing the process."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def _build_parser() -> _Parser:
    parser = _Parser(prog=_PROG, description="Manage API keys for the aiservices keys file.")
    commands = parser.add_subparsers(dest="command", metavar="{new,hash}")
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

    commands.add_parser("hash", help="read a key on stdin and print its sha256: hash")
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
    permissions = ", ".join(_toml_string(p) for p in dict.fromkeys(args.permissions))
    lines = [
        f"key: {key}",
        "(shown only once: hand it to the caller now; the server keeps only its hash)",
        "",
        "# Add this entry to the API keys file:",
        "[[keys]]",
        f"id = {_toml_string(args.id)}",
        f"hash = {_toml_string(hash_key(key))}",
        f"permissions = [{permissions}]",
    ]
    if args.organization is not None:
        lines.append(f"organization = {_toml_string(args.organization)}")
    if args.burst is not None:
        lines.append(
            f"rate_limit = {{ burst = {args.burst}, per_minute = {_toml_number(args.per_minute)} }}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


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


def keys_main(argv: list[str]) -> int:
    """Run `keys <argv...>`; returns the exit status (2 with one line on stderr on bad usage)."""
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "new":
            return _new(args)
        return _hash()
    except _UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return _USAGE_EXIT
    except SystemExit as exc:  # --help: argparse printed it and wants to exit
        return exc.code if isinstance(exc.code, int) else 0
