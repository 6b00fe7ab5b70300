"""What the command prints: error lines, tables, JSON results and message diffs."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Sequence
from itertools import zip_longest
from typing import Any

import grpc

from aiservices.client import ToolInfo, ToolResult, ToolServiceError
from aiservices.settings import ENV_API_KEY

PROG = "aiservices"
EXIT_UNREACHABLE = 4


# Control characters (but tab and newline) and the bidirectional overrides that reorder how a
# line reads, as JSON-style escapes: model output and server text must not drive the terminal.
_UNSAFE = {
    code: f"\\u{code:04x}"
    for code in (*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F))
    if code not in (0x09, 0x0A)
} | {code: f"\\u{code:04x}" for code in range(0x2066, 0x206A)}


def for_terminal(text: str) -> str:
    """`text` with every character that could move the cursor, recolour or reorder the
    terminal shown as an escape (`\\u001b`); valid inside JSON strings too."""
    return text.translate(_UNSAFE)


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line of at most `limit` characters, without control characters: a message
    from the server must not move the cursor or recolour the caller's terminal."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text[: limit * 4]).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def seconds(value: float) -> str:
    # Whole seconds, rounded up: waiting a little longer is always safe.
    return str(math.ceil(value))


# What a failed connection's message says about TLS, and what to do about it. gRPC words them
# in its own message only; `tls` says whether the command used TLS.
_TLS_HINTS = (
    ("WRONG_VERSION_NUMBER", True, "the server does not speak TLS: leave out --tls and --ca-file"),
    ("Socket closed", False, "the server may expect TLS: add --tls (and --ca-file for its CA)"),
    (
        "CERTIFICATE_VERIFY_FAILED",
        True,
        "the server's certificate is not trusted: pass --ca-file with the CA that signed it",
    ),
)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A non-OK status as the command reports it: a head (status and reason), the server's
    message, and hints on what to do."""

    head: str
    message: str
    hints: tuple[str, ...]


def refusal(err: ToolServiceError, target: str, *, tls: bool) -> Refusal:
    head = err.code.name
    if err.reason and err.reason != head:
        head += f" ({err.reason})"
    hints: list[str] = []
    hints.extend(f"{field}: {description}" for field, description in err.field_violations)
    if err.retry_after is not None:
        hints.append(f"retry after {seconds(err.retry_after)} s")
    support_id = err.error_metadata.get("support_id")
    if support_id:
        hints.append(f"support id {support_id}")
    permission = err.error_metadata.get("permission")
    if err.code is grpc.StatusCode.PERMISSION_DENIED and permission:
        hints.append(f"the key lacks the permission {permission}")
    if err.code is grpc.StatusCode.UNAUTHENTICATED:
        hints.append(f"check --api-key, --api-key-file or {ENV_API_KEY}")
    if err.reason is None and err.code is grpc.StatusCode.UNAVAILABLE:
        head = f"cannot reach {target}: {head}"
        hints.extend(
            hint for words, when, hint in _TLS_HINTS if words in err.message and tls == when
        )
    if err.reason is None and err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        hints.append("no answer in time; a longer --timeout may help")
    # gRPC's own words for an answer over this side's receive limit ("SERVER: ..." when the
    # server's limit refused the request).
    if (
        err.reason is None
        and err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        and "CLIENT: Received message larger than max" in err.message
    ):
        hints.append("the server's answer is larger than this command takes in one message")
    return Refusal(head, err.message, tuple(hints))


def refusal_line(err: ToolServiceError, target: str, *, tls: bool = False) -> str:
    """One line: the status, the reason when it adds something, the message and the hints."""
    found = refusal(err, target, tls=tls)
    line = f"{PROG}: {one_line(found.head)}: {one_line(found.message) or 'no message'}"
    # Hints carry server text too (field names echo the caller's keys): one line each, no escapes.
    return "; ".join([line, *(one_line(hint) for hint in found.hints)])


def refusal_json(err: ToolServiceError, target: str, *, tls: bool, exit_code: int) -> str:
    """The same as one JSON object, for `--json`: the status and reason apart, every detail."""
    found = refusal(err, target, tls=tls)
    error: dict[str, Any] = {
        "kind": "unreachable" if exit_code == EXIT_UNREACHABLE else "refused",
        "status": err.code.name,
        "reason": err.reason,
        "message": err.message,
        "hints": list(found.hints),
        "exitCode": exit_code,
    }
    if err.field_violations:
        error["fieldViolations"] = [
            {"field": field, "description": description}
            for field, description in err.field_violations
        ]
    if err.retry_after is not None:
        error["retryAfterSeconds"] = math.ceil(err.retry_after)
    if err.error_metadata:
        error["metadata"] = dict(err.error_metadata)
    return error_json(error)


def tool_error_line(result: ToolResult) -> str:
    error = result.error
    if error is None:
        return f"{PROG}: tool error: {one_line(result.text) or 'no message'}"
    line = f"{PROG}: tool error {error.code}: {one_line(error.message or result.text)}"
    if error.retryable:
        line += "; retryable"
        if error.retry_after is not None:
            line += f", retry after {seconds(error.retry_after)} s"
    return line


def tool_error_json(result: ToolResult, exit_code: int) -> str:
    error = result.error
    shown: dict[str, Any] = {
        "kind": "tool_error",
        "code": None if error is None else error.code,
        "message": result.text if error is None else (error.message or result.text),
        "retryable": error is not None and error.retryable,
        "exitCode": exit_code,
    }
    if error is not None and error.retry_after is not None:
        shown["retryAfterSeconds"] = math.ceil(error.retry_after)
    return error_json(shown)


def error_json(error: dict[str, Any]) -> str:
    """`{"error": {...}}` on one line, ASCII only: nothing in it can drive a terminal. Field
    names in lowerCamelCase, as every JSON the command prints (see aiservices.as_json)."""
    return json.dumps({"error": error}, separators=(",", ":"))


def _hints(tool: ToolInfo) -> str:
    notes = tool.annotations
    flags = [
        ("read-only", notes.read_only_hint),
        ("destructive", notes.destructive_hint),
        ("idempotent", notes.idempotent_hint),
        ("open-world", notes.open_world_hint),
    ]
    return ", ".join(name for name, on in flags if on)


def tools_table(tools: Sequence[ToolInfo]) -> str:
    rows = [("NAME", "TITLE", "HINTS")]
    rows += [(for_terminal(t.name), for_terminal(t.title), _hints(t)) for t in tools]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(
        f"{name:<{widths[0]}}  {title:<{widths[1]}}  {hints}".rstrip()
        for name, title, hints in rows
    )


def _message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def messages_diff(before: Sequence[Any], after: Sequence[Any]) -> list[str]:
    """A unified diff per message, headed by its number and role; unchanged ones in one line."""
    lines: list[str] = []
    for number, (old, new) in enumerate(zip_longest(before, after), start=1):
        role = next(
            (
                m["role"]
                for m in (new, old)
                if isinstance(m, dict) and isinstance(m.get("role"), str)
            ),
            "?",
        )
        label = f"message {number} ({role}"
        diff = difflib.unified_diff(
            _message_text(old).splitlines(),
            _message_text(new).splitlines(),
            fromfile=f"{label})",
            tofile=f"{label}, refined)",
            lineterm="",
        )
        lines.extend(list(diff) or [f"{label}): unchanged"])
    return lines
