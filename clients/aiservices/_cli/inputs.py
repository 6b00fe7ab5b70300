"""What the command reads and writes locally: argument, template and test case files, stdin,
and the refined template (the key and TLS files are read by aiservices.settings). Every read is
bounded; every problem is a UsageError."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiservices.client import dict_to_struct

# Inputs are bounded like everything read from outside: the client sends at most 16 MiB.
MAX_INPUT_BYTES = 16 * 1024 * 1024


class UsageError(Exception):
    """Something on the command line or in a local file is wrong; exit 2."""


def read_bytes(path: str, what: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as file:
                data = file.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {limit:,} bytes")
    return data


def read_text(path: str, what: str) -> str:
    try:
        return read_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise UsageError(f"{where} is not valid JSON: nested too deeply") from None


def _fits_a_struct(arguments: dict[str, Any], where: str) -> None:
    """UsageError for numbers JSON allows but the Struct the call is sent as cannot carry."""
    try:
        dict_to_struct(arguments)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_object(text: str, where: str) -> dict[str, Any]:
    value = _parse_json(text, where)
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def test_cases_file(path: str) -> list[Any]:
    """`refine --test-cases FILE`: a JSON list of test cases, sent as they are (the server
    checks each against the tool's schema and names the field that is wrong)."""
    where = f"--test-cases file {path}"
    value = _parse_json(read_text(path, "--test-cases file"), where)
    if not isinstance(value, list):
        raise UsageError(f"{where} must be a JSON list, not {type(value).__name__}")
    _fits_a_struct({"test_cases": value}, where)
    return value


def call_arguments(spec: str) -> dict[str, Any]:
    """`--args`: the JSON object itself or `@FILE`, checked to fit the Struct it is sent as."""
    if spec.startswith("@"):
        path = spec[1:]
        text, where = read_text(path, "--args file"), f"--args file {path}"
    else:
        text, where = spec, "--args"
    value = parse_object(text, where)
    _fits_a_struct(value, where)
    return value


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: readers see
    the old file or the new one, never half of it. The file gets the mode it had, or a new
    file's (0666 less the umask), not the temporary file's private 0600. A symbolic link stays
    one: the file it points to is the one replaced."""
    path = Path(os.path.realpath(path))
    directory = path.parent
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), _mode_for(path))
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
