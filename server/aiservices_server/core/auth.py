"""Authentication: request headers to the Principal who calls, against the keys file.

Credentials are `authorization: Bearer <key>` (or `ApiKey <key>`). A key with the permission
`act_for_users` may name the end user and organisation it acts for
(`x-agenta-user-id`, `x-agenta-organization-id`); any other key sending either header is refused
with PermissionDenied, so a caller that believes it delegates learns at once that it does not
(instead of every user silently sharing the key's own budget). Identities are compared exactly
as sent: `Alice` and `alice` are two users.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from aiservices_server.auth import ApiKey, KeyStore, parse_authorization
from aiservices_server.call import ANONYMOUS, Principal
from aiservices_server.core.headers import Headers
from aiservices_server.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)

if TYPE_CHECKING:
    # A type only: the module serves metrics over HTTP (prometheus_client, http.server).
    from aiservices_server.metrics import Metrics

ACT_FOR_USERS = "act_for_users"
AUTHORIZATION_HEADER = "authorization"
USER_HEADER = "x-agenta-user-id"
ORGANIZATION_HEADER = "x-agenta-organization-id"
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@+-]{1,128}")


class Authenticator:
    """Says who calls, or refuses: Unauthenticated for missing, malformed or unknown
    credentials (counted in the metrics by reason), PermissionDenied for delegation headers
    from a key without `act_for_users`, InvalidArgument for a malformed delegation header (both
    naming the key, for the access log).

    Without a key store (authentication disabled, loopback only) every caller is ANONYMOUS.
    """

    def __init__(self, keys: KeyStore | None, metrics: Metrics) -> None:
        self._keys = keys
        self._metrics = metrics

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
            _refuse_delegation(key, headers)
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


def _refuse_delegation(key: ApiKey, headers: Headers) -> None:
    sent = [name for name in (USER_HEADER, ORGANIZATION_HEADER) if name in headers.values]
    if sent:
        raise PermissionDenied(
            f"this key may not act for users: sending {' or '.join(sent)} needs the "
            f"{ACT_FOR_USERS} permission",
            metadata={"permission": ACT_FOR_USERS},
            key_id=key.id,
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
