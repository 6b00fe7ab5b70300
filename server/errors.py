"""Domain errors that refuse a call.

They carry no gRPC types: the transport layer maps each class to a status code and
google.rpc details. Messages are shown to callers, so they never hold secrets or prompt text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad argument: `field` is a dotted path such as `arguments.guidelines`."""

    field: str
    description: str


class ServiceError(Exception):
    """A call refused by the service; `reason` becomes the google.rpc.ErrorInfo reason."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class Unauthenticated(ServiceError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    reason = "PERMISSION_DENIED"


class ToolNotFound(ServiceError):
    reason = "TOOL_NOT_FOUND"


class FeatureDisabled(ServiceError):
    reason = "AI_SERVICES_DISABLED"


class InvalidArgument(ServiceError):
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.violations = list(violations or [])


class RetryLater(ServiceError):
    """Base for refusals that tell the caller when to come back."""

    def __init__(
        self,
        message: str,
        retry_after: float,
        *,
        metadata: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after
        # Extra trailing metadata for the caller, e.g. x-ratelimit-limit.
        self.headers: dict[str, str] = dict(headers or {})


class RateLimited(RetryLater):
    reason = "RATE_LIMIT_EXCEEDED"


class Overloaded(RetryLater):
    reason = "OVERLOADED"


class ShuttingDown(RetryLater):
    reason = "SHUTTING_DOWN"


class DeadlineExceeded(ServiceError):
    reason = "DEADLINE_EXCEEDED"
