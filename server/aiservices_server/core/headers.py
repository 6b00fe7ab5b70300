"""Request headers as every face hands them to the core, and the facts read from them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from random import getrandbits

REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# W3C trace context: version ff is invalid, and so are all-zero trace and parent ids.
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


@dataclass(frozen=True, slots=True)
class Headers:
    """A request's text headers (gRPC metadata, HTTP headers), names in lower case.

    `repeated` names those sent more than once: ambiguous for credentials and identities, so
    whoever reads such a header refuses it rather than guess which value counts."""

    values: Mapping[str, str] = field(default_factory=dict)
    repeated: frozenset[str] = frozenset()

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> Headers:
        """Headers from (name, value) pairs as they arrived, names in lower case; a name sent
        again keeps its last value and is listed in `repeated`."""
        values: dict[str, str] = {}
        repeated: set[str] = set()
        for name, value in pairs:
            if name in values:
                repeated.add(name)
            values[name] = value
        return cls(values, frozenset(repeated))

    def get(self, name: str) -> str | None:
        return self.values.get(name)


def request_id_for(headers: Headers) -> str:
    """The caller's `x-request-id` when it is a plain token of at most 128 characters, else a
    fresh one (128 random bits: an identifier, not a secret)."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return f"{getrandbits(128):032x}"


def traceparent_in(headers: Headers) -> str | None:
    """The caller's W3C `traceparent` when well formed; None otherwise (it is not passed on)."""
    value = headers.get(TRACEPARENT_HEADER)
    if value is not None and _TRACEPARENT.fullmatch(value):
        return value
    return None
