"""The gRPC listener's TLS: the certificate, key and client CA files the settings name, checked
before grpc sees them, so a wrong file stops start-up with one line naming the setting."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from aiservices_server.config import Settings
from aiservices_server.files import FileTooLarge, NotRegularFile, read_small_file
from aiservices_server.startup import StartupError

MAX_TLS_FILE_BYTES = 1024 * 1024
"""Certificates and keys take a few KB; a bigger file is the wrong one."""


_PEM_CERTIFICATE = (b"-----BEGIN CERTIFICATE-----", "certificate")
_PEM_PRIVATE_KEY = (b"PRIVATE KEY-----", "private key")


def _read(path: Path, setting: str, *, holds: tuple[bytes, str]) -> bytes:
    """The file's bytes, checked to be a regular file within MAX_TLS_FILE_BYTES that holds the
    PEM block `holds` (marker, name); StartupError naming the setting otherwise (grpc would log
    several lines of its own and then fail on the address)."""
    where = f"AGENTA_AI_SERVICES_{setting} {path}"
    try:
        data = read_small_file(path, MAX_TLS_FILE_BYTES)
    except OSError as exc:
        raise StartupError(f"{where}: {exc.strerror}") from None
    except (NotRegularFile, FileTooLarge) as exc:
        raise StartupError(f"{where}: {exc}") from None
    marker, name = holds
    if marker not in data:
        raise StartupError(f"{where}: no PEM {name} in it")
    return data


def _check_key_pair(cert_file: Path, key_file: Path) -> None:
    """Refuse a key that does not belong to the certificate, or one grpc cannot use (encrypted,
    damaged), with one line instead of grpc's own lines and a misleading address error."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # only the pair is judged here, not its strength
    try:
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, OSError):
        raise StartupError(
            "AGENTA_AI_SERVICES_TLS_KEY_FILE is not the unencrypted private key of "
            "AGENTA_AI_SERVICES_TLS_CERT_FILE's certificate (or one of them is damaged)"
        ) from None


def _check_client_ca(pem: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError):
        raise StartupError(
            "AGENTA_AI_SERVICES_TLS_CLIENT_CA_FILE: its PEM certificates cannot be read"
        ) from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC listener's credentials: None without TLS_CERT_FILE and TLS_KEY_FILE (plaintext);
    with TLS_CLIENT_CA_FILE too, clients must present a certificate it signed (mutual TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    chain = _read(settings.tls_cert_file, "TLS_CERT_FILE", holds=_PEM_CERTIFICATE)
    key = _read(settings.tls_key_file, "TLS_KEY_FILE", holds=_PEM_PRIVATE_KEY)
    _check_key_pair(settings.tls_cert_file, settings.tls_key_file)
    client_ca = None
    if settings.tls_client_ca_file is not None:
        client_ca = _read(settings.tls_client_ca_file, "TLS_CLIENT_CA_FILE", holds=_PEM_CERTIFICATE)
        _check_client_ca(client_ca)
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
