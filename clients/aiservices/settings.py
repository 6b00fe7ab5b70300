"""Where a client connects, and with what key and TLS: the `AISERVICES_*` environment.

One reader for `ToolClient.from_env`, `AsyncToolClient.from_env` and the `aiservices` command,
so a service and the command a person runs beside it read the same variables with the same
defaults and refuse the same way. The command's flags, when given, win over the environment
(`Flags`); the library reads the environment alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

__all__ = [
    "DEFAULT_TARGET",
    "ENV_API_KEY",
    "ENV_CA_FILE",
    "ENV_CERT_FILE",
    "ENV_KEY_FILE",
    "ENV_TARGET",
    "ENV_TLS",
    "Connection",
    "Flags",
    "SettingsError",
    "read_connection",
]

ENV_TARGET = "AISERVICES_TARGET"
ENV_API_KEY = "AISERVICES_API_KEY"
ENV_TLS = "AISERVICES_TLS"
ENV_CA_FILE = "AISERVICES_CA_FILE"
ENV_CERT_FILE = "AISERVICES_CERT_FILE"
ENV_KEY_FILE = "AISERVICES_KEY_FILE"
DEFAULT_TARGET = "127.0.0.1:50051"
# What a file named by a setting may hold: a PEM bundle of a few CAs is tens of KB; a key file
# holds one line.
MAX_PEM_BYTES = 1024 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
# Far past any host:port or dns:/// name (a DNS name is at most 253 characters).
MAX_TARGET_CHARS = 1024
# A value is echoed in an error only this far, and a path this far (a setting is not a secret,
# but it is outside input and has no business filling a terminal).
_SHOWN_CHARS = 40
_SHOWN_PATH_CHARS = 200
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

MISSING_KEY = (
    f"no API key: set {ENV_API_KEY} (the aiservices command also takes --api-key or "
    "--api-key-file); a server with authentication disabled takes any key"
)


class SettingsError(ValueError):
    """A connection setting (a variable, a flag, or a file one names) that cannot be used. The
    message is one line naming the setting, never the key."""


@dataclass(frozen=True)
class Flags:
    """What a command line gives; None (or False) where it gives nothing, so the environment,
    then the default, decides."""

    target: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Connection:
    """Where to connect and how: the target, the API key (never shown by repr), whether TLS is
    on, and the channel credentials for it (None: plaintext)."""

    target: str
    api_key: str = field(repr=False)
    tls: bool
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False, compare=False)


def read_connection(environ: Mapping[str, str] | None = None, flags: Flags = Flags()) -> Connection:
    """The connection `flags` and `environ` (os.environ when None) describe; raises
    SettingsError when one cannot be used.

    | setting | flag | default |
    |---|---|---|
    | AISERVICES_TARGET | --target | 127.0.0.1:50051 |
    | AISERVICES_API_KEY | --api-key, --api-key-file | required |
    | AISERVICES_TLS (1/true/yes/on, 0/false/no/off) | --tls | off |
    | AISERVICES_CA_FILE | --ca-file | the system's CAs; implies TLS |
    | AISERVICES_CERT_FILE, AISERVICES_KEY_FILE | --cert-file, --key-file | none; imply TLS |

    A variable set to blanks counts as unset.
    """
    env = os.environ if environ is None else environ
    target = flags.target or _variable(env, ENV_TARGET) or DEFAULT_TARGET
    if not target.isprintable() or len(target) > MAX_TARGET_CHARS:
        where = "--target" if flags.target else ENV_TARGET
        raise SettingsError(f"{where} is not a gRPC target: {_shown(target)}")
    api_key = _api_key(env, flags)
    ca_file = _pick(flags.ca_file, "--ca-file", env, ENV_CA_FILE)
    cert_file = _pick(flags.cert_file, "--cert-file", env, ENV_CERT_FILE)
    key_file = _pick(flags.key_file, "--key-file", env, ENV_KEY_FILE)
    if (cert_file is None) != (key_file is None):
        given = cert_file or key_file
        by_flag = given is not None and given[1].startswith("--")
        pair = ("--cert-file", "--key-file") if by_flag else (ENV_CERT_FILE, ENV_KEY_FILE)
        raise SettingsError(f"{pair[0]} and {pair[1]} go together")
    tls = flags.tls or _switch(env, ENV_TLS) or bool(ca_file or cert_file)
    credentials = None
    if tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca_file, "CA file", MAX_PEM_BYTES) if ca_file else None,
            private_key=_read(key_file, "key file", MAX_PEM_BYTES) if key_file else None,
            certificate_chain=_read(cert_file, "certificate file", MAX_PEM_BYTES)
            if cert_file
            else None,
        )
    return Connection(target=target, api_key=api_key, tls=tls, credentials=credentials)


def _variable(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _pick(
    given: str | None, flag: str, env: Mapping[str, str], name: str
) -> tuple[str, str] | None:
    """(value, where it came from): the flag when given, else the variable when set."""
    if given is not None:
        return given, flag
    value = _variable(env, name)
    return None if value is None else (value, name)


def _switch(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    shown = value[:_SHOWN_CHARS] + ("..." if len(value) > _SHOWN_CHARS else "")
    raise SettingsError(f"{name} must be 1, true, yes or on, or 0, false, no or off; got {shown!r}")


def _shown(path: str) -> str:
    """A path as an error shows it: on one line (unprintable characters escaped), clipped."""
    clipped = path[:_SHOWN_PATH_CHARS] + ("..." if len(path) > _SHOWN_PATH_CHARS else "")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in clipped)


def _api_key(env: Mapping[str, str], flags: Flags) -> str:
    if flags.api_key is not None and flags.api_key_file is not None:
        raise SettingsError("argument --api-key: not allowed with argument --api-key-file")
    if flags.api_key is not None:
        if not flags.api_key.strip():
            raise SettingsError("--api-key is empty")
        return flags.api_key.strip()
    if flags.api_key_file is not None:
        path = flags.api_key_file
        text = _read((path, "--api-key-file"), "API key file", MAX_KEY_FILE_BYTES)
        key = text.decode("utf-8", errors="replace").strip()
        if not key:
            raise SettingsError(f"API key file {_shown(path)} is empty")
        return key
    from_env = _variable(env, ENV_API_KEY)
    if from_env is None:
        # Refused here: sent without a key, every call would come back UNAUTHENTICATED.
        raise SettingsError(MISSING_KEY)
    return from_env


def _read(named: tuple[str, str], what: str, limit: int) -> bytes:
    """The file a setting names, at most `limit` bytes."""
    path, where = named
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SettingsError(f"cannot read {what} {_shown(path)} ({where}): {reason}") from None
    except ValueError:  # a path no file can have: an embedded NUL
        raise SettingsError(f"cannot read {what} {_shown(path)} ({where}): not a path") from None
    if len(data) > limit:
        raise SettingsError(f"{what} {_shown(path)} ({where}) is larger than {limit:,} bytes")
    return data
