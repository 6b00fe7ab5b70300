"""The example plugin on its own: what its factory makes of the settings, that its tool passes
the server's start-up checks, and what a call returns (checked against its output schema)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType

import httpx
import pytest
from aiservices_plugin_example import NAME, TextStatsTool, tools
from jsonschema import Draft202012Validator

from aiservices_server.call import Call, Principal
from aiservices_server.tools.base import JsonObject, ToolResult
from aiservices_server.tools.plugins import ToolContext, check_tool
from aiservices_server.upstream.http import UpstreamLimits


def context(settings: Mapping[str, str] | None = None) -> ToolContext:
    """What the server gives the factory, with these plugin settings."""
    return ToolContext(
        plugin="example",
        transport=httpx.AsyncHTTPTransport(),
        limits=UpstreamLimits(timeout=5.0),
        settings=MappingProxyType(dict(settings or {})),
    )


def run(tool: TextStatsTool, arguments: JsonObject) -> ToolResult:
    call = Call(principal=Principal(key_id="test", permissions=frozenset({NAME})), request_id="1")
    return asyncio.run(tool.call(arguments, call))


def test_the_factory_makes_one_tool_that_passes_the_server_checks() -> None:
    [tool] = tools(context())
    assert check_tool(tool) is tool
    assert tool.definition.name == NAME
    assert tool.definition.permission == NAME
    assert tool.definition.annotations.read_only_hint is True


def test_the_permission_and_the_reading_speed_are_settings() -> None:
    [tool] = tools(context({"PERMISSION": "edit_workflows", "WORDS_PER_MINUTE": "60"}))
    assert tool.definition.permission == "edit_workflows"
    assert run(tool, {"text": "one two three"}).structured["reading_seconds"] == 3


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"WORDS_PER_MINUTE": "0"}, "WORDS_PER_MINUTE must be a whole number from 1 to 2,000"),
        ({"WORDS_PER_MINUTE": "fast"}, "WORDS_PER_MINUTE must be a whole number"),
        ({"WORDS_PER_MINUTE": "9" * 5000}, "WORDS_PER_MINUTE must be a whole number"),
        ({"WORDS_PER_MINUTES": "100"}, "unknown setting WORDS_PER_MINUTES"),
    ],
)
def test_a_bad_setting_is_refused_in_words(settings: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        tools(context(settings))


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("Hello world\nsecond line", (23, 4, 2)),
        ("", (0, 0, 0)),
        ("  \n\n", (4, 0, 2)),
        ("naïve café ☕\r\nend\n", (18, 4, 2)),
    ],
)
def test_a_call_counts_characters_words_and_lines(text: str, counts: tuple[int, int, int]) -> None:
    [tool] = tools(context())
    result = run(tool, {"text": text})
    characters, words, lines = counts
    assert result.structured["characters"] == characters
    assert result.structured["words"] == words
    assert result.structured["lines"] == lines
    assert result.text.startswith(f"{words} words, {characters} characters, {lines} lines")
    Draft202012Validator(tool.definition.output_schema).validate(result.structured)


def test_reading_time_rounds_up() -> None:
    [tool] = tools(context())
    assert run(tool, {"text": "word " * 201}).structured["reading_seconds"] == 61
