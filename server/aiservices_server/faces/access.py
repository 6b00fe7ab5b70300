"""The access line every face writes, one per call, with the same fields whatever the transport:
who called, what was asked, how it ended, how long it took, and what the upstream did."""

from __future__ import annotations

import logging
from typing import Any

from aiservices_server.call import Principal
from aiservices_server.core.service import MAX_NAME_SHOWN
from aiservices_server.upstream.refiner import UpstreamAttempt

access_log = logging.getLogger("aiservices.access")


def log_access(
    *,
    transport: str,
    request_id: str,
    method: str,
    code: str,
    duration: float,
    key_id: str,
    caller: Principal | None = None,
    tool: str | None = None,
    outcome: str = "",
    trace_id: str = "",
    upstream: UpstreamAttempt | None = None,
    payload: dict[str, Any] | None = None,
) -> None:
    """One INFO line on `aiservices.access`; `outcome` is OK or the tool error code of a call
    that ran, `payload` its arguments and result when payload logging is on."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "transport": transport,
        "method": method,
        "code": code,
        "duration_ms": round(duration * 1e6) / 1000,
        "key_id": key_id,
    }
    if caller is not None and caller.user_id is not None:
        fields["user_id"] = caller.user_id
    if caller is not None and caller.organization is not None:
        fields["organization"] = caller.organization
    if tool:
        fields["tool"] = tool[:MAX_NAME_SHOWN]
    if outcome:
        fields["outcome"] = outcome
    if upstream is not None:
        fields["upstream_status"] = upstream.status
        fields["upstream_ms"] = round(upstream.seconds * 1e6) / 1000
        if upstream.tokens is not None:
            fields["prompt_tokens"], fields["completion_tokens"] = upstream.tokens
    if trace_id:
        fields["trace_id"] = trace_id
    if payload is not None:
        fields["payload"] = payload
    access_log.info("rpc", extra=fields)
