"""When to send a call again and how long to wait first: pure decisions, no sleeping.

Both clients ask the same two questions after an attempt (`delay_after_error`,
`delay_after_result`); only how they wait differs. `service_config` builds the JSON for gRPC's
own retry and load-balancing layer, for callers who want that instead (never both).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from aiservices._convert import duration_delay
from aiservices.errors import ToolServiceError
from aiservices.v1 import tool_service_pb2 as pb

__all__ = ["NO_RETRY", "RetryPolicy", "service_config"]

SERVICE_NAME = "aiservices.v1.ToolService"
_MAX_ATTEMPTS = 100
_MAX_MULTIPLIER = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """Which failed calls to send again, how often, and how long to wait in between.

    Only what cannot have done harm and may pass with time is retried: UNAVAILABLE, and
    RESOURCE_EXHAUSTED that carries a retry delay (RetryInfo); tool results with `retryable`
    set only when `retry_tool_errors` is True. Every other status is raised at once.

    The wait before attempt n+1 is a jittered exponential backoff (`jitter="full"`: uniform in
    [0, min(max_backoff, initial_backoff * multiplier**(n-1))]; `"decorrelated"`: uniform in
    [initial_backoff, 3 * previous wait], capped at max_backoff), and never shorter than the
    delay the server asked for. `deadline` (seconds) bounds the whole call, every attempt and
    every wait: an attempt gets at most what is left of it, and a wait that would reach past it
    is not started; the last error is raised (or the last tool error returned) instead. So is a
    server's delay over `max_server_delay`: the caller decides whether to wait that long.
    `random` returns floats in [0, 1); replace it to make the jitter predictable.
    """

    max_attempts: int = 3
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: Literal["full", "decorrelated"] = "full"
    deadline: float | None = None
    max_server_delay: float = 30.0
    retry_tool_errors: bool = False
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= _MAX_ATTEMPTS:
            raise ValueError(f"max_attempts must be 1 to {_MAX_ATTEMPTS}, got {self.max_attempts}")
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_backoff < self.initial_backoff:
            raise ValueError("max_backoff must be at least initial_backoff")
        if not 1.0 <= self.multiplier <= _MAX_MULTIPLIER:
            raise ValueError(f"multiplier must be 1 to {_MAX_MULTIPLIER}, got {self.multiplier}")
        if self.jitter not in ("full", "decorrelated"):
            raise ValueError(f"jitter must be 'full' or 'decorrelated', got {self.jitter!r}")
        if not (math.isfinite(self.max_server_delay) and self.max_server_delay >= 0):
            raise ValueError(
                f"max_server_delay must be a number >= 0, got {self.max_server_delay!r}"
            )
        if self.deadline is not None and not (math.isfinite(self.deadline) and self.deadline > 0):
            raise ValueError(f"deadline must be a positive number, got {self.deadline!r}")

    def backoff(self, attempt: int, previous: float) -> float:
        """The jittered wait after failed attempt `attempt` (1-based); `previous` is the wait
        before it (0 after the first attempt)."""
        if self.jitter == "full":
            ceiling = self.initial_backoff * self.multiplier ** (attempt - 1)
            return min(self.max_backoff, ceiling) * self.random()
        low = self.initial_backoff
        high = max(low, previous * 3)
        return min(self.max_backoff, low + (high - low) * self.random())


NO_RETRY = RetryPolicy(max_attempts=1)
"""Pass as a call's `retry` to send that call once even when the client has a policy."""


def delay_after_error(
    policy: RetryPolicy, error: ToolServiceError, attempt: int, previous: float, left: float | None
) -> float | None:
    """Seconds to wait before sending again after `error`, or None to raise it now. `left` is
    what remains of the policy's deadline (None: no deadline)."""
    if error.code is grpc.StatusCode.UNAVAILABLE:
        server_delay = error.retry_after or 0.0
    elif error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
        server_delay = error.retry_after
    else:
        return None
    return _delay(policy, attempt, previous, server_delay, left)


def delay_after_result(
    policy: RetryPolicy,
    response: pb.CallToolResponse,
    attempt: int,
    previous: float,
    left: float | None,
) -> float | None:
    """Seconds to wait before calling the tool again after this result, or None to return it:
    only a retryable tool error, and only when the policy asks for tool errors to be retried."""
    if not (policy.retry_tool_errors and response.is_error and response.error.retryable):
        return None
    server_delay = 0.0
    if response.error.HasField("retry_after"):
        server_delay = duration_delay(response.error.retry_after) or 0.0
    return _delay(policy, attempt, previous, server_delay, left)


def _delay(
    policy: RetryPolicy, attempt: int, previous: float, server_delay: float, left: float | None
) -> float | None:
    if attempt >= policy.max_attempts or server_delay > policy.max_server_delay:
        return None
    wait = max(policy.backoff(attempt, previous), server_delay)
    if left is not None and wait >= left:
        return None  # waiting would use up the deadline with nothing left to try
    return wait


def service_config(
    *,
    load_balancing: Literal["round_robin", "pick_first"] | None = None,
    retry_attempts: int = 0,
    initial_backoff: float = 0.2,
    max_backoff: float = 5.0,
    multiplier: float = 2.0,
) -> str:
    """A `grpc.service_config` JSON for ToolService: gRPC's own retries of UNAVAILABLE
    (`retry_attempts` >= 2; gRPC caps it at 5) and a load-balancing policy (`round_robin`
    spreads calls over every address a `dns:///` target resolves to)."""
    config: dict[str, Any] = {}
    if load_balancing is not None:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retry_attempts >= 2:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": retry_attempts,
                    "initialBackoff": f"{initial_backoff}s",
                    "maxBackoff": f"{max_backoff}s",
                    "backoffMultiplier": multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)
