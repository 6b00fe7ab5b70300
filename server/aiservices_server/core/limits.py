"""Rate limits for tool calls: GCRA per (organisation, user or key id, tool), one budget for a
caller whichever face it calls through.

GetStatus and ListTools (and their counterparts on other faces) are not limited: they are cheap
and callers poll them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from aiservices_server.call import Principal
from aiservices_server.errors import RateLimited
from aiservices_server.ratelimit import Decision, RateLimit, RateLimiter

if TYPE_CHECKING:
    # A type only: the module serves metrics over HTTP (prometheus_client, http.server).
    from aiservices_server.metrics import Metrics

LIMIT_HEADER = "x-ratelimit-limit"
REMAINING_HEADER = "x-ratelimit-remaining"


@dataclass(frozen=True, slots=True)
class Charge:
    """One unit taken from a caller's budget for one tool, and what the limiter said."""

    key: str
    limit: RateLimit
    decision: Decision

    def headers(self) -> dict[str, str]:
        """What the caller is told with the answer: the burst and the calls left now."""
        return {
            LIMIT_HEADER: str(self.decision.limit),
            REMAINING_HEADER: str(self.decision.remaining),
        }


class RateLimits:
    """Charges tool calls to their caller's budget, and gives a unit back when a call that was
    charged never ran.

    The limit is the key's own (`Principal.rate_limit`) or `default`. A refusal is RateLimited
    with the retry delay, counted in the metrics by tool and key id.
    """

    def __init__(self, limiter: RateLimiter, default: RateLimit, metrics: Metrics) -> None:
        self._limiter = limiter
        self._default = default
        self._metrics = metrics

    async def charge(self, principal: Principal, tool: str) -> Charge:
        caller = f"u:{principal.user_id}" if principal.user_id else f"k:{principal.key_id}"
        key = f"{principal.organization or '-'}|{caller}|{tool}"
        limit = principal.rate_limit or self._default
        charge = Charge(key, limit, await self._limiter.acquire(key, limit))
        if not charge.decision.allowed:
            self._metrics.rate_limited.labels(tool, principal.key_id).inc()
            raise RateLimited(
                f"rate limit exceeded for {tool}: {limit.burst} call"
                f"{'' if limit.burst == 1 else 's'}, then "
                f"{limit.per_minute:g} per minute",
                charge.decision.retry_after,
                metadata={"tool": tool, "limit": str(charge.decision.limit)},
                headers=charge.headers(),
            )
        return charge

    async def refund(self, charge: Charge) -> Charge:
        """Give the unit back; the returned charge says how many calls are left now."""
        await self._limiter.refund(charge.key, charge.limit)
        return replace(
            charge, decision=replace(charge.decision, remaining=charge.decision.remaining + 1)
        )
