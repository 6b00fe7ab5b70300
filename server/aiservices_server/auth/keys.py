"""API keys: the keys file, the in-memory key store and the `authorization` header.

Keys are kept only as SHA-256 digests: the keys file and this process never hold a clear key,
so neither a leaked file nor a memory dump hands out working credentials. This module knows
nothing of gRPC; the transport layer feeds it header values and turns `None` into
UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictInt,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from aiservices_server.call import Principal
from aiservices_server.files import read_text_file, refuse_writable_by_others
from aiservices_server.ratelimit.gcra import RateLimit, RateLimitError, check_rate_limit
from aiservices_server.tomltext import TomlProblem, load_toml

__all__ = [
    "KEY_ID_PATTERN",
    "KEY_ID_RULE",
    "KEY_PREFIX",
    "MAX_KEY_LENGTH",
    "NAME_RULE",
    "ApiKey",
    "KeyStore",
    "KeysFileError",
    "generate_key",
    "hash_key",
    "is_valid_key_id",
    "is_valid_key_text",
    "is_valid_name",
    "load_keys_file",
    "load_keys_text",
    "parse_authorization",
    "read_keys_text",
]

KEY_PREFIX = "ais_"
"""Prefix of generated keys, so a leaked key is recognisable in code, logs and secret scanners."""

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""Key ids appear in logs and metric labels, so they are short and need no quoting."""

MAX_KEY_LENGTH = 1024
"""Longer presented keys are refused unhashed: no real key is that long."""

_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
_HASH_PROBLEM = 'must look like "sha256:<64 lowercase hex digits>"'
KEY_ID_RULE = "must be 1 to 64 characters from A-Z a-z 0-9 . _ -"
"""How a bad key id is described, by the file loader and the CLI alike."""

NAME_RULE = "must be a non-empty string without spaces"
"""How a bad permission or organization is described."""
_SCHEMES = frozenset({"bearer", "apikey"})
_RATE_LIMIT_ERROR = "rate_limit_bounds"


class KeysFileError(Exception):
    """The keys file cannot be used; `str()` is the one line to print at start-up."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"API keys file {self.path}: {problem}")


def is_valid_key_id(key_id: str) -> bool:
    """Whether `key_id` is acceptable as a key id (shared by the file loader and the CLI)."""
    return KEY_ID_PATTERN.fullmatch(key_id) is not None


def is_valid_name(value: str) -> bool:
    """Permissions and organizations: non-empty, no whitespace or control characters, so they
    read unambiguously in logs and TOML."""
    return bool(value) and value.isprintable() and not any(ch.isspace() for ch in value)


def is_valid_key_text(key: str) -> bool:
    """Whether `key` could be presented in a header: 1..MAX_KEY_LENGTH printable ASCII, no space."""
    # isascii + isprintable + no space is exactly "!".."~", without a loop in Python.
    return 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable() and " " not in key


def _digest(key: str) -> bytes:
    # surrogatepass: any str hashes without raising; such keys never match a real one anyway.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def hash_key(key: str) -> str:
    """The `hash` value for the keys file: `"sha256:"` + lowercase hex SHA-256 of the key."""
    return "sha256:" + _digest(key).hex()


def generate_key() -> str:
    """A fresh key: the `ais_` prefix plus 256 random bits (43 URL-safe characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_authorization(value: str | None) -> str | None:
    """The key from `Bearer <key>` or `ApiKey <key>`, or None when missing or malformed.

    Strict on purpose: exactly one space between scheme and key, the scheme matched without
    regard to case, and a key of printable ASCII without spaces (up to MAX_KEY_LENGTH); only
    surrounding spaces or tabs, which HTTP strips anyway, are ignored. Anything else is None, so the
    caller answers UNAUTHENTICATED without guessing what was meant.
    """
    if not value:
        return None
    parts = value.strip(" \t").split(" ")
    if len(parts) != 2:
        return None
    scheme, key = parts
    if not scheme.isascii() or scheme.lower() not in _SCHEMES:
        return None
    if not is_valid_key_text(key):
        return None
    return key


@dataclass(frozen=True)
class ApiKey:
    """One configured key: who it is (`id`), what it may do, and its optional rate limit.

    `digest` is the raw SHA-256 of the key; it is kept out of `repr` so logging an ApiKey
    never prints it.
    """

    id: str
    digest: bytes = field(repr=False)
    permissions: frozenset[str] = frozenset()
    organization: str | None = None
    rate_limit: RateLimit | None = None
    """The key's own limit, overriding the service default; None for the default."""

    def __post_init__(self) -> None:
        if not is_valid_key_id(self.id):
            raise ValueError(f"key id {self.id!r} {KEY_ID_RULE}")
        if len(self.digest) != hashlib.sha256().digest_size:
            raise ValueError(f"key {self.id}: digest must be 32 bytes")

    def principal(self, user_id: str | None = None) -> Principal:
        """The caller identity for requests made with this key."""
        return Principal(
            key_id=self.id,
            permissions=self.permissions,
            organization=self.organization,
            user_id=user_id,
            rate_limit=self.rate_limit,
        )


class KeyStore:
    """The configured keys, looked up by the digest of a presented key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys: dict[bytes, ApiKey] = {}
        seen_ids: set[str] = set()
        for key in keys:
            if key.id in seen_ids:
                raise ValueError(f'duplicate id "{key.id}"')
            if key.digest in self._keys:
                raise ValueError(
                    f'key "{key.id}" has the same hash as "{self._keys[key.digest].id}"'
                )
            seen_ids.add(key.id)
            self._keys[key.digest] = key

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyStore:
        """Load and check a keys file; any problem raises KeysFileError with one line."""
        return cls(load_keys_file(path))

    def authenticate(self, presented_key: str) -> ApiKey | None:
        """The key matching `presented_key`, or None.

        The dict lookup by digest is safe against timing attacks: its timing can reveal at
        most something about SHA-256(presented_key), which the caller already knows, or about
        how many leading bytes of that digest equal a stored digest. Even a whole stored
        digest is useless without a preimage of a 256-bit random key. The hit is then
        confirmed with `hmac.compare_digest` so the final equality test is constant-time.
        """
        if not is_valid_key_text(presented_key):
            return None
        digest = _digest(presented_key)
        candidate = self._keys.get(digest)
        if candidate is None or not hmac.compare_digest(candidate.digest, digest):
            return None
        return candidate

    def ids(self) -> tuple[str, ...]:
        """Key ids in file order, for start-up logs and metrics (never the keys themselves)."""
        return tuple(key.id for key in self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._keys.values())

    def __repr__(self) -> str:
        return f"KeyStore(ids={list(self.ids())!r})"


# --- the keys file -------------------------------------------------------------------------


def _check_id(value: str) -> str:
    if not is_valid_key_id(value):
        raise PydanticCustomError("key_id", KEY_ID_RULE)
    return value


def _check_hash(value: str) -> str:
    if _HASH_PATTERN.fullmatch(value) is None:
        raise PydanticCustomError("key_hash", _HASH_PROBLEM)
    return value


def _check_name(value: str) -> str:
    if not is_valid_name(value):
        raise PydanticCustomError("name", NAME_RULE)
    return value


_Name = Annotated[str, AfterValidator(_check_name)]


class _RateLimitModel(BaseModel):
    """Types here; the bounds are the limiter's own (`check_rate_limit`), so a key's limit that
    loads is one every call can use."""

    model_config = ConfigDict(extra="forbid", strict=True)

    burst: StrictInt
    per_minute: float

    @model_validator(mode="after")
    def _check_bounds(self) -> _RateLimitModel:
        try:
            check_rate_limit(self.burst, self.per_minute)
        except RateLimitError as exc:
            # The field goes into the error's location when it is formatted.
            raise PydanticCustomError(
                _RATE_LIMIT_ERROR, "{problem}", {"field": exc.field, "problem": exc.problem}
            ) from None
        return self


class _KeyModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: Annotated[str, AfterValidator(_check_id)]
    hash: Annotated[str, AfterValidator(_check_hash)]
    permissions: list[_Name]
    organization: _Name | None = None
    rate_limit: _RateLimitModel | None = None


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[_KeyModel]


_TYPE_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "dict_type": "must be a table",
    "list_type": "must be an array",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
}


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _entry_id(data: dict[str, Any], loc: tuple[int | str, ...]) -> str | None:
    """The id of the [[keys]] entry a problem is in, when it is a valid id and the problem is
    not the id itself: `keys[2]` alone makes the reader count tables."""
    if len(loc) < 3 or loc[0] != "keys" or not isinstance(loc[1], int) or loc[2] == "id":
        return None
    entries = data.get("keys")
    entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
    key_id = entry.get("id") if isinstance(entry, dict) else None
    return key_id if isinstance(key_id, str) and is_valid_key_id(key_id) else None


def _format_validation_error(exc: ValidationError, data: dict[str, Any]) -> str:
    """The first problem as `keys[2].hash (key "svc"): ...`; input values are never echoed (a
    clear key pasted into the wrong field must not end up in a log), only a valid key id."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    message = _TYPE_MESSAGES.get(first["type"], first["msg"])
    if message.startswith("Input should"):
        message = "must" + message[len("Input should") :]
    where = tuple(first["loc"])
    if first["type"] == _RATE_LIMIT_ERROR:
        where += (first.get("ctx", {})["field"],)
    loc = _format_loc(where)
    if loc == "keys" and first["type"] == "list_type":
        message = "must be [[keys]] tables (an array of tables), not [keys]"
    key_id = _entry_id(data, where)
    if key_id is not None:
        loc += f' (key "{key_id}")'
    text = f"{loc}: {message}" if loc else message
    if len(errors) > 1:
        more = len(errors) - 1
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text


MAX_KEYS_FILE_BYTES = 1024 * 1024
"""A keys file is a few hundred bytes per key: anything larger is the wrong file."""

_log = logging.getLogger("aiservices.auth")


def _check_mode(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse a keys file others may write (they could add a key); warn when others may read it
    (hashes are no keys, but they name every caller and permission)."""
    refuse_writable_by_others(mode, "a key", lambda problem: KeysFileError(path, problem))
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        _log.warning(
            "API keys file is readable by group or others: run chmod go-r on it",
            extra={"path": os.fspath(path), "mode": f"{stat.S_IMODE(mode):04o}"},
        )


def read_keys_text(path: str | os.PathLike[str]) -> str:
    """The keys file's text: at most MAX_KEYS_FILE_BYTES of UTF-8, from a file others cannot
    write; KeysFileError (one line) otherwise."""
    return read_text_file(
        path,
        MAX_KEYS_FILE_BYTES,
        fail=lambda problem: KeysFileError(path, problem),
        check_mode=lambda mode: _check_mode(path, mode),
    )


def load_keys_file(path: str | os.PathLike[str]) -> list[ApiKey]:
    """Read, parse and check a keys file, raising KeysFileError (one line) on the first
    problem."""
    return load_keys_text(read_keys_text(path), path)


def load_keys_text(text: str, path: str | os.PathLike[str]) -> list[ApiKey]:
    """Parse and check the text of the keys file at `path` (named in messages), raising
    KeysFileError (one line) on the first problem.

    Indexes in messages count `[[keys]]` tables from 0, in file order.
    """
    try:
        data = load_toml(text, "keys file")
    except TomlProblem as problem:
        raise KeysFileError(path, str(problem)) from None
    if not data.get("keys"):
        if set(data) - {"keys"}:
            unknown = sorted(set(data) - {"keys"})[0]
            raise KeysFileError(path, f"{unknown}: unknown field")
        raise KeysFileError(path, "no [[keys]] entries")
    try:
        model = _FileModel.model_validate(data)
    except ValidationError as exc:
        raise KeysFileError(path, _format_validation_error(exc, data)) from None

    keys: list[ApiKey] = []
    index_by_id: dict[str, int] = {}
    id_by_hash: dict[str, str] = {}
    for index, entry in enumerate(model.keys):
        if entry.id in index_by_id:
            raise KeysFileError(path, f'keys[{index}].id: duplicate id "{entry.id}"')
        if entry.hash in id_by_hash:
            raise KeysFileError(
                path, f'keys[{index}].hash: same hash as key "{id_by_hash[entry.hash]}"'
            )
        index_by_id[entry.id] = index
        id_by_hash[entry.hash] = entry.id
        rate_limit = entry.rate_limit
        keys.append(
            ApiKey(
                id=entry.id,
                digest=bytes.fromhex(entry.hash.removeprefix("sha256:")),
                permissions=frozenset(entry.permissions),
                organization=entry.organization,
                rate_limit=(
                    None
                    if rate_limit is None
                    else RateLimit(burst=rate_limit.burst, per_minute=float(rate_limit.per_minute))
                ),
            )
        )
    return keys
