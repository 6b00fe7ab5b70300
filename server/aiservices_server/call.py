"""Who is calling and by when: the facts of one call that every layer below the faces sees."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiservices_server.ratelimit.gcra import RateLimit


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key and, when it may act for users, the end user behind it.

    `rate_limit` is the key's own limit, or None for the service default."""

    key_id: str
    permissions: frozenset[str] = field(default_factory=frozenset)
    organization: str | None = None
    user_id: str | None = None
    rate_limit: RateLimit | None = None

    def may(self, permission: str) -> bool:
        return "*" in self.permissions or permission in self.permissions


ANONYMOUS = Principal(key_id="anonymous", permissions=frozenset({"*"}))
"""The caller when authentication is disabled (loopback only): may call every tool."""


@dataclass(frozen=True, slots=True)
class Call:
    """One request, made once by a face when it has authenticated the caller.

    `deadline` is a time.monotonic() instant, or None when the caller set none; `traceparent`
    is a W3C trace context already checked to be well formed, passed on to the upstream."""

    principal: Principal
    request_id: str
    deadline: float | None = None
    traceparent: str | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()
