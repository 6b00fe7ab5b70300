"""Authentication: `authorization: Bearer <key>` (or `ApiKey <key>`) against the keys file.

A key with permission `act_for_users` may name the end user and organisation it acts for;
from any other key those headers are ignored, so they cannot be used to dodge rate limits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from server.auth import ApiKey, KeyStore, parse_authorization
from server.errors import FieldViolation, InvalidArgument, Unauthenticated
from server.identity import Principal
from server.transport.interceptors.base import Behaviour, Context, UnaryInterceptor
from server.transport.state import current_call
from server.transport.status import abort

log = logging.getLogger("aiservices.auth")

ACT_FOR_USERS = "act_for_users"
USER_HEADER = "x-agenta-user-id"
ORGANIZATION_HEADER = "x-agenta-organization-id"
# Distinct accepted header values remembered: a few per key ("Bearer k", "ApiKey k", ...).
MAX_ACCEPTED_HEADERS = 4096
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")


def _delegated(metadata: dict[str, str], repeated: frozenset[str], header: str) -> str | None:
    value = metadata.get(header)
    if value is None:
        return None
    if header in repeated:
        raise InvalidArgument(
            f"{header} was sent more than once",
            [FieldViolation(f"metadata.{header}", "must be sent at most once")],
        )
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(
            f"{header} is malformed",
            [FieldViolation(f"metadata.{header}", "must be 1-128 of A-Z a-z 0-9 . _ : @ + -")],
        )
    return value


class AuthInterceptor(UnaryInterceptor):
    """Sets the caller's Principal on the call state, or refuses the call.

    `on_unauthenticated` hears the reason of every UNAUTHENTICATED refusal ("missing",
    "malformed" or "unknown_key"), for a metric. Once the key is known the call state names
    it, so the access line of a call refused after that (a malformed delegation header, say)
    carries the key id.
    """

    def __init__(
        self, keys: KeyStore, *, on_unauthenticated: Callable[[str], None] | None = None
    ) -> None:
        self._keys = keys
        self._on_unauthenticated = on_unauthenticated
        self._ignored_delegation: set[str] = set()
        # Built once per key: a Principal per call was a measurable share of a trivial RPC.
        self._principals: dict[str, Principal] = {}
        # Header values that authenticated, so a caller's later calls skip parsing and hashing.
        # Only accepted keys get in, so strangers cannot grow it; the keys file never changes
        # while the server runs, so an entry never goes stale. Never logged.
        self._accepted: dict[str, ApiKey] = {}

    def _refused(self, reason: str, message: str) -> Unauthenticated:
        if self._on_unauthenticated is not None:
            self._on_unauthenticated(reason)
        return Unauthenticated(message)

    def _key(self, metadata: dict[str, str], repeated: frozenset[str]) -> ApiKey:
        if "authorization" in repeated:
            raise self._refused("malformed", "more than one authorization header: send exactly one")
        header = metadata.get("authorization")
        key = self._accepted.get(header) if header is not None else None
        if key is None:
            presented = parse_authorization(header)
            if presented is None:
                raise self._refused(
                    "malformed" if header else "missing",
                    "missing or malformed credentials: send metadata 'authorization: Bearer <key>'",
                )
            key = self._keys.authenticate(presented)
            if key is None:
                raise self._refused("unknown_key", "unknown API key")
            if header is not None and len(self._accepted) < MAX_ACCEPTED_HEADERS:
                self._accepted[header] = key
        return key

    def _principal(self, key: ApiKey) -> Principal:
        principal = self._principals.get(key.id)
        if principal is None:
            principal = self._principals[key.id] = key.principal()
        return principal

    def _acting_for(
        self, key: ApiKey, metadata: dict[str, str], repeated: frozenset[str]
    ) -> Principal | None:
        """The end user a key with act_for_users names, or None when it acts for itself."""
        if ACT_FOR_USERS in key.permissions:
            user = _delegated(metadata, repeated, USER_HEADER)
            organization = _delegated(metadata, repeated, ORGANIZATION_HEADER)
            if user is None and organization is None:
                return None
            return Principal(
                key_id=key.id,
                permissions=key.permissions,
                organization=organization or key.organization,
                user_id=user,
            )
        if (
            USER_HEADER in metadata or ORGANIZATION_HEADER in metadata
        ) and key.id not in self._ignored_delegation:
            self._ignored_delegation.add(key.id)
            log.debug(
                "ignoring delegation headers from a key without act_for_users",
                extra={"key_id": key.id},
            )
        return None

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def run(request: Any, context: Context) -> Any:
            state = current_call()
            try:
                key = self._key(state.metadata, state.repeated)
                state.principal = self._principal(key)
                state.key_rate_limit = key.rate_limit
                delegated = self._acting_for(key, state.metadata, state.repeated)
                if delegated is not None:
                    state.principal = delegated
            except (Unauthenticated, InvalidArgument) as error:
                await abort(context, error, state.trailers)
            return await behaviour(request, context)

        return run
