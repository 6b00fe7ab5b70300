"""Authentication: request headers to the Principal who calls, against the keys file.

Credentials are `authorization: Bearer <key>` (or `ApiKey <key>`). A key with the permission
`act_for_users` may name the end user and organisation it acts for
(`x-agenta-user-id`, `x-agenta-organization-id`); from any other key those headers are ignored,
so they cannot be used to dodge rate limits.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from server.auth import ApiKey, KeyStore, parse_authorization
from server.call import ANONYMOUS, Principal
from server.core.headers import Headers
from server.errors import FieldViolation, InvalidArgument, Unauthenticated
from server.metrics import Metrics

log = logging.getLogger("aiservices.auth")

ACT_FOR_USERS = "act_for_users"
AUTHORIZATION_HEADER = "authorization"
USER_HEADER = "x-agenta-user-id"
ORGANIZATION_HEADER = "x-agenta-organization-id"
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")


class Authenticator:
    """Says who calls, or refuses: Unauthenticated for missing, malformed or unknown
    credentials (counted in the metrics by reason), InvalidArgument for a malformed delegation
    header (naming the key, for the access log).

    Without a key store (authentication disabled, loopback only) every caller is ANONYMOUS.
    """

    def __init__(self, keys: KeyStore | None, metrics: Metrics) -> None:
        self._keys = keys
        self._metrics = metrics
        # Keys already reported for sending delegation headers they may not use: one debug
        # line per key, not per call.
        self._ignored_delegation: set[str] = set()

    def use_keys(self, keys: KeyStore) -> None:
        """Authenticate the next calls against `keys` (a reloaded keys file). A call already
        authenticated keeps the key it found: each call looks the store up once."""
        if self._keys is None:
            raise ValueError("authentication is disabled: there are no keys to replace")
        self._keys = keys

    def principal(self, headers: Headers) -> Principal:
        keys = self._keys
        if keys is None:
            return ANONYMOUS
        key = self._key(keys, headers)
        if ACT_FOR_USERS not in key.permissions:
            self._note_ignored_delegation(key, headers)
            return key.principal()
        user = _delegated(key, headers, USER_HEADER)
        organization = _delegated(key, headers, ORGANIZATION_HEADER)
        principal = key.principal(user)
        if organization is not None:
            principal = replace(principal, organization=organization)
        return principal

    def _key(self, keys: KeyStore, headers: Headers) -> ApiKey:
        if AUTHORIZATION_HEADER in headers.repeated:
            raise self._refused("malformed", "more than one authorization header: send exactly one")
        header = headers.get(AUTHORIZATION_HEADER)
        presented = parse_authorization(header)
        if presented is None:
            raise self._refused(
                "malformed" if header else "missing",
                "missing or malformed credentials: send 'authorization: Bearer <key>'",
            )
        key = keys.authenticate(presented)
        if key is None:
            raise self._refused("unknown_key", "unknown API key")
        return key

    def _refused(self, reason: str, message: str) -> Unauthenticated:
        self._metrics.unauthenticated_refusal(reason)
        return Unauthenticated(message)

    def _note_ignored_delegation(self, key: ApiKey, headers: Headers) -> None:
        delegating = USER_HEADER in headers.values or ORGANIZATION_HEADER in headers.values
        if delegating and key.id not in self._ignored_delegation:
            self._ignored_delegation.add(key.id)
            log.debug(
                "ignoring delegation headers from a key without act_for_users",
                extra={"key_id": key.id},
            )


def _delegated(key: ApiKey, headers: Headers, header: str) -> str | None:
    value = headers.get(header)
    if value is None:
        return None
    if header in headers.repeated:
        raise InvalidArgument(
            f"{header} was sent more than once",
            [FieldViolation(f"metadata.{header}", "must be sent at most once")],
            key_id=key.id,
        )
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(
            f"{header} is malformed",
            [FieldViolation(f"metadata.{header}", "must be 1-128 of A-Z a-z 0-9 . _ : @ + -")],
            key_id=key.id,
        )
    return value
