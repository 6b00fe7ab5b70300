"""Domain errors that refuse a call.

They carry no transport types: each face maps each class to its protocol's errors in one place
(the gRPC face: a status code and google.rpc details). Messages are shown to callers, so they
never hold secrets or prompt text.
"""

from __future__ import annotations

import logging
import math
import traceback
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Self

log = logging.getLogger("aiservices.server")

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
    """A call refused by the service; `reason` becomes the google.rpc.ErrorInfo reason.

    `metadata` is shown to the caller with the reason. `headers` are sent with the refusal
    (e.g. the rate limit left). `key_id` names the caller's key when it was recognised before
    the refusal, for the access log only.

    A refusal is never changed once made: a layer that adds headers to one it caught (the core,
    once it has charged the call) raises `with_headers(...)`, the same refusal built anew. A
    subclass whose constructor takes other arguments rebuilds itself.
    """

    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        key_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.headers: Mapping[str, str] = dict(headers or {})
        self.key_id = key_id

    def with_headers(self, headers: Mapping[str, str]) -> Self:
        """This refusal, built anew through its constructor, with `headers` added to its own
        (replacing any of the same name)."""
        return type(self)(
            self.message,
            metadata=self.metadata,
            key_id=self.key_id,
            headers={**self.headers, **headers},
        )


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
        key_id: str | None = None,
        more: int = 0,
        more_is_exact: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata, key_id=key_id, headers=headers)
        given = list(violations or [])
        self.violations = given[:MAX_VIOLATIONS]
        self.not_shown = len(given) - len(self.violations) + more
        self.not_shown_exact = more_is_exact

    def with_headers(self, headers: Mapping[str, str]) -> Self:
        # The violations kept are within the cap, so `not_shown` passes on as `more`.
        return type(self)(
            self.message,
            self.violations,
            metadata=self.metadata,
            key_id=self.key_id,
            more=self.not_shown,
            more_is_exact=self.not_shown_exact,
            headers={**self.headers, **headers},
        )


def retry_after_seconds(delay: float) -> int:
    """Whole seconds, at least 1: what a `retry-after` header promises."""
    return max(1, math.ceil(delay))


class RetryLater(ServiceError):
    """Base for refusals that tell the caller when to come back."""

    def __init__(
        self,
        message: str,
        retry_after: float,
        *,
        metadata: Mapping[str, str] | None = None,
        key_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, metadata=metadata, key_id=key_id, headers=headers)
        self.retry_after = retry_after

    def with_headers(self, headers: Mapping[str, str]) -> Self:
        return type(self)(
            self.message,
            self.retry_after,
            metadata=self.metadata,
            key_id=self.key_id,
            headers={**self.headers, **headers},
        )


class RateLimited(RetryLater):
    reason = "RATE_LIMIT_EXCEEDED"


class Overloaded(RetryLater):
    reason = "OVERLOADED"


class ShuttingDown(RetryLater):
    reason = "SHUTTING_DOWN"


class DeadlineExceeded(ServiceError):
    reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    """Something failed that no rule covers; the message quotes a support id, nothing else."""

    reason = "INTERNAL"


def report_unexpected(exc: BaseException, request_id: str) -> Internal:
    """Log `exc` by type and place under a fresh support id (with the request id); return the
    Internal error that quotes the support id to the caller. Never the exception's text, to
    either: it may quote request data."""
    support_id = uuid.uuid4().hex[:16]
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    log.error(
        "unexpected error",
        extra={
            "support_id": support_id,
            "request_id": request_id,
            "error": type(exc).__name__,
            "at": where,
        },
    )
    return Internal(
        f"internal error; quote support id {support_id} when reporting it",
        metadata={"support_id": support_id},
    )
