"""tools.example.text.stats: how long a text is, in characters, words and lines, and about how
long it takes to read.

Settings (environment variables `AGENTA_AI_SERVICES_PLUGIN_EXAMPLE_<KEY>`):
`PERMISSION`, the permission a key needs to call the tool (default: the tool's name), and
`WORDS_PER_MINUTE`, the reading speed (default 200, 1 to 2,000).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiservices_server.call import Call
from aiservices_server.tools.base import JsonObject, ToolAnnotations, ToolDefinition, ToolResult
from aiservices_server.tools.plugins import ToolContext

NAME = "tools.example.text.stats"
MAX_TEXT_CHARS = 100_000
DEFAULT_WORDS_PER_MINUTE = 200
MAX_WORDS_PER_MINUTE = 2_000
SETTINGS = ("PERMISSION", "WORDS_PER_MINUTE")

INPUT_SCHEMA: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["text"],
    "properties": {
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS, "description": "The text."},
    },
}
OUTPUT_SCHEMA: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "required": ["characters", "words", "lines", "reading_seconds"],
    "properties": {
        "characters": {"type": "integer", "minimum": 0, "description": "Unicode characters."},
        "words": {"type": "integer", "minimum": 0, "description": "Runs of non-space."},
        "lines": {"type": "integer", "minimum": 0, "description": "Lines, the last unended."},
        "reading_seconds": {
            "type": "integer",
            "minimum": 0,
            "description": "Seconds to read the words at the configured speed, rounded up.",
        },
    },
}


@dataclass(frozen=True, slots=True)
class TextStats:
    characters: int
    words: int
    lines: int


def count(text: str) -> TextStats:
    """The counts of `text`, in one pass each (linear in its length)."""
    return TextStats(characters=len(text), words=len(text.split()), lines=len(text.splitlines()))


class TextStatsTool:
    """Counts a text. Runs no upstream call, so it never fails once its arguments are valid."""

    def __init__(
        self, *, permission: str = NAME, words_per_minute: int = DEFAULT_WORDS_PER_MINUTE
    ) -> None:
        self._words_per_minute = words_per_minute
        self._definition = ToolDefinition(
            name=NAME,
            title="Text statistics",
            description=(
                "Counts the characters, words and lines of a text and estimates how long it "
                f"takes to read at {words_per_minute} words a minute."
            ),
            input_schema=INPUT_SCHEMA,
            output_schema=OUTPUT_SCHEMA,
            permission=permission,
            annotations=ToolAnnotations(
                read_only_hint=True,
                destructive_hint=False,
                idempotent_hint=True,
                open_world_hint=False,
            ),
        )

    @property
    def definition(self) -> ToolDefinition:
        return self._definition

    async def call(self, arguments: JsonObject, call: Call) -> ToolResult:
        stats = count(arguments["text"])
        seconds = math.ceil(stats.words * 60 / self._words_per_minute)
        return ToolResult(
            text=(
                f"{stats.words} words, {stats.characters} characters, {stats.lines} lines; "
                f"about {seconds} s to read"
            ),
            structured={
                "characters": stats.characters,
                "words": stats.words,
                "lines": stats.lines,
                "reading_seconds": seconds,
            },
        )


def tools(context: ToolContext) -> list[TextStatsTool]:
    """The entry point: the tool, set up from the plugin's settings. ValueError for a setting
    it does not know or cannot use, which stops the server with a line naming the plugin."""
    settings = context.settings
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]} (known: {', '.join(SETTINGS)})")
    return [
        TextStatsTool(
            permission=settings.get("PERMISSION", NAME),
            words_per_minute=_words_per_minute(settings),
        )
    ]


def _words_per_minute(settings: Mapping[str, str]) -> int:
    value = settings.get("WORDS_PER_MINUTE", str(DEFAULT_WORDS_PER_MINUTE)).strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or not (
        1 <= int(value) <= MAX_WORDS_PER_MINUTE
    ):
        raise ValueError(
            f"WORDS_PER_MINUTE must be a whole number from 1 to {MAX_WORDS_PER_MINUTE:,}"
        )
    return int(value)
