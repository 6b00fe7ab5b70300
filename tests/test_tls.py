"""TLS and mutual TLS on a real server, with certificates generated at test time."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aiservices import NO_RETRY, ToolClient, ToolServiceError
from aiservices_server.app import AiServicesServer, StartupError
from aiservices_server.config import ENV_PREFIX, SettingsError, load_settings
from tests.standin import StandinUpstream
from tests.support.certs import TestCertificates
from tests.support.keys import TestKeys
from tests.support.mcp import mcp_client
from tests.support.processes import REPO_ROOT
from tests.support.servers import ServerThread, make_settings

TOOL = "tools.agenta.api.refine_prompt"
# Refusals at the TLS handshake must come back quickly, not after the default 30 s.
TIMEOUT = 5.0
TEMPLATE = '{"messages": [{"role": "user", "content": "Say hi to {{name}}"}]}'


@pytest.fixture
def tls_server(certs: TestCertificates, upstream: StandinUpstream) -> Iterator[ServerThread]:
    settings = make_settings(
        upstream.url, tls_cert_file=certs.server.cert_file, tls_key_file=certs.server.key_file
    )
    with ServerThread(settings) as running:
        yield running


@pytest.fixture
def mtls_server(certs: TestCertificates, upstream: StandinUpstream) -> Iterator[ServerThread]:
    settings = make_settings(
        upstream.url,
        tls_cert_file=certs.server.cert_file,
        tls_key_file=certs.server.key_file,
        tls_client_ca_file=certs.ca.cert_file,
    )
    with ServerThread(settings) as running:
        yield running


def trusting(certs: TestCertificates, client: str | None = None) -> grpc.ChannelCredentials:
    """Channel credentials trusting the test CA, optionally presenting a client certificate."""
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=certs.ca.cert_pem)
    identity = certs.client if client == "trusted" else certs.untrusted_client
    return grpc.ssl_channel_credentials(
        root_certificates=certs.ca.cert_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )


def status_with(
    target: str, api_key: str | None, credentials: grpc.ChannelCredentials | None
) -> Any:
    with ToolClient(target, api_key=api_key, timeout=TIMEOUT, credentials=credentials) as client:
        # Sent once: a refused handshake is UNAVAILABLE, which a read retries by default.
        return client.status(retry=NO_RETRY)


def refused(
    target: str, api_key: str | None, credentials: grpc.ChannelCredentials | None
) -> grpc.StatusCode:
    with pytest.raises(ToolServiceError) as caught:
        status_with(target, api_key, credentials)
    return caught.value.code


# --- TLS -----------------------------------------------------------------------------------------


def test_a_client_trusting_the_ca_calls_over_tls(
    tls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    status = status_with(tls_server.target, keys.editor, trusting(certs))
    assert status.enabled
    assert [tool.name for tool in status.tools] == [TOOL]


def test_the_server_certificate_is_valid_for_localhost_too(
    tls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    status = status_with(f"localhost:{tls_server.port}", keys.editor, trusting(certs))
    assert [tool.name for tool in status.tools] == [TOOL]


def test_authentication_still_applies_over_tls(
    tls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    code = refused(tls_server.target, None, trusting(certs))
    assert code is grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_cannot_talk_to_a_tls_server(
    tls_server: ServerThread, keys: TestKeys
) -> None:
    assert refused(tls_server.target, keys.editor, None) is grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_certificate_is_refused(
    tls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    wrong_root = grpc.ssl_channel_credentials(root_certificates=certs.untrusted_ca.cert_pem)
    assert refused(tls_server.target, keys.editor, wrong_root) is grpc.StatusCode.UNAVAILABLE


def test_health_check_works_over_tls_without_a_key(
    tls_server: ServerThread, certs: TestCertificates
) -> None:
    with grpc.secure_channel(tls_server.target, trusting(certs)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- mutual TLS ----------------------------------------------------------------------------------


def test_a_client_with_a_ca_signed_certificate_is_served(
    mtls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    credentials = trusting(certs, "trusted")
    with ToolClient(
        mtls_server.target, api_key=keys.editor, timeout=TIMEOUT, credentials=credentials
    ) as client:
        assert [tool.name for tool in client.status().tools] == [TOOL]
        result = client.call_tool(TOOL, {"prompt_template_json": TEMPLATE})
    assert not result.is_error, result.text
    assert result.structured_content is not None


def test_a_client_without_a_certificate_is_refused(
    mtls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    assert refused(mtls_server.target, keys.editor, trusting(certs)) is grpc.StatusCode.UNAVAILABLE


def test_a_client_with_a_certificate_from_another_ca_is_refused(
    mtls_server: ServerThread, certs: TestCertificates, keys: TestKeys
) -> None:
    code = refused(mtls_server.target, keys.editor, trusting(certs, "untrusted"))
    assert code is grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_client_cannot_talk_to_an_mtls_server(
    mtls_server: ServerThread, keys: TestKeys
) -> None:
    assert refused(mtls_server.target, keys.editor, None) is grpc.StatusCode.UNAVAILABLE


def test_a_client_certificate_does_not_replace_the_api_key(
    mtls_server: ServerThread, certs: TestCertificates
) -> None:
    code = refused(mtls_server.target, None, trusting(certs, "trusted"))
    assert code is grpc.StatusCode.UNAUTHENTICATED


# --- settings and start-up -----------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AGENTA_AI_SERVICES_* from the outside world, and no .env in the working directory."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_env")
def test_a_certificate_without_a_key_is_a_settings_error(certs: TestCertificates) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tls_cert_file=certs.server.cert_file)
    message = str(caught.value)
    assert f"{ENV_PREFIX}TLS_CERT_FILE" in message
    assert f"{ENV_PREFIX}TLS_KEY_FILE" in message
    assert "\n" not in message


@pytest.mark.usefixtures("clean_env")
def test_a_key_without_a_certificate_is_a_settings_error(certs: TestCertificates) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tls_key_file=certs.server.key_file)
    message = str(caught.value)
    assert f"{ENV_PREFIX}TLS_CERT_FILE" in message
    assert f"{ENV_PREFIX}TLS_KEY_FILE" in message


@pytest.mark.usefixtures("clean_env")
def test_a_client_ca_without_a_server_certificate_is_a_settings_error(
    certs: TestCertificates,
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tls_client_ca_file=certs.ca.cert_file)
    assert f"{ENV_PREFIX}TLS_CLIENT_CA_FILE" in str(caught.value)


@pytest.mark.usefixtures("clean_env")
def test_tls_settings_come_from_the_environment(
    certs: TestCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}TLS_CERT_FILE", str(certs.server.cert_file))
    with pytest.raises(SettingsError, match="TLS_KEY_FILE"):
        load_settings()
    monkeypatch.setenv(f"{ENV_PREFIX}TLS_KEY_FILE", str(certs.server.key_file))
    settings = load_settings()
    assert settings.tls_cert_file == certs.server.cert_file
    assert settings.tls_key_file == certs.server.key_file


def start_fails(settings: Any) -> str:
    """Start a server that should refuse to start; return the StartupError's message."""

    async def attempt() -> None:
        server = AiServicesServer(settings)
        try:
            await server.start()
        except StartupError:
            raise
        await server.stop(0)
        pytest.fail("the server started")

    with pytest.raises(StartupError) as caught:
        asyncio.run(attempt())
    return str(caught.value)


def test_an_unreadable_certificate_stops_start_up_naming_the_setting(
    certs: TestCertificates, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "server.crt"
    message = start_fails(make_settings(tls_cert_file=missing, tls_key_file=certs.server.key_file))
    assert f"{ENV_PREFIX}TLS_CERT_FILE" in message
    assert str(missing) in message
    assert "\n" not in message


def test_an_unreadable_key_stops_start_up_naming_the_setting(
    certs: TestCertificates, tmp_path: Path
) -> None:
    missing = tmp_path / "server.key"
    message = start_fails(make_settings(tls_cert_file=certs.server.cert_file, tls_key_file=missing))
    assert f"{ENV_PREFIX}TLS_KEY_FILE" in message


def test_an_unreadable_client_ca_stops_start_up_naming_the_setting(
    certs: TestCertificates, tmp_path: Path
) -> None:
    missing = tmp_path / "clients-ca.crt"
    message = start_fails(
        make_settings(
            tls_cert_file=certs.server.cert_file,
            tls_key_file=certs.server.key_file,
            tls_client_ca_file=missing,
        )
    )
    assert f"{ENV_PREFIX}TLS_CLIENT_CA_FILE" in message


# --- MCP over TLS ------------------------------------------------------------------------

MCP_TOOL = "tools.agenta.api.refine_prompt"


def mcp_tls_settings(certs: TestCertificates, upstream: StandinUpstream, *, mtls: bool) -> Any:
    return make_settings(
        upstream.url,
        mcp_address="127.0.0.1:0",
        tls_cert_file=certs.server.cert_file,
        tls_key_file=certs.server.key_file,
        tls_client_ca_file=certs.ca.cert_file if mtls else None,
    )


def trusting_context(certs: TestCertificates, *, client_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=certs.ca.cert_pem.decode())
    if client_certificate:
        context.load_cert_chain(certs.client.cert_file, certs.client.key_file)
    return context


def mcp_tools_over(url: str, api_key: str, context: ssl.SSLContext) -> list[str]:
    """The tool names an MCP client gets from `url` with the SDK's own client."""

    async def listing() -> list[str]:
        async with mcp_client(url, api_key, verify=context) as client:
            return [tool.name for tool in (await client.list_tools()).tools]

    return asyncio.run(listing())


def test_mcp_is_served_over_https_with_the_server_tls_settings(
    certs: TestCertificates, upstream: StandinUpstream, keys: TestKeys
) -> None:
    with ServerThread(mcp_tls_settings(certs, upstream, mtls=False)) as running:
        port = running.server.mcp_port
        context = trusting_context(certs, client_certificate=False)
        assert mcp_tools_over(f"https://127.0.0.1:{port}/mcp", keys.editor, context) == [MCP_TOOL]
        assert mcp_tools_over(f"https://localhost:{port}/mcp", keys.editor, context) == [MCP_TOOL]
        with (
            httpx.Client(trust_env=False, timeout=TIMEOUT) as plain,
            pytest.raises(httpx.TransportError),
        ):
            plain.post(f"http://127.0.0.1:{port}/mcp", json={})


def test_mcp_with_a_client_ca_refuses_a_client_without_a_certificate(
    certs: TestCertificates, upstream: StandinUpstream, keys: TestKeys
) -> None:
    with ServerThread(mcp_tls_settings(certs, upstream, mtls=True)) as running:
        url = f"https://127.0.0.1:{running.server.mcp_port}/mcp"
        with_certificate = trusting_context(certs, client_certificate=True)
        assert mcp_tools_over(url, keys.editor, with_certificate) == [MCP_TOOL]
        without = trusting_context(certs, client_certificate=False)
        with (
            httpx.Client(trust_env=False, timeout=TIMEOUT, verify=without) as http,
            pytest.raises(httpx.TransportError),
        ):
            http.post(url, json={}, headers={"Authorization": f"Bearer {keys.editor}"})


# --- the documented certificates ---------------------------------------------------------------


def documented_certificate_commands() -> str:
    """The first `sh` block of the TLS section of docs/access-control.md, as printed there."""
    text = (REPO_ROOT / "docs" / "access-control.md").read_text()
    section = text[text.index("## TLS and mTLS") :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    return block[: block.index("```")]


def test_the_documented_certificates_stay_in_a_git_ignored_directory_and_serve_mtls(
    tmp_path: Path, upstream: StandinUpstream, keys: TestKeys
) -> None:
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", documented_certificate_commands()],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    # Nothing lands next to the checkout's files; .dev/ is what .gitignore leaves out.
    assert [entry.name for entry in tmp_path.iterdir()] == [".dev"]
    assert ".dev/" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    tls = tmp_path / ".dev" / "tls"
    settings = make_settings(
        upstream.url,
        tls_cert_file=str(tls / "server.crt"),
        tls_key_file=str(tls / "server.key"),
        tls_client_ca_file=str(tls / "ca.crt"),
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / "client.key").read_bytes(),
        certificate_chain=(tls / "client.crt").read_bytes(),
    )
    with ServerThread(settings) as server:
        port = server.target.rsplit(":", 1)[1]
        assert status_with(f"localhost:{port}", keys.editor, credentials).enabled
