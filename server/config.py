"""Settings from `AGENTA_AI_SERVICES_*` environment variables (or a `.env` file)."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AGENTA_AI_SERVICES_"


class AuthMode(StrEnum):
    KEYS = "keys"
    DISABLED = "disabled"


class EventLoop(StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must look like HOST:PORT, e.g. 127.0.0.1:50051 or [::1]:50051")
    return host.strip("[]"), int(port)


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

    # Upstream (Agenta completion runner). All four non-blank enables the feature.
    api_key: SecretStr | None = None
    api_url: str | None = None
    environment_slug: str | None = None
    refine_prompt_key: str | None = None
    upstream_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    upstream_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 1000
    upstream_retries: Annotated[int, Field(ge=0, le=3)] = 1
    # Tool calls in flight at once; beyond it calls wait up to QUEUE_TIMEOUT, then UNAVAILABLE.
    max_concurrent_calls: Annotated[int, Field(ge=1, le=100_000)] = 1000
    queue_timeout: Annotated[float, Field(ge=0, le=60)] = 0.1

    # Server.
    grpc_address: str = "127.0.0.1:50051"
    reflection: bool = True
    max_message_bytes: Annotated[int, Field(ge=1_048_576)] = 4 * 1024 * 1024
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 10.0
    # uvloop cuts about a tenth of the CPU per call (README, Performance).
    event_loop: EventLoop = EventLoop.UVLOOP
    log_level: LogLevel = LogLevel.INFO
    # Prompt text and model output appear in logs only when this is true.
    log_payloads: bool = False
    metrics_address: str | None = None

    # Access control.
    auth: AuthMode = AuthMode.KEYS
    api_keys_file: Path | None = None
    rate_limit_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 10
    rate_limit_per_minute: Annotated[float, Field(gt=0, le=6_000_000)] = 30.0
    # May hold a password: a secret, never logged.
    redis_url: SecretStr | None = None

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

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("grpc_address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("metrics_address")
    @classmethod
    def _check_metrics_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        split_host_port(value)
        return value

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return None if self.metrics_address is None else split_host_port(self.metrics_address)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def upstream_enabled(self) -> bool:
        fields = (
            self.api_key.get_secret_value() if self.api_key else None,
            self.api_url,
            self.environment_slug,
            self.refine_prompt_key,
        )
        return all(value is not None and value.strip() for value in fields)


class SettingsError(Exception):
    """One line naming the setting and what is wrong with it."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            raise SettingsError(f"invalid settings: {message}") from None
        name = ENV_PREFIX + ".".join(str(part) for part in error["loc"]).upper()
        raise SettingsError(f"invalid setting {name}: {message}") from None
