"""The port a declared tool calls on the Agenta upstream: run an app deployed on the completion
runner with inputs, get its answer (`data`), trace id and HTTP attempt, or an UpstreamError.

`agenta.AgentaCompletionClient` is the adapter (`POST {base}/services/completion/run` with
`{"inputs": ..., "environment": <slug>, "app": <app>}`), the same client refine_prompt's
adapter runs its app on: one endpoint, one transport, one set of limits.
"""

from __future__ import annotations

from typing import Protocol

from aiservices_server.upstream.agenta import CompletionReply


class AppRunner(Protocol):
    """Runs the app `app` with `inputs` within `time_left` seconds (None: the adapter's own
    timeout), passing `traceparent` on; raises UpstreamError."""

    async def run(
        self,
        app: str,
        inputs: dict[str, str],
        *,
        time_left: float | None = None,
        traceparent: str | None = None,
    ) -> CompletionReply: ...
