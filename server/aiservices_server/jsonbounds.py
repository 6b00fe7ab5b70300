"""How many values JSON from outside holds, found without building them: a parse of a huge
reply, or a check of a huge answer, would hold the event loop far past its budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["holds_more_values", "may_hold_more_values"]


def may_hold_more_values(text: str | bytes | bytearray, limit: int) -> bool:
    """Whether a JSON parse of `text` might build more than `limit` values.

    Every array element follows `[` or `,`, every object member (a key and a value) `{` or `,`,
    so the values number at most twice the count of those characters, plus one. Counting runs
    at memchr speed and is skipped for text too short to hold that many.
    """
    if 2 * len(text) + 1 <= limit:
        return False
    if isinstance(text, str):
        openers = text.count("[") + text.count("{") + text.count(",")
    else:
        openers = text.count(b"[") + text.count(b"{") + text.count(b",")
    return 2 * openers + 1 > limit


def holds_more_values(value: Any, limit: int) -> bool:
    """Whether `value`, JSON already parsed, holds more than `limit` values (object members
    and list items): a walk with its own stack that stops as soon as the count runs out."""
    left = limit
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            left -= len(node)
            items: Iterable[Any] = node.values()
        elif isinstance(node, list):
            left -= len(node)
            items = node
        else:
            continue
        if left < 0:
            return True
        stack.extend(items)
    return False
