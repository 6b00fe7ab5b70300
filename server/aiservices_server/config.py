"""Settings from `AGENTA_AI_SERVICES_*` environment variables (or a `.env` file)."""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import httpx
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from aiservices_server.ratelimit import redis_url_problem
from aiservices_server.ratelimit.gcra import RateLimitError, check_rate_limit
from aiservices_server.urls import MAX_PORT, split_url

ENV_PREFIX = "AGENTA_AI_SERVICES_"


class AuthMode(StrEnum):
    KEYS = "keys"
    DISABLED = "disabled"


class UpstreamKind(StrEnum):
    AGENTA = "agenta"
    OPENAI = "openai"


class EventLoop(StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


MAX_PLUGINS_CHARS = 10_000
"""AGENTA_AI_SERVICES_PLUGINS lists entry point names: a few dozen characters each."""
PLUGIN_SETTINGS = "PLUGIN_"
"""`AGENTA_AI_SERVICES_PLUGIN_<NAME>_*` are the settings of plugin NAME, not the server's."""

MAX_GRPC_MESSAGE_BYTES = 2**31 - 1
"""grpc keeps message limits in a signed 32-bit int."""


def split_host_port(address: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` as (host, port), port 0 meaning any free port.

    Anything else raises ValueError, and only ValueError, with a message that quotes nothing.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (sep and _is_host(host) and port.isascii() and port.isdigit() and len(port) <= 5):
        raise ValueError("must look like HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051")
    if int(port) > MAX_PORT:
        raise ValueError(f"the port must be a number from 0 to {MAX_PORT}")
    return host, int(port)


def _is_host(host: str) -> bool:
    """A name or address the socket layer can take: 1 to 253 printable ASCII characters, none of
    them a space, bracket, slash or @."""
    return (
        0 < len(host) <= 253
        and host.isascii()
        and host.isprintable()
        and not any(ch in host for ch in " []/@")
    )


def _is_host_header(value: str) -> bool:
    """Whether `value` has the shape of an HTTP Host header: a host (an IPv6 address in
    brackets) and an optional port."""
    if value.startswith("["):
        address, closed, after = value[1:].partition("]")
        host_ok = bool(closed) and _is_host(address)
    else:
        address, colon, port = value.partition(":")
        host_ok, after = _is_host(address), colon + port
    port = after.removeprefix(":")
    port_ok = not after or (after != port and port.isascii() and port.isdigit() and len(port) <= 5)
    return host_ok and port_ok


def check_http_url(url: str, key_setting: str = "API_KEY") -> str:
    """`url` if it can serve as the base of upstream requests, else ValueError saying why.

    Messages never quote the URL: a mistaken one may hold a password.
    """
    parts = split_url(
        url,
        ("http://", "https://"),
        f"is not a valid URL (check the host, and the port: 1 to {MAX_PORT})",
    )
    if "@" in parts.netloc:
        raise ValueError(
            f"must not hold credentials (user:password@): put the key in {ENV_PREFIX}{key_setting}"
        )
    if not parts.hostname:
        raise ValueError("has no host")
    if "?" in url or "#" in url:
        raise ValueError("must not have a query or fragment: request paths are added to it")
    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        raise ValueError("is not a valid URL") from None
    return url


def is_loopback(address: str) -> bool:
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob of the server; the field name is the env var without its prefix."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
    )

    # Which upstream refines prompts; its settings complete enable the feature.
    upstream: UpstreamKind = UpstreamKind.AGENTA
    # The Agenta completion runner: all four non-blank.
    api_key: SecretStr | None = None
    api_url: str | None = None
    environment_slug: str | None = None
    refine_prompt_key: str | None = None
    # An OpenAI-compatible chat completions endpoint: base URL and model; the key is optional.
    openai_base_url: str | None = None
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None
    openai_temperature: Annotated[float | None, Field(ge=0, le=2, allow_inf_nan=False)] = None
    openai_max_tokens: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    upstream_timeout: Annotated[float, Field(gt=0, le=600, allow_inf_nan=False)] = 60.0
    upstream_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 1000
    upstream_retries: Annotated[int, Field(ge=0, le=3)] = 1
    # Bytes of one upstream reply read at most (uncompressed: only identity bodies are read).
    upstream_max_reply_bytes: Annotated[int, Field(ge=64 * 1024, le=256 * 1024 * 1024)] = (
        4 * 1024 * 1024
    )
    # Tool calls in flight at once; beyond it calls wait up to QUEUE_TIMEOUT, then UNAVAILABLE.
    max_concurrent_calls: Annotated[int, Field(ge=1, le=100_000)] = 1000
    queue_timeout: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] = 0.1

    # Server.
    grpc_address: str = "127.0.0.1:50051"
    reflection: bool = True
    # Received and sent. protobuf parses a request on the event loop before any check can run:
    # 1 MiB of the costliest shape (map entries) takes about 30 ms, 4 MiB about 200 ms.
    max_message_bytes: Annotated[int, Field(ge=1_048_576, le=MAX_GRPC_MESSAGE_BYTES)] = 1_048_576
    shutdown_grace: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 10.0
    # Server processes sharing the listeners (SO_REUSEPORT) under one supervisor; 0 or `auto`:
    # one per CPU this process may run on.
    workers: Annotated[int, Field(ge=0, le=256)] = 1
    # uvloop cuts about a tenth of the CPU per call (docs/performance.md).
    event_loop: EventLoop = EventLoop.UVLOOP
    log_level: LogLevel = LogLevel.INFO
    # Prompt text and model output appear in logs only when this is true.
    log_payloads: bool = False
    metrics_address: str | None = None
    # MCP Streamable HTTP at http(s)://MCP_ADDRESS/mcp; off when unset.
    mcp_address: str | None = None
    # Serve MCP without TLS on an address that is not loopback (behind a TLS-terminating proxy).
    mcp_allow_plaintext: bool = False
    # Host and Origin values /mcp accepts beyond the forms of its own address (comma-separated;
    # `*` accepts any): a browser page must not reach the server through a rebound DNS name.
    mcp_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    mcp_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # Listeners: every connection has a time bound and every listener a connection cap, so idle
    # or slow connections cannot use up the file descriptors the upstream needs.
    mcp_header_timeout: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 10.0
    mcp_idle_timeout: Annotated[int, Field(ge=1, le=3600)] = 30
    mcp_body_timeout: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 30.0
    mcp_max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1000
    grpc_max_connections: Annotated[int, Field(ge=1, le=100_000)] = 1000
    grpc_handshake_timeout: Annotated[float, Field(gt=0, le=300, allow_inf_nan=False)] = 10.0
    grpc_idle_timeout: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 300.0
    # 0: connections live as long as their client keeps them.
    grpc_max_connection_age: Annotated[float, Field(ge=0, le=86_400, allow_inf_nan=False)] = 0.0
    grpc_max_connection_age_grace: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = (
        300.0
    )
    grpc_max_streams: Annotated[int, Field(ge=1, le=100_000)] = 1000
    # Pings on a connection with calls in flight find a peer that vanished without closing it.
    grpc_keepalive_time: Annotated[float, Field(ge=1, le=86_400, allow_inf_nan=False)] = 60.0
    grpc_keepalive_timeout: Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False)] = 20.0
    # The most often a client may ping (its own keepalive); more often is answered with GOAWAY.
    grpc_min_client_ping_interval: Annotated[float, Field(ge=1, le=86_400, allow_inf_nan=False)] = (
        10.0
    )

    # Access control.
    auth: AuthMode = AuthMode.KEYS
    api_keys_file: Path | None = None
    # Declared tools (docs/tools.md): reloaded with the keys file.
    tools_file: Path | None = None
    # Tool packages to load (docs/tools.md): entry point names of group `aiservices.tools`,
    # comma-separated. Unset: every one installed; empty: none.
    plugins: Annotated[tuple[str, ...] | None, NoDecode] = None
    # Bounded by the limiter's own rule (`_check_rate_limit`), not here.
    rate_limit_burst: int = 10
    rate_limit_per_minute: float = 30.0
    # May hold a password: a secret, never logged.
    redis_url: SecretStr | None = None
    # Seconds one rate-limit decision waits for Redis before failing open to memory.
    redis_timeout: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.1
    # Seconds the background check may take to connect to Redis and load its scripts.
    redis_connect_timeout: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 2.0

    # TLS: cert and key serve TLS; a client CA on top requires client certificates (mTLS).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"{ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(f"{ENV_PREFIX}TLS_CLIENT_CA_FILE needs a TLS certificate and key")
        return self

    @model_validator(mode="after")
    def _check_rate_limit(self) -> Settings:
        try:
            check_rate_limit(self.rate_limit_burst, self.rate_limit_per_minute)
        except RateLimitError as exc:
            raise ValueError(f"{ENV_PREFIX}RATE_LIMIT_{exc.field.upper()} {exc.problem}") from None
        return self

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        return 0 if isinstance(value, str) and value.strip().lower() == "auto" else value

    @property
    def worker_count(self) -> int:
        """How many server processes WORKERS asks for (0 and auto: one per usable CPU)."""
        return self.workers or len(os.sched_getaffinity(0))

    @model_validator(mode="after")
    def _check_workers(self) -> Settings:
        """Each worker keeps its own in-memory budgets: N workers would give each caller N."""
        if self.worker_count > 1 and self.redis_url is None:
            raise ValueError(
                f"{ENV_PREFIX}WORKERS={self.workers or 'auto'} runs {self.worker_count} "
                f"processes, each with its own rate-limit budgets: set {ENV_PREFIX}REDIS_URL "
                "so they share one"
            )
        return self

    @model_validator(mode="after")
    def _check_distinct_addresses(self) -> Settings:
        listeners = [
            ("GRPC_ADDRESS", split_host_port(self.grpc_address)),
            ("METRICS_ADDRESS", self.metrics_host_port),
            ("MCP_ADDRESS", self.mcp_host_port),
        ]
        seen: dict[tuple[str, int], str] = {}
        for name, address in listeners:
            if address is None or address[1] == 0:
                continue
            if address in seen:
                raise ValueError(f"{ENV_PREFIX}{name} must differ from {ENV_PREFIX}{seen[address]}")
            seen[address] = name
        return self

    @model_validator(mode="after")
    def _check_auth_disabled_on_loopback(self) -> Settings:
        """Without keys, anyone who reaches a listener that serves tools may call them."""
        if self.auth is AuthMode.DISABLED:
            for name, address in (("GRPC", self.grpc_address), ("MCP", self.mcp_address)):
                if address is not None and not is_loopback(address):
                    raise ValueError(
                        f"{ENV_PREFIX}AUTH=disabled serves only on loopback, but "
                        f"{ENV_PREFIX}{name}_ADDRESS is {address}: set "
                        f"{ENV_PREFIX}API_KEYS_FILE instead"
                    )
        return self

    @model_validator(mode="after")
    def _check_mcp_transport(self) -> Settings:
        if (
            self.mcp_address is not None
            and not is_loopback(self.mcp_address)
            and self.tls_cert_file is None
            and not self.mcp_allow_plaintext
        ):
            raise ValueError(
                f"{ENV_PREFIX}MCP_ADDRESS {self.mcp_address} is not loopback: serve it with TLS "
                f"({ENV_PREFIX}TLS_CERT_FILE and TLS_KEY_FILE), or set "
                f"{ENV_PREFIX}MCP_ALLOW_PLAINTEXT=true behind a proxy that terminates TLS"
            )
        host = None if self.mcp_host_port is None else self.mcp_host_port[0]
        if host in ("0.0.0.0", "::") and not self.mcp_allowed_hosts:
            raise ValueError(
                f"{ENV_PREFIX}MCP_ADDRESS {self.mcp_address} listens on every address: set "
                f"{ENV_PREFIX}MCP_ALLOWED_HOSTS to the names clients reach it by (or * to accept "
                "any Host)"
            )
        return self

    @field_validator("mcp_allowed_hosts", "mcp_allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, value: object) -> object:
        if isinstance(value, str) and len(value) > MAX_PLUGINS_CHARS:
            raise ValueError(f"must be at most {MAX_PLUGINS_CHARS:,} characters")
        return cls._split_list(value)

    @field_validator("mcp_allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            if host != "*" and not _is_host_header(host):
                raise ValueError(
                    "each entry must be a host name or address, with or without :PORT "
                    "(e.g. mcp.example.com, 10.0.0.5:8443, [::1]:50052), or *"
                )
        return tuple(host.lower() for host in value)

    @field_validator("mcp_allowed_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if origin != "*" and not (
                sep and scheme.lower() in ("http", "https") and _is_host_header(rest)
            ):
                raise ValueError(
                    "each entry must be an origin, scheme://host[:port] with no path "
                    "(e.g. https://app.example.com), or *"
                )
        return tuple(origin.lower() for origin in value)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        url = "" if value is None else value.get_secret_value().strip()
        if not url:
            return None
        problem = redis_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return SecretStr(url)

    @field_validator("api_url", "openai_base_url")
    @classmethod
    def _check_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        key_setting = "OPENAI_API_KEY" if info.field_name == "openai_base_url" else "API_KEY"
        return check_http_url(value.strip().rstrip("/"), key_setting)

    @field_validator("api_key", "openai_api_key")
    @classmethod
    def _check_api_key(cls, value: SecretStr | None) -> SecretStr | None:
        key = "" if value is None else value.get_secret_value().strip()
        if not key:
            return None
        # It goes into an HTTP header: anything else would fail every upstream call.
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise ValueError("must be printable ASCII without spaces")
        return SecretStr(key)

    @field_validator(
        "api_keys_file",
        "tools_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        mode="before",
    )
    @classmethod
    def _blank_path_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("grpc_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("metrics_address", "mcp_address")
    @classmethod
    def _check_optional_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        split_host_port(value)
        return value

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return None if self.metrics_address is None else split_host_port(self.metrics_address)

    @property
    def mcp_host_port(self) -> tuple[str, int] | None:
        return None if self.mcp_address is None else split_host_port(self.mcp_address)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def upstream_enabled(self) -> bool:
        """Whether the chosen upstream's settings are complete."""
        fields: tuple[str | None, ...]
        if self.upstream is UpstreamKind.OPENAI:
            fields = (self.openai_base_url, self.openai_model)
        else:
            fields = (
                self.api_key.get_secret_value() if self.api_key else None,
                self.api_url,
                self.environment_slug,
                self.refine_prompt_key,
            )
        return all(value is not None and value.strip() for value in fields)


class SettingsError(Exception):
    """One line naming the setting and what is wrong with it."""


def unknown_settings(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each `AGENTA_AI_SERVICES_*` name in `environ` that is no setting, with the closest setting
    name or None: pydantic ignores them, so a misspelled setting would go unnoticed."""
    known = [name.upper() for name in Settings.model_fields]
    unknown: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        suffix = upper.removeprefix(ENV_PREFIX)
        if suffix not in known and not suffix.startswith(PLUGIN_SETTINGS):
            # The shared prefix is left out of the comparison: it would make every name "close".
            close = difflib.get_close_matches(suffix, known, n=1) if len(suffix) <= 100 else []
            unknown.append((name, ENV_PREFIX + close[0] if close else None))
    return unknown


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except UnicodeDecodeError:
        raise SettingsError("cannot read the .env file: it is not UTF-8 text") from None
    except OSError as exc:
        raise SettingsError(f"cannot read the .env file: {exc.strerror or exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            raise SettingsError(f"invalid settings: {message}") from None
        name = ENV_PREFIX + ".".join(str(part) for part in error["loc"]).upper()
        raise SettingsError(f"invalid setting {name}: {message}") from None
