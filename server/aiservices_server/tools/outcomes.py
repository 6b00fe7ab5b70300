"""What every upstream-backed tool does with what the upstream gave it: an UpstreamError becomes
the ToolFailure callers see, and the model's answer, JSON text perhaps fenced like a chat answer,
becomes a value. Shared by refine_prompt and the declared tools, so both fail alike.
"""

from __future__ import annotations

from typing import Any

import orjson

from aiservices_server.tools.base import ToolErrorCode, ToolFailure
from aiservices_server.upstream.refiner import (
    UpstreamBadReply,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)


def upstream_failure(error: UpstreamError) -> ToolFailure:
    """The tool error for an upstream failure: UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE or
    UPSTREAM_ERROR, retryable as the failure is, with the upstream's retry advice and the last
    HTTP attempt (for the access line). A refused upstream key is said to be the service's."""
    if isinstance(error, UpstreamTimeout):
        code = ToolErrorCode.UPSTREAM_TIMEOUT
    elif isinstance(error, UpstreamUnavailable):
        code = ToolErrorCode.UPSTREAM_UNAVAILABLE
    else:
        code = ToolErrorCode.UPSTREAM_ERROR
    retryable = error.retryable or isinstance(error, UpstreamUnavailable)
    if isinstance(error, UpstreamBadReply):
        retryable = False
    message = error.message
    if isinstance(error, UpstreamStatusError) and error.status in (401, 403):
        message += " (the service's upstream credentials were refused)"
    return ToolFailure(
        code, message, retryable=retryable, retry_after=error.retry_after, upstream=error.attempt
    )


def decode_model_json(data: Any) -> Any:
    """`data` is a JSON string (sometimes fenced like a chat answer, ```json ... ```) or
    already a parsed value; raises ValueError or RecursionError for text that is not JSON.

    The upstream layer has bounded the text's bytes and the values a parse may build."""
    if not isinstance(data, str):
        return data
    text = data.strip()
    if text.startswith("```"):
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    return orjson.loads(text)
