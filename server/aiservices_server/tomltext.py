"""Reading a TOML file from outside: a check that runs before `tomllib` sees the text, and
tomllib's errors as one line.

tomllib keeps, for each key it defines, the tuple of every prefix of its dotted path: a key of k
parts costs it k tuples of up to k parts. A 200 KB line `a.a.a...` of 100,000 parts asks for
billions of tuple entries, and the process is killed for its memory before any error is raised.
No real file needs more than a handful of parts, so a key with more is refused before tomllib
sees the text.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

__all__ = ["MAX_KEY_PARTS", "TomlProblem", "has_deep_dotted_key", "load_toml"]

MAX_KEY_PARTS = 64

# Anything a bare key or the blanks around its dots cannot hold: a dot, a quote or a `#` to look
# at, anything else ends a key. One character class: a search cannot backtrack.
_SPECIAL = re.compile(r"[^A-Za-z0-9_\- \t]")


def _escaped(text: str, at: int) -> bool:
    """Whether the quote at `at` is escaped: an odd run of backslashes right before it."""
    start = at
    while start > 0 and text[start - 1] == "\\":
        start -= 1
    return (at - start) % 2 == 1


def _string_end(text: str, at: int) -> int:
    """The index just past the string that starts at `at` (a basic or literal string, on one
    line or multi-line), or the end of the text when it is not closed. Its text is skipped
    with `str.find`, a backslash escaping a quote only in basic strings."""
    quote = text[at]
    if text.startswith(quote * 3, at):
        delimiter, start = quote * 3, at + 3
    else:
        delimiter, start = quote, at + 1
    while True:
        end = text.find(delimiter, start)
        if end < 0:
            return len(text)
        if quote == '"' and _escaped(text, end):
            start = end + 1
            continue
        if len(delimiter) == 3:
            # Up to two quotes of the content may stand right before the closing three.
            run = 3
            while run < 5 and text.startswith(quote, end + run):
                run += 1
            return end + run
        return end + 1


def has_deep_dotted_key(text: str, max_parts: int = MAX_KEY_PARTS) -> bool:
    """Whether the TOML `text` holds a dotted key (or table header) of more than `max_parts`
    parts. Dots in strings and comments do not count; a float's one dot is no key's. One pass
    over the text, linear in its length."""
    dots = 0
    position = 0
    while True:
        found = _SPECIAL.search(text, position)
        if found is None:
            return False
        at = found.start()
        char = text[at]
        if char == ".":
            dots += 1
            if dots >= max_parts:
                return True
            position = at + 1
        elif char in "\"'":
            position = _string_end(text, at)
        elif char == "#":
            newline = text.find("\n", at)
            position = len(text) if newline < 0 else newline
        else:
            dots = 0
            position = at + 1


class TomlProblem(ValueError):
    """Why a TOML text cannot be read, in one line that quotes none of it."""


def load_toml(text: str, kind: str) -> dict[str, Any]:
    """The TOML `text` of a `kind` of file (say "keys file", for the message), its dotted keys
    checked first; TomlProblem for a key too deep or text that is not TOML."""
    if has_deep_dotted_key(text):
        raise TomlProblem(f"a dotted key of more than {MAX_KEY_PARTS} parts (no {kind} needs one)")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TomlProblem(_decode_problem(str(exc))) from None
    except RecursionError:
        raise TomlProblem("not valid TOML (nested too deeply)") from None


def _decode_problem(message: str) -> str:
    """tomllib's message, `msg (at line L, column C)`, as `line L, column C: msg`; read by
    splitting at its last " (at ", so no pattern runs over the text."""
    problem, found, where = message.rpartition(" (at ")
    if not found or not where.endswith(")"):
        return f"not valid TOML ({message[:200]})"
    return f"not valid TOML ({where[:-1]}: {problem[:200]})"
