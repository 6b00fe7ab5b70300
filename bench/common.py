"""What every benchmark process shares: the call it makes and the upstream's settings."""

from __future__ import annotations

import json
from typing import Any, Final

TOOL_NAME: Final = "tools.agenta.api.refine_prompt"
SYSTEM: Final = {"role": "system", "content": "You are helpful to {{name}}."}
USER: Final = {"role": "user", "content": "{{question}}"}
ARGUMENTS: Final = {"prompt_template_json": json.dumps({"messages": [SYSTEM, USER]})}
UPSTREAM_API_KEY: Final = "bench-upstream-key"
ENVIRONMENT_SLUG: Final = "production"
REFINE_PROMPT_KEY: Final = "bench-refine-prompt"
RUN_PATH: Final = "/services/completion/run"
REST_PATH: Final = "/tools/call"
# High enough that no benchmark load is ever refused, while every call still pays for a decision.
RATE_LIMIT_BURST: Final = 1_000_000
RATE_LIMIT_PER_MINUTE: Final = 6_000_000


def upstream_body(template_json: str) -> dict[str, Any]:
    """The completion-runner request body the service sends for a refine_prompt call."""
    inputs = {"__ag_prompt_template_json": template_json, "__ag_guidelines": "", "__ag_context": ""}
    return {"inputs": inputs, "environment": ENVIRONMENT_SLUG, "app": REFINE_PROMPT_KEY}
