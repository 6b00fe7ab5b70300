"""Rate limiting of CallTool per (organisation, user or key id, tool) with GCRA.

GetStatus and ListTools are not limited: they are cheap and callers poll them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from server.errors import Overloaded, RateLimited, ServiceError
from server.identity import Principal
from server.ratelimit import RateLimit, RateLimiter
from server.transport.interceptors.base import Behaviour, Context, UnaryInterceptor
from server.transport.state import CallState, current_call
from server.transport.status import abort

LIMITED_METHODS = frozenset({"/aiservices.v1.ToolService/CallTool"})


def _unit_unused(state: CallState, error: ServiceError) -> None:
    """Refused as OVERLOADED, the call never ran: its unit goes back, and the trailers say so."""
    if isinstance(error, Overloaded):
        state.rate_limit_unit_unused = True
        remaining = state.trailers.get("x-ratelimit-remaining")
        if remaining is not None and remaining.isdigit():
            state.trailers["x-ratelimit-remaining"] = str(int(remaining) + 1)


class RateLimitInterceptor(UnaryInterceptor):
    def __init__(
        self,
        limiter: RateLimiter,
        default: RateLimit,
        *,
        may_call: Callable[[Principal, str], bool],
        on_refusal: Callable[[str, str], None] | None = None,
    ) -> None:
        self._limiter = limiter
        self._default = default
        self._may_call = may_call
        self._on_refusal = on_refusal
        self._limits: dict[tuple[int, float], RateLimit] = {}

    def _limit_for(self, override: tuple[int, float] | None) -> RateLimit:
        if override is None:
            return self._default
        limit = self._limits.get(override)
        if limit is None:
            limit = self._limits[override] = RateLimit(burst=override[0], per_minute=override[1])
        return limit

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        if method not in LIMITED_METHODS:
            return behaviour

        async def run(request: Any, context: Context) -> Any:
            tool: str = request.name
            state = current_call()
            principal = state.principal
            if not self._may_call(principal, tool):
                # Unknown tool or no permission: dispatch answers NOT_FOUND or PERMISSION_DENIED
                # without spending the caller's budget.
                return await behaviour(request, context)
            caller = f"u:{principal.user_id}" if principal.user_id else f"k:{principal.key_id}"
            key = f"{principal.organization or '-'}|{caller}|{tool}"
            limit = self._limit_for(state.key_rate_limit)
            decision = await self._limiter.acquire(key, limit)
            state.trailers["x-ratelimit-limit"] = str(decision.limit)
            state.trailers["x-ratelimit-remaining"] = str(decision.remaining)
            if not decision.allowed:
                if self._on_refusal is not None:
                    self._on_refusal(tool, principal.key_id)
                error = RateLimited(
                    f"rate limit exceeded for {tool}: {limit.burst} calls, then "
                    f"{limit.per_minute:g} per minute",
                    decision.retry_after,
                    metadata={"tool": tool, "limit": str(decision.limit)},
                )
                await abort(context, error, state.trailers)
            state.on_refusal(_unit_unused)
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                if state.rate_limit_unit_unused:
                    await self._limiter.refund(key, limit)
                raise

        return run
