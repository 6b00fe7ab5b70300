"""`make demo`: the service, gRPC and MCP, against the local stand-in upstream, ready for a
first call.

It prints commands that work as printed, from any directory: the MCP Inspector's CLI, a few
lines of Python with the MCP SDK's client, the `aiservices` command line (on an example template
it writes to `.dev/prompt.json`), and `buf curl` for gRPC. The stand-in speaks both upstream
contracts, the Agenta completion runner and OpenAI-compatible chat completions, and "refines"
deterministically, so a newcomer sees the whole path work without an Agenta deployment or an
LLM. `AGENTA_AI_SERVICES_UPSTREAM` (`make demo UPSTREAM=openai`) picks which of the two the
service calls, as it does for the server.

It also serves the declared tools of `examples/tools.toml` (or of the file
`AGENTA_AI_SERVICES_TOOLS_FILE` names), which the stand-in answers with output that fits each
tool's output schema, and prints an `aiservices call` for each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiservices_server.app import AiServicesServer, StartupError
from aiservices_server.config import SettingsError, UpstreamKind, load_settings
from aiservices_server.devkeys import ensure_dev_keys
from aiservices_server.logs import configure_logging
from aiservices_server.tools.declared import DeclaredToolSpec, ToolsFileError, load_tools_file
from aiservices_server.tools.refine_prompt import NAME as REFINE_PROMPT_NAME
from tests.standin import StandinUpstream
from tests.standin.schemas import instance

DEMO_UPSTREAM_KEY = "demo-upstream-key"
# The model name the service sends to the stand-in's chat completions (it echoes any name).
DEMO_MODEL = "stand-in"
# MCP is on in the demo, beside gRPC's 127.0.0.1:50051, unless MCP_ADDRESS says otherwise.
DEMO_MCP_ADDRESS = "127.0.0.1:50052"
TOOL = "tools.agenta.api.refine_prompt"
TOOLS = Path(__file__).resolve().parents[1] / ".tools"
TOOLS_BIN = TOOLS / "node_modules" / ".bin"
# The versions `make tools` installs, for the npx form when .tools/ holds none.
PINNED_TOOLS: dict[str, str] = json.loads((TOOLS / "package.json").read_text())["dependencies"]
BUF_PACKAGE = f"@bufbuild/buf@{PINNED_TOOLS['@bufbuild/buf']}"
INSPECTOR_PACKAGE = (
    f"@modelcontextprotocol/inspector@{PINNED_TOOLS['@modelcontextprotocol/inspector']}"
)
EXAMPLE_TEMPLATE = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{company}}."},
        {"role": "user", "content": "{{question}}"},
    ],
    "template_format": "curly",
}
EXAMPLE_ARGUMENTS = {
    "prompt_template_json": json.dumps(EXAMPLE_TEMPLATE),
    "guidelines": "be concise",
}
EXAMPLE_TOOLS_FILE = Path(__file__).resolve().parents[1] / "examples" / "tools.toml"
# Arguments the demo prints for the example tools; any other declared tool gets the stand-in's
# instance of its input schema.
DECLARED_EXAMPLE_ARGUMENTS: dict[str, dict[str, Any]] = {
    "tools.examples.support.classify_ticket": {
        "ticket": "I was charged twice for my March invoice. Please refund one of the charges.",
        "product": "Cloud Pro",
    },
    "tools.examples.text.extract_fields": {
        "text": "Invoice INV-2041, due 2026-04-30, total EUR 1,250.00.",
        "fields": ["invoice_number", "due_date", "total", "purchase_order"],
    },
    "tools.examples.prompts.generate_test_inputs": {
        "prompt_template_json": json.dumps(EXAMPLE_TEMPLATE),
        "count": 3,
        "focus": "questions the assistant should decline",
    },
}


def _npm_tool(binary: str, package: str) -> str:
    """The command for an npm tool: the copy `make tools` installed, else npx (needs network)."""
    path = TOOLS_BIN / binary
    return shlex.quote(str(path)) if path.exists() else f"npx -y {package}"


def inspector_commands(mcp_url: str, key: str) -> list[str]:
    """Shell commands for the MCP Inspector's CLI: list the tools, call refine_prompt.

    `--tool-args-json` passes the arguments verbatim: `--tool-arg name=value` would turn a
    value that looks like JSON (the template) into an object, which the schema refuses.
    `--stored-auth-only` keeps a wrong key a plain error: without it the Inspector answers the
    401 by starting an OAuth login, which this service does not offer.
    """
    inspector = _npm_tool("mcp-inspector", INSPECTOR_PACKAGE)
    base = (
        f"{inspector} --cli {mcp_url} --transport http --stored-auth-only "
        f"--header {shlex.quote(f'Authorization: Bearer {key}')}"
    )
    arguments = shlex.quote(json.dumps(EXAMPLE_ARGUMENTS))
    return [
        f"{base} --method tools/list",
        f"{base} --method tools/call --tool-name {TOOL} --tool-args-json {arguments}",
    ]


def python_command(mcp_url: str, key: str) -> str:
    """A shell command running a few lines of Python with the MCP SDK's own client."""
    lines = [
        "import asyncio",
        "import httpx2",
        "from mcp import Client",
        "from mcp.client.streamable_http import streamable_http_client",
        "",
        "async def main():",
        f"    http = httpx2.AsyncClient(headers={{'Authorization': 'Bearer {key}'}})",
        f"    transport = streamable_http_client({mcp_url!r}, http_client=http)",
        "    async with http, Client(transport) as client:",
        "        print([tool.name for tool in (await client.list_tools()).tools])",
        f"        result = await client.call_tool({TOOL!r}, {EXAMPLE_ARGUMENTS!r})",
        "        print(result.is_error, result.structured_content)",
        "",
        "asyncio.run(main())",
    ]
    python = shlex.quote(sys.executable)
    return "\n".join([f"{python} - <<'EOF'", *lines, "EOF"])


def buf_commands(target: str, key: str) -> list[str]:
    """`buf curl` commands for gRPC: GetStatus, then CallTool."""
    body = shlex.quote(json.dumps({"name": TOOL, "arguments": EXAMPLE_ARGUMENTS}))
    buf = _npm_tool("buf", BUF_PACKAGE)
    base = (
        f"{buf} curl --protocol grpc --http2-prior-knowledge "
        f"-H {shlex.quote(f'authorization: Bearer {key}')}"
    )
    service = f"http://{target}/aiservices.v1.ToolService"
    return [f"{base} {service}/GetStatus", f"{base} -d {body} {service}/CallTool"]


def cli_commands(target: str, key: str, template: Path) -> list[str]:
    """`aiservices` commands (the client package's console script, beside this interpreter):
    GetStatus, then refine the example template at `template`, printing a diff."""
    aiservices = shlex.quote(str(Path(sys.executable).parent / "aiservices"))
    env = f"AISERVICES_TARGET={shlex.quote(target)} AISERVICES_API_KEY={shlex.quote(key)}"
    guidelines = shlex.quote(str(EXAMPLE_ARGUMENTS["guidelines"]))
    return [
        f"{env} {aiservices} status",
        f"{env} {aiservices} refine {shlex.quote(str(template))} --guidelines {guidelines}",
    ]


def declared_arguments(spec: DeclaredToolSpec) -> dict[str, Any]:
    """The arguments the demo calls a declared tool with (see DECLARED_EXAMPLE_ARGUMENTS)."""
    name = spec.definition.name
    if name in DECLARED_EXAMPLE_ARGUMENTS:
        return DECLARED_EXAMPLE_ARGUMENTS[name]
    arguments = instance(spec.definition.input_schema)
    return arguments if isinstance(arguments, dict) else {}


def declared_commands(target: str, key: str, specs: Sequence[DeclaredToolSpec]) -> list[str]:
    """An `aiservices call` for each declared tool in `specs`."""
    aiservices = shlex.quote(str(Path(sys.executable).parent / "aiservices"))
    env = f"AISERVICES_TARGET={shlex.quote(target)} AISERVICES_API_KEY={shlex.quote(key)}"
    return [
        f"{env} {aiservices} call {spec.definition.name} "
        f"--args {shlex.quote(json.dumps(declared_arguments(spec)))}"
        for spec in specs
    ]


def served_specs(kind: UpstreamKind, specs: Sequence[DeclaredToolSpec]) -> list[DeclaredToolSpec]:
    """The declared tools the service serves on `kind` (those with something for it)."""
    if kind is UpstreamKind.OPENAI:
        return [spec for spec in specs if spec.messages is not None]
    return [spec for spec in specs if spec.agenta_app is not None]


def app_schemas(specs: Sequence[DeclaredToolSpec]) -> dict[str, dict[str, Any]]:
    """Each declared Agenta app's output schema, for the stand-in to answer it."""
    return {
        spec.agenta_app: spec.definition.output_schema
        for spec in specs
        if spec.agenta_app is not None
    }


def write_example_template(directory: Path) -> Path:
    """The example template as a file (`prompt.json` in `directory`), for `aiservices refine`."""
    path = directory / "prompt.json"
    path.write_text(json.dumps(EXAMPLE_TEMPLATE, indent=2) + "\n")
    return path.resolve()


def upstream_settings(kind: UpstreamKind, standin_url: str) -> dict[str, object]:
    """The settings that point the service's `kind` of upstream at the stand-in at
    `standin_url`: its Agenta completion runner, or its chat completions under `/v1`."""
    if kind is UpstreamKind.OPENAI:
        return {
            "openai_base_url": f"{standin_url}/v1",
            "openai_model": DEMO_MODEL,
            "openai_api_key": DEMO_UPSTREAM_KEY,
        }
    return {
        "api_key": DEMO_UPSTREAM_KEY,
        "api_url": standin_url,
        "environment_slug": "development",
        "refine_prompt_key": "ai-services-refine-prompt",
    }


def upstream_line(kind: UpstreamKind, standin_url: str) -> str:
    """The line saying which upstream the service calls, and where."""
    if kind is UpstreamKind.OPENAI:
        return (
            f"upstream: openai, a stand-in's OpenAI-compatible chat completions at "
            f"{standin_url}/v1, model {DEMO_MODEL}"
        )
    return f"upstream: agenta, a stand-in Agenta completion runner at {standin_url}"


def instructions(
    target: str,
    mcp_url: str | None,
    key: str,
    upstream: str = "a stand-in upstream",
    template: Path | None = None,
    declared: Sequence[DeclaredToolSpec] = (),
    tools_file: Path = EXAMPLE_TOOLS_FILE,
) -> str:
    """What the demo prints: where it serves, which upstream, the key, and commands that work as
    printed."""
    where = f"gRPC on {target}" + ("" if mcp_url is None else f", MCP at {mcp_url}")
    lines = [f"aiservices demo: {where}", upstream, f"API key: {key}", ""]
    if mcp_url is not None:
        lines += ["MCP, with the MCP Inspector's CLI (in another terminal):"]
        lines += [f"  {command}" for command in inspector_commands(mcp_url, key)]
        lines += ["", "MCP, with the Python SDK's client:", python_command(mcp_url, key), ""]
    if template is not None:
        lines += ["gRPC, with the aiservices command line:"]
        lines += [f"  {command}" for command in cli_commands(target, key, template)]
        lines += [""]
    lines += ["gRPC, with buf curl:"]
    lines += [f"  {command}" for command in buf_commands(target, key)]
    if declared:
        lines += ["", f"Declared tools ({tools_file}), with the aiservices command line:"]
        lines += [f"  {command}" for command in declared_commands(target, key, declared)]
    lines += ["", "Stop with Ctrl-C."]
    return "\n".join(lines)


async def run_demo() -> int:
    keys_file, key = ensure_dev_keys(Path(".dev"))
    # The environment's settings first: they say which upstream, and a bad one stops the demo
    # before anything listens.
    environment = load_settings(api_keys_file=keys_file)
    kind = environment.upstream
    tools_file = environment.tools_file or EXAMPLE_TOOLS_FILE
    specs = load_tools_file(tools_file, reserved_names=frozenset({REFINE_PROMPT_NAME}))
    upstream = StandinUpstream(
        api_key=DEMO_UPSTREAM_KEY,
        openai_api_key=DEMO_UPSTREAM_KEY,
        record=False,
        apps=app_schemas(specs),
    )
    await upstream.start()
    try:
        demo_settings = {
            "api_keys_file": keys_file,
            "tools_file": tools_file,
            **upstream_settings(kind, upstream.url),
        }
        settings = load_settings(**demo_settings)
        if settings.mcp_address is None:
            settings = load_settings(**demo_settings, mcp_address=DEMO_MCP_ADDRESS)
        configure_logging(settings.log_level.value)
        server = AiServicesServer(settings)
        server.handle_signals()
        port = await server.start()
        host = settings.grpc_address.rpartition(":")[0]
        mcp_url = None
        if server.mcp_port is not None and settings.mcp_host_port is not None:
            mcp_host = settings.mcp_host_port[0]
            scheme = "https" if settings.tls_cert_file is not None else "http"
            mcp_url = f"{scheme}://{_url_host(mcp_host)}:{server.mcp_port}/mcp"
        template = write_example_template(keys_file.parent)
        text = instructions(
            f"{host}:{port}",
            mcp_url,
            key,
            upstream_line(kind, upstream.url),
            template,
            served_specs(kind, specs),
            tools_file,
        )
        print(text, file=sys.stderr, flush=True)
        await server.serve_until_signalled()
    finally:
        await upstream.stop()
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except (SettingsError, StartupError, ToolsFileError) as exc:
        print(f"aiservices: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
