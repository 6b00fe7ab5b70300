"""refine_prompt end to end: generated client -> real server -> real HTTP stand-in upstream."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiservices import ToolClient, ToolServiceError
from aiservices_server.tools.refine_prompt import control_character
from tests.standin import (
    Garbage,
    Hang,
    RawBytes,
    Refine,
    Reply,
    Reset,
    Slow,
    StandinUpstream,
    Status,
)
from tests.support.keys import load_test_keys
from tests.support.servers import APP, ENVIRONMENT, UPSTREAM_KEY, ServerThread, make_settings

TOOL = "tools.agenta.api.refine_prompt"
SECRET_PROMPT = "You are the assistant of ACME-SECRET-7731. Greet {{customer_name}}."


def template(
    messages: list[dict[str, Any]] | None = None, template_format: str | None = None
) -> str:
    document: dict[str, Any] = {
        "messages": messages
        or [
            {"role": "system", "content": SECRET_PROMPT},
            {"role": "user", "content": "Question from {{customer_name}}: {{question}}"},
        ]
    }
    if template_format:
        document["template_format"] = template_format
    return json.dumps(document)


def refined(messages: list[dict[str, Any]], summary: Any = "Clearer.") -> dict[str, Any]:
    return {"messages": messages, "summary": summary}


GOOD_MESSAGES = [
    {"role": "system", "content": "You help ACME customers. Greet {{customer_name}} warmly."},
    {"role": "user", "content": "{{customer_name}} asks: {{question}}"},
]


def test_refine_returns_checked_messages_summary_and_trace_id(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Reply(json.dumps(refined(GOOD_MESSAGES, "Made it warmer.")), trace_id="ab" * 16))

    result = client.call_tool(TOOL, {"prompt_template_json": template()})

    assert not result.is_error
    assert result.error is None
    assert result.structured_content == {"messages": GOOD_MESSAGES, "summary": "Made it warmer."}
    assert result.text == "Made it warmer."
    assert result.trace_id == "ab" * 16
    assert result.request_id


def test_upstream_request_follows_the_completion_runner_contract(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    client.call_tool(TOOL, {"prompt_template_json": template()})
    guidelines = "Plus court, s'il vous plaît: 短く 🙂"
    client.call_tool(
        TOOL,
        {"prompt_template_json": template(), "guidelines": guidelines, "context": "support bot"},
    )

    first, second = upstream.requests
    assert first.path == "/services/completion/run"
    assert first.headers["authorization"] == f"ApiKey {UPSTREAM_KEY}"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["accept"] == "application/json"
    assert first.headers["user-agent"].startswith("aiservices/")
    assert "transfer-encoding" not in first.headers
    assert first.body == {
        "inputs": {
            "__ag_prompt_template_json": template(),
            "__ag_guidelines": "",
            "__ag_context": "",
        },
        "environment": ENVIRONMENT,
        "app": APP,
    }
    assert second.body["inputs"]["__ag_guidelines"] == guidelines
    assert guidelines.encode() in second.raw  # UTF-8 as is, not \u escapes
    assert second.body["inputs"]["__ag_context"] == "support bot"


def test_default_stand_in_refinement_keeps_variables_of_every_format(
    client: ToolClient,
) -> None:
    result = client.call_tool(TOOL, {"prompt_template_json": template()})
    assert not result.is_error, result.text
    contents = [m["content"] for m in result.structured_content["messages"]]  # type: ignore[index]
    assert "{{customer_name}}" in contents[0]
    assert "{{question}}" in contents[1]


def test_a_100000_character_template_is_accepted(client: ToolClient) -> None:
    filler = "x" * (100_000 - len(template([{"role": "user", "content": ""}])))
    big = template([{"role": "user", "content": filler}])
    assert len(big) == 100_000

    result = client.call_tool(TOOL, {"prompt_template_json": big})

    assert not result.is_error, result.text


def test_data_may_be_an_object_and_trace_id_may_be_camel_case(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(
        Reply(refined(GOOD_MESSAGES), data_as_string=False, trace_id="cd" * 16, trace_key="traceId")
    )
    result = client.call_tool(TOOL, {"prompt_template_json": template()})
    assert not result.is_error
    assert result.trace_id == "cd" * 16


def test_null_summary_becomes_the_default(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(Reply(json.dumps(refined(GOOD_MESSAGES, None))))
    result = client.call_tool(TOOL, {"prompt_template_json": template()})
    assert not result.is_error
    assert result.text == "Prompt refined successfully."
    assert result.structured_content["summary"] == "Prompt refined successfully."  # type: ignore[index]


# --- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "field", "words"),
    [
        ({}, "arguments.prompt_template_json", "required"),
        ({"prompt_template_json": template(), "tone": "x"}, "arguments.tone", "unknown"),
        ({"prompt_template_json": 42}, "arguments.prompt_template_json", "string"),
        ({"prompt_template_json": ""}, "arguments.prompt_template_json", "at least 1"),
        ({"prompt_template_json": "x" * 100_001}, "arguments.prompt_template_json", "100000"),
        (
            {"prompt_template_json": template(), "guidelines": "g" * 10_001},
            "arguments.guidelines",
            "10000",
        ),
        (
            {"prompt_template_json": template(), "context": "c" * 10_001},
            "arguments.context",
            "10000",
        ),
        (
            {"prompt_template_json": template(), "guidelines": None},
            "arguments.guidelines",
            "string",
        ),
        ({"prompt_template_json": "not json {"}, "arguments.prompt_template_json", "JSON"),
        (
            # NaN is not JSON (RFC 8259), whatever Python's json module accepts.
            {"prompt_template_json": '{"messages": [{"role": "user", "content": "hi"}], "t": NaN}'},
            "arguments.prompt_template_json",
            "JSON",
        ),
        ({"prompt_template_json": "[1, 2]"}, "arguments.prompt_template_json", "object"),
        (
            {"prompt_template_json": '{"messages": []}'},
            "arguments.prompt_template_json",
            "messages",
        ),
        (
            {"prompt_template_json": '{"messages": [{"content": "hi"}]}'},
            "arguments.prompt_template_json",
            "role",
        ),
        (
            {"prompt_template_json": template(template_format="handlebars")},
            "arguments.prompt_template_json",
            "template_format",
        ),
        (
            {"prompt_template_json": template([{"role": "user", "content": "{oops"}], "fstring")},
            "arguments.prompt_template_json",
            "brace",
        ),
    ],
)
def test_bad_arguments_are_invalid_argument_with_field_violations(
    client: ToolClient,
    upstream: StandinUpstream,
    arguments: dict[str, Any],
    field: str,
    words: str,
) -> None:
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(TOOL, arguments)

    error = caught.value
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_ARGUMENT"
    fields = dict(error.field_violations)
    assert field in fields, error.field_violations
    assert words.lower() in fields[field].lower()
    assert "ACME-SECRET" not in str(error.message) + repr(error.field_violations)
    assert upstream.requests == []


# --- upstream failures ------------------------------------------------------------------


def call_expecting_tool_error(client: ToolClient, code: str) -> Any:
    result = client.call_tool(TOOL, {"prompt_template_json": template()})
    assert result.is_error, result.structured_content
    assert result.error is not None
    assert result.error.code == code, result.error
    assert result.structured_content is None
    assert result.text == result.error.message
    assert "ACME-SECRET" not in result.text
    assert UPSTREAM_KEY not in result.text
    return result


@pytest.mark.parametrize("status", [500, 502, 503])
def test_upstream_5xx_is_a_retryable_upstream_error(
    client: ToolClient, upstream: StandinUpstream, status: int
) -> None:
    upstream.push(Status(status))
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert result.error.retryable
    assert str(status) in result.text


def test_upstream_429_carries_its_retry_after(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Status(429, headers={"Retry-After": "7"}))
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert result.error.retryable
    assert result.error.retry_after == 7.0


def test_upstream_400_is_not_retryable(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(Status(400))
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert not result.error.retryable


def test_rejected_upstream_credentials_are_named(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Status(401))
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert "credentials" in result.text


def test_non_json_reply_is_an_upstream_error(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(Garbage())
    call_expecting_tool_error(client, "UPSTREAM_ERROR")


def test_reply_without_data_is_an_upstream_error(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Status(200, body={"version": "3.0", "trace_id": "x"}))
    call_expecting_tool_error(client, "UPSTREAM_ERROR")


def test_connection_reset_is_upstream_unavailable(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Reset())
    result = call_expecting_tool_error(client, "UPSTREAM_UNAVAILABLE")
    assert result.error.retryable


def test_connection_refused_is_upstream_unavailable(upstream: StandinUpstream) -> None:
    url = upstream.url
    upstream.stop_thread()  # nothing listens there any more
    with (
        ServerThread(make_settings(url)) as running,
        ToolClient(running.target, api_key=load_test_keys().editor, timeout=10) as client,
    ):
        result = call_expecting_tool_error(client, "UPSTREAM_UNAVAILABLE")
        assert result.error.retryable


def test_slow_upstream_beyond_the_timeout_is_upstream_timeout(upstream: StandinUpstream) -> None:
    upstream.push(Slow(3.0))
    with (
        ServerThread(make_settings(upstream.url, upstream_timeout=0.3)) as running,
        ToolClient(running.target, api_key=load_test_keys().editor, timeout=10) as client,
    ):
        result = call_expecting_tool_error(client, "UPSTREAM_TIMEOUT")
        assert result.error.retryable
    assert upstream.wait_for_disconnects(1, timeout=5)


def test_caller_deadline_is_deadline_exceeded_and_drops_the_upstream_request(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(Hang())
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(TOOL, {"prompt_template_json": template()}, timeout=0.5)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert upstream.wait_for_disconnects(1, timeout=5)


# --- model output checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("this is not json", "not valid JSON"),
        ('{"messages": [], "summary": NaN}', "not valid JSON"),
        (json.dumps(["a", "list"]), "not a JSON object"),
        (json.dumps({"summary": "no messages"}), "messages"),
        (json.dumps(refined([])), "messages"),
        (json.dumps(refined([{"role": "system"}, GOOD_MESSAGES[1]])), "role and content"),
        (json.dumps(refined([GOOD_MESSAGES[0]])), "1 messages where the template has 2"),
        (
            json.dumps(refined([GOOD_MESSAGES[0], {**GOOD_MESSAGES[1], "role": "assistant"}])),
            "roles",
        ),
        (json.dumps(refined(list(reversed(GOOD_MESSAGES)))), "roles"),
        (
            json.dumps(refined([GOOD_MESSAGES[0], {"role": "user", "content": "Ask away"}])),
            "question",
        ),
        (json.dumps(refined(GOOD_MESSAGES, 12)), "summary"),
    ],
)
def test_model_output_that_fails_checks_is_invalid_model_output(
    client: ToolClient, upstream: StandinUpstream, data: str, words: str
) -> None:
    upstream.push(Reply(data, trace_id="ef" * 16))
    result = call_expecting_tool_error(client, "INVALID_MODEL_OUTPUT")
    assert words in result.text
    assert result.trace_id == "ef" * 16


@pytest.mark.parametrize(
    ("template_format", "source", "kept", "dropped"),
    [
        ("curly", "Hi {{name}}, about {{topic}}", "Hello {{ name }}, re {{topic}}", "Hi {{name}}"),
        ("fstring", "Hi {name}, about {topic}", "Hello {name}: {topic}!", "Hello {name}"),
        (
            "jinja2",
            "Hi {{ name }}{% if topic %} about {{ topic|upper }}{% endif %}",
            "Hello {{name}}. {% if topic %}Topic: {{ topic }}{% endif %}",
            "Hello {{ name }}",
        ),
        (
            "mustache",
            "Hi {{name}}{{#items}}- {{label}}{{/items}}",
            "Hello {{name}}! {{#items}}* {{label}}{{/items}}",
            "Hello {{name}}! {{#items}}*{{/items}}",
        ),
    ],
)
def test_variables_are_checked_by_template_format(
    client: ToolClient,
    upstream: StandinUpstream,
    template_format: str,
    source: str,
    kept: str,
    dropped: str,
) -> None:
    source_json = template([{"role": "user", "content": source}], template_format)

    upstream.push(Reply(json.dumps(refined([{"role": "user", "content": kept}]))))
    ok = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert not ok.is_error, ok.text

    upstream.push(Reply(json.dumps(refined([{"role": "user", "content": dropped}]))))
    bad = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert bad.is_error
    assert bad.error is not None
    assert bad.error.code == "INVALID_MODEL_OUTPUT"
    assert "dropped template variables" in bad.text


def test_list_of_text_parts_content_is_understood(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    parts = [{"type": "text", "text": "Hi {{name}}"}, {"type": "text", "text": "({{topic}})"}]
    source_json = template([{"role": "user", "content": parts}])
    upstream.push(Reply(json.dumps(refined([{"role": "user", "content": "Hi {{name}}"}]))))
    result = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert result.is_error
    assert "topic" in result.text
    ok = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert not ok.is_error, ok.text


# --- control characters in model output ------------------------------------------------

# What model output may not hold, written out from the contract's code points (not taken from
# the server's own pattern): C0 controls but tab, newline and carriage return, DEL, C1 controls,
# and the bidirectional embeddings, overrides and isolates.
FORBIDDEN = frozenset(
    chr(code)
    for code in (
        *range(0x00, 0x09),
        0x0B,
        0x0C,
        *range(0x0E, 0x20),
        0x7F,
        *range(0x80, 0xA0),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
)
HOSTILE = {"ESC": "\x1b", "BEL": "\x07", "NUL": "\x00", "RLO": "\u202e"}
HIDDEN = "HIDDEN-MARK"


def holds(character: str) -> str:
    kind = "bidirectional control" if character == "\u202e" else "control"
    return f"holds a {kind} character U+{ord(character):04X}"


@pytest.mark.parametrize("character", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("where", ["messages[1].content", "summary"])
def test_a_control_character_in_model_output_is_invalid_model_output(
    client: ToolClient, upstream: StandinUpstream, character: str, where: str
) -> None:
    hostile = f"{HIDDEN}{character}[2J"
    messages = [GOOD_MESSAGES[0], dict(GOOD_MESSAGES[1])]
    summary = "Clearer."
    if where == "summary":
        summary = hostile
    else:
        messages[1]["content"] += hostile
    upstream.push(Reply(json.dumps(refined(messages, summary)), trace_id="cd" * 16))

    result = call_expecting_tool_error(client, "INVALID_MODEL_OUTPUT")

    # Where, and which character by its code point; never the text around it.
    assert result.text == f"the model's output was rejected: {where} {holds(character)}"
    assert result.error.retryable
    assert result.trace_id == "cd" * 16


def test_tab_newline_and_carriage_return_pass(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    messages = [
        GOOD_MESSAGES[0],
        {"role": "user", "content": "{{customer_name}} asks:\r\n\t{{question}}"},
    ]
    upstream.push(Reply(json.dumps(refined(messages, "Split\tthe question.\r\nDone."))))

    result = client.call_tool(TOOL, {"prompt_template_json": template()})

    assert not result.is_error, result.text
    assert result.structured_content == {
        "messages": messages,
        "summary": "Split\tthe question.\r\nDone.",
    }


def test_a_character_the_callers_message_holds_may_stay_in_that_message_only(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    # Right-to-left text isolates a left-to-right name with U+2066 ... U+2069.
    greeting = "\u05e9\u05dc\u05d5\u05dd \u2066{{customer_name}}\u2069"
    source = template(
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": greeting}]
    )

    kept = [
        {"role": "system", "content": "Be kind and brief."},
        {"role": "user", "content": greeting + "!"},
    ]
    upstream.push(Reply(json.dumps(refined(kept))))
    ok = client.call_tool(TOOL, {"prompt_template_json": source})
    assert not ok.is_error, ok.text
    assert ok.structured_content is not None
    assert ok.structured_content["messages"] == kept

    moved = [
        {"role": "system", "content": "Be kind, \u2066brief\u2069."},
        {"role": "user", "content": greeting},
    ]
    upstream.push(Reply(json.dumps(refined(moved))))
    bad = client.call_tool(TOOL, {"prompt_template_json": source})
    assert bad.is_error
    assert bad.error is not None
    assert bad.error.code == "INVALID_MODEL_OUTPUT"
    assert bad.text.endswith("messages[0].content holds a bidirectional control character U+2066")


# The characters just outside each forbidden range, which must pass.
NEIGHBOURS = frozenset("\t\n\r ~\xa0\u2029\u202f\u2065\u206a")
# Any text, with the forbidden characters and their neighbours drawn often enough to matter.
TEXT = st.text(alphabet=st.sampled_from(sorted(FORBIDDEN | NEIGHBOURS)) | st.characters())


@settings(max_examples=500, deadline=None)
@given(TEXT)
@example("\u2028\u2029\u200f\u061c\ufeff")  # separators and marks that are not refused
def test_control_character_finds_exactly_the_forbidden_characters(text: str) -> None:
    assert control_character(text) == next((c for c in text if c in FORBIDDEN), None)


@settings(max_examples=500, deadline=None)
@given(TEXT, TEXT)
def test_control_character_lets_through_only_what_the_source_holds(text: str, source: str) -> None:
    expected = next((c for c in text if c in FORBIDDEN and c not in source), None)
    assert control_character(text, source) == expected


# --- feature gate and lookup ------------------------------------------------------------


def test_disabled_when_upstream_settings_are_missing() -> None:
    settings = make_settings(None, api_key="k", api_url="http://127.0.0.1:9", environment_slug=" ")
    with (
        ServerThread(settings) as running,
        ToolClient(running.target, api_key=load_test_keys().editor, timeout=10) as client,
    ):
        status = client.status()
        assert status.enabled is False
        assert status.tools == []
        assert client.list_tools() == []
        with pytest.raises(ToolServiceError) as caught:
            client.call_tool(TOOL, {"prompt_template_json": template()})
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "AI_SERVICES_DISABLED"


def test_enabled_status_lists_refine_prompt(client: ToolClient) -> None:
    status = client.status()
    assert status.enabled is True
    [tool] = status.tools
    assert tool.name == TOOL
    assert tool.title
    assert tool.input_schema["required"] == ["prompt_template_json"]
    assert tool.input_schema["properties"]["prompt_template_json"]["maxLength"] == 100_000
    assert set(tool.output_schema["properties"]) == {"messages", "summary"}
    assert tool.annotations.read_only_hint is True
    assert tool.annotations.open_world_hint is True


def test_unknown_tool_is_not_found(client: ToolClient) -> None:
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool("tools.nope", {})
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "TOOL_NOT_FOUND"


def test_default_refinement_is_deterministic(client: ToolClient, upstream: StandinUpstream) -> None:
    upstream.push(Refine(summary="Tightened."))
    result = client.call_tool(TOOL, {"prompt_template_json": template()})
    assert result.text == "Tightened."


# --- hostile upstream replies and inputs -----------------------------------------------


def test_a_reply_that_is_not_http_is_an_upstream_error(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    upstream.push(RawBytes())
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert "not valid HTTP" in result.text


def test_a_deeply_nested_reply_is_an_upstream_error(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    upstream.push(Garbage(body=deep, content_type="application/json"))
    call_expecting_tool_error(client, "UPSTREAM_ERROR")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("99999999999999999999", 86_400.0), ("\u00b2", None), ("7", 7.0)],
)
def test_retry_after_is_read_safely(
    client: ToolClient, upstream: StandinUpstream, header: str, expected: float | None
) -> None:
    upstream.push(Status(429, headers={"Retry-After": header}))
    result = call_expecting_tool_error(client, "UPSTREAM_ERROR")
    assert result.error.retry_after == expected


@pytest.mark.parametrize(
    "content",
    ["{{ " + "9" * 5000 + " }}", "{{ " + "(" * 3000 + "x" + ")" * 3000 + " }}"],
)
def test_a_jinja2_template_jinja2_cannot_handle_is_invalid_argument(
    client: ToolClient, content: str
) -> None:
    source_json = template([{"role": "user", "content": content}], "jinja2")
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_model_output_jinja2_cannot_handle_is_invalid_model_output(
    client: ToolClient, upstream: StandinUpstream
) -> None:
    source_json = template([{"role": "user", "content": "Hi {{ name }}"}], "jinja2")
    bad = "Hi {{ name }} {{ " + "9" * 5000 + " }}"
    upstream.push(Reply(json.dumps(refined([{"role": "user", "content": bad}]))))
    result = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert result.error is not None
    assert result.error.code == "INVALID_MODEL_OUTPUT"


@pytest.mark.parametrize(
    ("template_format", "source", "broken"),
    [
        ("mustache", "{{#items}}- {{label}}{{/items}}", "{{items}} - {{label}}"),
        ("mustache", "{{^empty}}hi {{name}}{{/empty}}", "{{#empty}}hi {{name}}{{/empty}}"),
        ("fstring", "Pad {x:{width}}", "Pad {x}"),
    ],
)
def test_structure_of_variables_is_checked_too(
    client: ToolClient,
    upstream: StandinUpstream,
    template_format: str,
    source: str,
    broken: str,
) -> None:
    source_json = template([{"role": "user", "content": source}], template_format)
    upstream.push(Reply(json.dumps(refined([{"role": "user", "content": broken}]))))
    result = client.call_tool(TOOL, {"prompt_template_json": source_json})
    assert result.error is not None
    assert result.error.code == "INVALID_MODEL_OUTPUT"
    assert "dropped template variables" in result.text


def test_a_huge_unknown_tool_name_is_not_found_and_not_echoed_in_full(
    client: ToolClient,
) -> None:
    name = "tools." + "x" * 20_000
    with pytest.raises(ToolServiceError) as caught:
        client.call_tool(name, {})
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert len(caught.value.message) < 400
