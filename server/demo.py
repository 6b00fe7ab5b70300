"""`make demo`: the service against the local stand-in upstream, ready for a first call.

The stand-in speaks the Agenta completion-runner contract and "refines" deterministically, so
a newcomer sees the whole path work without an Agenta deployment or an LLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path

from server.app import AiServicesServer, StartupError
from server.config import SettingsError, load_settings
from server.devkeys import ensure_dev_keys
from server.logs import configure_logging
from server.standin import StandinUpstream

DEMO_UPSTREAM_KEY = "demo-upstream-key"
EXAMPLE_TEMPLATE = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant for {{company}}."},
        {"role": "user", "content": "{{question}}"},
    ],
    "template_format": "curly",
}


def _instructions(target: str, key: str) -> str:
    body = json.dumps(
        {
            "name": "tools.agenta.api.refine_prompt",
            "arguments": {
                "prompt_template_json": json.dumps(EXAMPLE_TEMPLATE),
                "guidelines": "be concise",
            },
        }
    )
    buf = ".tools/node_modules/.bin/buf curl --protocol grpc --http2-prior-knowledge"
    return "\n".join(
        [
            f"aiservices demo: serving on {target} against a stand-in upstream",
            f"API key: {key}",
            "",
            "Try it (in another terminal):",
            f"  {buf} -H 'authorization: Bearer {key}' "
            f"http://{target}/aiservices.v1.ToolService/GetStatus",
            f"  {buf} -H 'authorization: Bearer {key}' -d {shlex.quote(body)} "
            f"http://{target}/aiservices.v1.ToolService/CallTool",
            "",
            "Stop with Ctrl-C.",
        ]
    )


async def run_demo() -> int:
    upstream = StandinUpstream(api_key=DEMO_UPSTREAM_KEY, record=False)
    await upstream.start()
    keys_file, key = ensure_dev_keys(Path(".dev"))
    settings = load_settings(
        api_key=DEMO_UPSTREAM_KEY,
        api_url=upstream.url,
        environment_slug="development",
        refine_prompt_key="ai-services-refine-prompt",
        api_keys_file=keys_file,
    )
    configure_logging(settings.log_level.value)
    server = AiServicesServer(settings)
    try:
        port = await server.start()
        host = settings.grpc_address.rpartition(":")[0]
        print(_instructions(f"{host}:{port}", key), file=sys.stderr, flush=True)
        await server.serve_until_signalled()
    finally:
        await upstream.stop()
    return 0


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except (SettingsError, StartupError) as exc:
        print(f"aiservices: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
