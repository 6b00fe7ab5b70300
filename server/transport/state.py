"""Per-call state shared by the interceptors and the servicer of one RPC.

grpc.aio gives interceptors no way to hand objects to the handler, so the outermost
interceptor puts a CallState in a context variable; the call runs in one task, so every
layer of that call sees the same object.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from server.errors import ServiceError
from server.identity import ANONYMOUS, Principal


@dataclass
class CallState:
    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    principal: Principal = ANONYMOUS
    tool: str = ""
    trace_id: str = ""
    upstream_status: str | None = None
    upstream_latency: float | None = None
    tool_outcome: str = ""
    # Arguments and result, kept only when payload logging is switched on.
    payload: dict[str, Any] | None = None
    # Invocation metadata with text values, read once for every layer of the call.
    metadata: dict[str, str] = field(default_factory=dict)
    # Metadata names sent more than once: ambiguous for credentials and identities.
    repeated: frozenset[str] = frozenset()
    # The authenticated key's own rate limit (burst, per_minute), when it has one.
    key_rate_limit: tuple[int, float] | None = None
    # Set when the unit the rate limiter charged must be given back (the tool never ran).
    rate_limit_unit_unused: bool = False
    # Trailing metadata for the caller, sent with the status whether the call succeeds or not.
    trailers: dict[str, str] = field(default_factory=dict)
    # Run with the domain error just before a call is refused (while trailers can still change).
    # Hooks get the state as an argument: a hook holding it would make every call's state a
    # reference cycle, left for the garbage collector instead of freed when the call ends.
    refusal_hooks: list[Callable[[CallState, ServiceError], None]] | None = None

    def on_refusal(self, hook: Callable[[CallState, ServiceError], None]) -> None:
        if self.refusal_hooks is None:
            self.refusal_hooks = []
        self.refusal_hooks.append(hook)

    def refusing(self, error: ServiceError) -> None:
        for hook in self.refusal_hooks or ():
            hook(self, error)


_current: ContextVar[CallState | None] = ContextVar("aiservices_call_state", default=None)


def current_call() -> CallState:
    """The state of the running call; a fresh one when no interceptor made it (tests, tools)."""
    state = _current.get()
    if state is None:
        state = CallState(method="", request_id="")
        _current.set(state)
    return state


def begin_call(state: CallState) -> None:
    _current.set(state)
