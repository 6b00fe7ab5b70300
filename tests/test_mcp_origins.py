"""/mcp answers only the Host names it is reachable as and no browser page of another origin:
a page that rebinds its own DNS name to the server's address gets nothing, even from a
development server without keys. Checked before authentication, over raw HTTP (the SDK's client
always sends a good Host), against the real server."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiservices_server.config import AuthMode
from aiservices_server.faces.mcp.origins import OriginPolicy
from tests.standin import StandinUpstream
from tests.support.keys import TestKeys
from tests.support.mcp import PROTOCOL_VERSION, rpc
from tests.support.servers import ServerThread, make_settings
from tests.support.waiting import access_records

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {"prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi"}]})}


def call(port: int, *, key: str | None, host: str, origin: str | None = None) -> httpx.Response:
    headers = {
        "host": host,
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": PROTOCOL_VERSION,
        "mcp-method": "tools/call",
        "mcp-name": TOOL,
    }
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if origin is not None:
        headers["origin"] = origin
    with httpx.Client(trust_env=False, timeout=10) as http:
        return http.post(
            f"http://127.0.0.1:{port}/mcp",
            content=rpc("tools/call", {"name": TOOL, "arguments": ARGUMENTS}),
            headers=headers,
        )


@pytest.fixture
def served(upstream: StandinUpstream) -> Iterator[ServerThread]:
    settings = make_settings(
        upstream.url,
        mcp_address="127.0.0.1:0",
        mcp_allowed_hosts="mcp.internal.example",
        mcp_allowed_origins="https://console.internal.example",
    )
    with ServerThread(settings) as server:
        yield server


@pytest.mark.parametrize(
    ("host", "origin", "status", "reason"),
    [
        ("evil.example", None, 421, "HOST_NOT_ALLOWED"),
        ("evil.example:{port}", "http://evil.example:{port}", 421, "HOST_NOT_ALLOWED"),
        ("169.254.169.254", None, 421, "HOST_NOT_ALLOWED"),
        ("127.0.0.1:1", None, 421, "HOST_NOT_ALLOWED"),
        ("127.0.0.1:{port}", "http://evil.example", 403, "ORIGIN_NOT_ALLOWED"),
        ("127.0.0.1:{port}", "null", 403, "ORIGIN_NOT_ALLOWED"),
        ("127.0.0.1:{port}", "http://localhost:1", 403, "ORIGIN_NOT_ALLOWED"),
    ],
)
def test_a_host_or_origin_the_server_is_not_is_refused_before_authentication(
    served: ServerThread,
    caplog: pytest.LogCaptureFixture,
    host: str,
    origin: str | None,
    status: int,
    reason: str,
) -> None:
    port = served.server.mcp_port
    assert port is not None
    caplog.set_level(logging.INFO, logger="aiservices.access")
    response = call(
        port,
        key=None,  # no key: the refusal comes first, so nothing is learned about keys
        host=host.format(port=port),
        origin=None if origin is None else origin.format(port=port),
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["data"]["reason"] == reason
    assert "www-authenticate" not in response.headers
    assert access_records(caplog, 1, transport="mcp", code="PERMISSION_DENIED")


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("127.0.0.1:{port}", None),
        ("localhost:{port}", "http://localhost:{port}"),
        ("[::1]:{port}", "http://[::1]:{port}"),
        ("LOCALHOST:{port}", "http://127.0.0.1:{port}"),
        ("mcp.internal.example", "https://mcp.internal.example"),
        ("mcp.internal.example:8443", "https://console.internal.example"),
    ],
)
def test_the_servers_own_names_and_the_allowed_ones_are_served(
    served: ServerThread, keys: TestKeys, host: str, origin: str | None
) -> None:
    port = served.server.mcp_port
    assert port is not None
    response = call(
        port,
        key=keys.editor,
        host=host.format(port=port),
        origin=None if origin is None else origin.format(port=port),
    )
    assert response.status_code == 200, response.text
    assert response.json()["result"]["isError"] is False


def test_a_request_without_host_or_with_two_is_refused(
    served: ServerThread, keys: TestKeys
) -> None:
    port = served.server.mcp_port
    assert port is not None
    body = rpc("tools/list")
    for hosts in ([], [f"127.0.0.1:{port}", f"127.0.0.1:{port}"]):
        head = "".join(f"Host: {host}\r\n" for host in hosts)
        raw = (
            f"POST /mcp HTTP/1.1\r\n{head}Authorization: Bearer {keys.editor}\r\n"
            "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            f"Mcp-Method: tools/list\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 421 "), answer


def test_healthz_answers_any_balancer_by_any_host_without_a_key_or_an_access_line(
    served: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A balancer probes a replica by its own address, which need not be an allowed Host."""
    port = served.server.mcp_port
    assert port is not None
    caplog.set_level(logging.INFO, logger="aiservices.access")
    with httpx.Client(trust_env=False, timeout=10) as http:
        for host in (f"127.0.0.1:{port}", "10.1.2.3:8080"):
            answer = http.get(f"http://127.0.0.1:{port}/healthz", headers={"host": host})
            assert (answer.status_code, answer.json()) == (200, {"status": "SERVING"})
            assert answer.headers["cache-control"] == "no-store"
        posted = http.post(f"http://127.0.0.1:{port}/healthz")
        assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")
    # A call after them is logged; the probes before it are not.
    assert call(port, key=None, host="evil.example").status_code == 421
    assert len(access_records(caplog, 1)) == 1
    assert len([r for r in caplog.records if r.name == "aiservices.access"]) == 1


def test_a_rebound_page_gets_nothing_from_a_development_server_without_keys(
    upstream: StandinUpstream,
) -> None:
    """The attack the check exists for: AUTH=disabled on loopback, and a page whose name now
    points at 127.0.0.1 posting a tool call from the victim's browser."""
    settings = make_settings(
        upstream.url, api_keys_file=None, auth=AuthMode.DISABLED, mcp_address="127.0.0.1:0"
    )
    with ServerThread(settings) as server:
        port = server.server.mcp_port
        assert port is not None
        rebound = call(
            port,
            key=None,
            host=f"attacker.example:{port}",
            origin=f"http://attacker.example:{port}",
        )
        assert rebound.status_code == 421
        assert "result" not in rebound.json()
        assert upstream.requests == []
        local = call(port, key=None, host=f"localhost:{port}")
        assert local.status_code == 200
        assert local.json()["result"]["isError"] is False


POLICY = OriginPolicy.for_listener("127.0.0.1", 50052)
OWN = {"127.0.0.1:50052", "localhost:50052", "[::1]:50052"}


@given(st.text(max_size=300))
def test_any_host_header_is_accepted_only_when_it_is_one_of_the_servers_names(value: str) -> None:
    assert POLICY.host_allowed(value) == (value.lower() in OWN)


@given(st.sampled_from(["http://", "https://", "", "null", "HTTP://"]), st.text(max_size=300))
def test_any_origin_is_accepted_only_when_it_is_a_page_of_the_server(
    scheme: str, rest: str
) -> None:
    origin = scheme + rest
    expected = origin.lower().startswith(("http://", "https://")) and (
        origin.lower().partition("://")[2] in OWN
    )
    assert POLICY.origin_allowed(origin) == expected
