"""Domain errors that refuse a call.

They carry no gRPC types: the transport layer maps each class to a status code and
google.rpc details. Messages are shown to callers, so they never hold secrets or prompt text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# What one refusal may report: a caller's request can name any number of fields, of any length,
# and all of it would go back in the status trailer.
MAX_VIOLATIONS = 20
MAX_FIELD_CHARS = 120
MAX_DESCRIPTION_CHARS = 200


def clip(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` characters; a cut one ends with "..." (ASCII: it goes into
    gRPC trailers, where anything else is percent-encoded)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class FieldViolation:
    """One bad argument: `field` is a dotted path such as `arguments.guidelines`.

    Both texts are clipped (MAX_FIELD_CHARS, MAX_DESCRIPTION_CHARS): a field path may quote
    a key the caller made up, of any length."""

    field: str
    description: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "field", clip(self.field, MAX_FIELD_CHARS))
        object.__setattr__(self, "description", clip(self.description, MAX_DESCRIPTION_CHARS))


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
    """Bad input; `violations` keeps the first MAX_VIOLATIONS of those given.

    `not_shown` counts the violations left out: those given beyond the cap plus `more` found but
    not given; `not_shown_exact` is False when `more` is only a lower bound (finding every
    violation would cost more than the request is worth).
    """

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        more: int = 0,
        more_is_exact: bool = True,
    ) -> None:
        super().__init__(message, metadata=metadata)
        given = list(violations or [])
        self.violations = given[:MAX_VIOLATIONS]
        self.not_shown = len(given) - len(self.violations) + more
        self.not_shown_exact = more_is_exact


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
