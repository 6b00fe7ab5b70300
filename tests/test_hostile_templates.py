"""Hostile templates, from a caller or in a model's reply, cannot stall the server.

Each call goes through the real generated client to the real server and the HTTP stand-in
upstream, and while it runs, health checks sent on their own channel must answer within
100 ms (`responsive_during`). The inputs are the ones that held the event loop for seconds to
hours: whitespace after an unclosed `{{` (the old scanner's regexes backtracked over every
split of it), jinja2 token floods and constant expressions jinja2 evaluates while analysing,
and model output far larger than any template.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from aiservices import ToolClient, ToolResult, ToolServiceError
from aiservices_server.tools.refine_prompt import MAX_TEMPLATE_CHARS
from aiservices_server.tools.templates import JINJA2_MAX_TOKENS, TemplateFormat, template_variables
from tests.standin import REFINE_SUFFIX, Reply, StandinUpstream
from tests.support.responsive import responsive_during
from tests.support.servers import ServerThread

TOOL = "tools.agenta.api.refine_prompt"
SPACES = " " * 50_000

# jinja2 is loaded by the first jinja2 template a process sees, once: tens of milliseconds
# that are not what these tests measure (the work each call does), so it is loaded here.
template_variables(["{{ warm }}"], TemplateFormat.JINJA2)


def template(content: str, template_format: str) -> str:
    return json.dumps(
        {"messages": [{"role": "user", "content": content}], "template_format": template_format}
    )


def refine(server: ServerThread, client: ToolClient, content: str, template_format: str) -> Any:
    """CallTool with a one-message template, checked to leave the server responsive."""
    arguments = {"prompt_template_json": template(content, template_format)}
    return responsive_during(server, lambda: client.call_tool(TOOL, arguments))


@pytest.mark.parametrize(
    ("template_format", "content"),
    [
        ("curly", "Hi {{name}}. {{" + SPACES),
        ("curly", "Hi {{name}}. {{" + "\t" * 30_000 + "}"),
        ("mustache", "Hi {{name}}. {{" + SPACES),
        ("mustache", "Hi {{name}}. {{#" + SPACES),
        ("mustache", "Hi {{name}}. {{{" + SPACES),
        # Valid jinja2 whose constants jinja2 would compute while analysing it: 100 MB here.
        ("jinja2", 'Hi {{ name }}. {{ "a" * 10**8 }}'),
        ("jinja2", 'Hi {{ name }}. {% autoescape "a" * 10**8 %}{% endautoescape %}'),
    ],
)
def test_a_hostile_template_is_refined_while_the_server_stays_responsive(
    server: ServerThread, client: ToolClient, template_format: str, content: str
) -> None:
    result = refine(server, client, content, template_format)

    assert not result.is_error, result.text
    [message] = result.structured_content["messages"]
    assert message == {"role": "user", "content": content + REFINE_SUFFIX}


def test_a_jinja2_token_flood_is_invalid_argument_while_the_server_stays_responsive(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    content = "{{ " + "a, " * 30_000 + "a }}"

    with pytest.raises(ToolServiceError) as caught:
        refine(server, client, content, "jinja2")

    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    violations = dict(error.field_violations)
    assert f"more than {JINJA2_MAX_TOKENS} tokens" in violations["arguments.prompt_template_json"]
    assert upstream.requests == []


# --- a hostile model ------------------------------------------------------------------------


def refine_with_reply(
    server: ServerThread,
    client: ToolClient,
    upstream: StandinUpstream,
    source: str,
    refined: str,
    template_format: str,
) -> ToolResult:
    """The model answers `refined` for the one-message template `source`."""
    data = {"messages": [{"role": "user", "content": refined}], "summary": "Refined."}
    upstream.push(Reply(json.dumps(data)))
    result: ToolResult = refine(server, client, source, template_format)
    return result


@pytest.mark.parametrize("template_format", ["curly", "mustache"])
def test_model_output_that_would_backtrack_is_checked_while_the_server_stays_responsive(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream, template_format: str
) -> None:
    kept = refine_with_reply(
        server, client, upstream, "Hi {{name}}", "Hello {{name}}! {{" + SPACES, template_format
    )
    assert not kept.is_error, kept.text
    assert kept.structured_content is not None
    assert kept.structured_content["messages"][0]["content"].endswith(SPACES)

    dropped = refine_with_reply(
        server, client, upstream, "Hi {{name}}", "Hello! {{#" + SPACES, template_format
    )
    assert dropped.is_error
    assert dropped.error is not None
    assert dropped.error.code == "INVALID_MODEL_OUTPUT"
    assert "dropped template variables: name" in dropped.text


def test_model_output_jinja2_would_evaluate_is_checked_while_the_server_stays_responsive(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    refined = 'Hello {{ name }}. {{ "a" * 10**8 }}'
    result = refine_with_reply(server, client, upstream, "Hi {{ name }}", refined, "jinja2")
    assert not result.is_error, result.text
    assert result.structured_content is not None
    assert result.structured_content["messages"][0]["content"] == refined


def test_model_output_longer_than_any_template_is_invalid_model_output(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    # Plain text costs jinja2 a few milliseconds per 100,000 characters, and a reply may hold
    # megabytes: the output is bounded like a template before it is scanned.
    refined = "Hello {{ name }}. " + "Be brief. " * 300_000
    result = refine_with_reply(server, client, upstream, "Hi {{ name }}", refined, "jinja2")
    assert result.is_error
    assert result.error is not None
    assert result.error.code == "INVALID_MODEL_OUTPUT"
    assert f"more than {MAX_TEMPLATE_CHARS} characters" in result.text


def test_a_dropped_variable_is_named_shortly_however_long_its_name(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    name = "n" * 50_000
    result = refine_with_reply(server, client, upstream, "Hi {{" + name + "}}", "Hi", "curly")
    assert result.error is not None
    assert result.error.code == "INVALID_MODEL_OUTPUT"
    assert result.text.endswith("dropped template variables: " + "n" * 37 + "...")


def test_model_output_that_jinja2_cannot_take_says_why(
    server: ServerThread, client: ToolClient, upstream: StandinUpstream
) -> None:
    flood = "Hello {{ name }}. " + "{{ a }}" * JINJA2_MAX_TOKENS
    result = refine_with_reply(server, client, upstream, "Hi {{ name }}", flood, "jinja2")
    assert result.error is not None
    assert result.error.code == "INVALID_MODEL_OUTPUT"
    assert result.text.endswith(
        f"it is too long for template_format jinja2: more than {JINJA2_MAX_TOKENS} tokens"
    )

    broken = refine_with_reply(server, client, upstream, "Hi {{ name }}", "Hi {{ name", "jinja2")
    assert broken.error is not None
    assert broken.text.endswith("it is not valid jinja2")
