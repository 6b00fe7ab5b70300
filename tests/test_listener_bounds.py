"""Every listener bounds its connections in number and in time, so no caller, with or without a
key, can use up the server's file descriptors: against a real server process whose open-file
limit is low, flooded with connections that send nothing, or their bytes one at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from aiservices import ToolClient
from tests.standin import StandinUpstream
from tests.support.certs import TestCertificates
from tests.support.keys import TestKeys
from tests.support.mcp import rpc
from tests.support.processes import HOST, ServerProcess, upstream_settings
from tests.support.waiting import wait_until

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {"prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi"}]})}
FLOOD = 600
CAP = 100
# Under a limit the flood alone would exceed: 100 gRPC + 100 MCP + 50 upstream + 16 metrics +
# 128 reserved = 394 needed.
OPEN_FILES = (512, 512)


def request_bytes(port: int, key: str, body: bytes = b"", *, method: str = "POST") -> bytes:
    body = body or rpc("tools/list")
    head = (
        f"{method} /mcp HTTP/1.1\r\nHost: {HOST}:{port}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        f"MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/list\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def connect(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=10)


@contextlib.contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections to `port` that send nothing, closed on leaving."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(connect(port))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing `sock` (b"" for nothing), or None when it is still
    open after `timeout` seconds."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def all_closed(sockets: list[socket.socket], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(
        closed_by_server(sock, max(0.01, deadline - time.monotonic())) is not None
        for sock in sockets
    )


def mcp_list(port: int, key: str, tls: ssl.SSLContext | None = None) -> httpx.Response:
    """A tools/list over plain HTTP, or HTTPS trusting `tls`."""
    scheme = "http" if tls is None else "https"
    with httpx.Client(trust_env=False, timeout=10, verify=tls or True) as http:
        return http.post(
            f"{scheme}://{HOST}:{port}/mcp",
            content=rpc("tools/list"),
            headers={
                "authorization": f"Bearer {key}",
                "content-type": "application/json",
                "accept": "application/json, text/event-stream",
                "mcp-method": "tools/list",
            },
        )


def refused_count(metrics_port: int, listener: str) -> float:
    """`aiservices_connections_refused_total` of `listener`; -1 when the scrape itself was
    refused (the metrics listener still full)."""
    try:
        with httpx.Client(trust_env=False, timeout=10) as http:
            text = http.get(f"http://{HOST}:{metrics_port}/metrics").text
    except httpx.TransportError:
        return -1
    prefix = f'aiservices_connections_refused_total{{listener="{listener}"}} '
    return next(
        (float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0
    )


@pytest.fixture
def bounded(upstream: StandinUpstream, keys: TestKeys) -> Iterator[ServerProcess]:
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "RATE_LIMIT_BURST": "100000",
        "MCP_ADDRESS": f"{HOST}:0",
        "METRICS_ADDRESS": f"{HOST}:0",
        "MCP_MAX_CONNECTIONS": str(CAP),
        "GRPC_MAX_CONNECTIONS": str(CAP),
        "UPSTREAM_MAX_CONNECTIONS": "50",
        "MCP_HEADER_TIMEOUT": "2",
        "GRPC_HANDSHAKE_TIMEOUT": "2",
        "SHUTDOWN_GRACE": "2",
    }
    with ServerProcess(env, name="bounded", open_files=OPEN_FILES) as process:
        yield process


def test_a_flood_of_idle_mcp_connections_leaves_grpc_and_the_upstream_working(
    bounded: ServerProcess, keys: TestKeys
) -> None:
    mcp_port, metrics_port = bounded.port_of("mcp_port"), bounded.port_of("metrics_port")
    with idle_connections(mcp_port, FLOOD) as flood:
        # Past the cap a new MCP connection is told so, at once, and closed (checked first: the
        # flood holds the cap only until the header deadline).
        with connect(mcp_port) as extra:
            answer = closed_by_server(extra, timeout=5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 503 "), answer
        # A fresh gRPC connection, and a call that opens a new upstream connection, still work.
        with ToolClient(bounded.target, api_key=keys.editor, timeout=10) as client:
            assert client.status().enabled
            result = client.call_tool(TOOL, ARGUMENTS)
            assert not result.is_error, result
        assert refused_count(metrics_port, "mcp") >= FLOOD - CAP
        assert bounded.wait_for_record(
            lambda r: (
                r.get("msg") == "connection refused: too many open" and r.get("listener") == "mcp"
            ),
            5,
        )
        # The header deadline closes every connection that sent nothing.
        assert all_closed(flood, timeout=15)
    assert len(os.listdir(f"/proc/{bounded.pid}/fd")) < 200
    response = mcp_list(mcp_port, keys.editor)
    assert response.status_code == 200, response.text
    lines = [r for r in bounded.records if r.get("msg") == "connection refused: too many open"]
    assert len(lines) <= 3, "the refusal line is written at most once a second"


def test_a_flood_of_silent_grpc_connections_leaves_mcp_and_the_upstream_working(
    bounded: ServerProcess, keys: TestKeys
) -> None:
    mcp_port = bounded.port_of("mcp_port")
    with idle_connections(bounded.port, FLOOD) as flood:
        body = rpc("tools/call", {"name": TOOL, "arguments": ARGUMENTS})
        with httpx.Client(trust_env=False, timeout=10) as http:
            called = http.post(
                f"http://{HOST}:{mcp_port}/mcp",
                content=body,
                headers={
                    "authorization": f"Bearer {keys.editor}",
                    "content-type": "application/json",
                    "accept": "application/json, text/event-stream",
                    "mcp-method": "tools/call",
                    "mcp-name": TOOL,
                },
            )
        assert called.status_code == 200, called.text
        assert called.json()["result"]["isError"] is False
        # gRPC's handshake deadline closes the connections that never sent a preface.
        assert all_closed(flood, timeout=15)
    with ToolClient(bounded.target, api_key=keys.editor, timeout=10) as client:
        assert client.status().enabled


def test_headers_sent_a_byte_at_a_time_are_cut_off_at_the_header_deadline(
    bounded: ServerProcess, keys: TestKeys
) -> None:
    port = bounded.port_of("mcp_port")
    request = request_bytes(port, keys.editor)
    stop = threading.Event()
    with connect(port) as sock:
        opened = time.monotonic()

        def dribble() -> None:
            for byte in request:
                if stop.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))

        writer = threading.Thread(target=dribble, daemon=True)
        writer.start()
        try:
            answer = closed_by_server(sock, timeout=15)
        finally:
            stop.set()
            writer.join()
    took = time.monotonic() - opened
    assert answer == b"", answer
    assert 1.5 < took < 6, took  # the 2 s deadline, far from the 80 s the headers would take


def test_a_kept_alive_connection_is_closed_when_idle_and_its_next_headers_have_a_deadline(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "MCP_ADDRESS": f"{HOST}:0",
        "MCP_IDLE_TIMEOUT": "1",
        "MCP_HEADER_TIMEOUT": "1",
    }
    with ServerProcess(env, name="keep-alive") as process:
        port = process.port_of("mcp_port")
        with connect(port) as sock:
            sock.sendall(request_bytes(port, keys.editor))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            answered = time.monotonic()
            assert closed_by_server(sock, timeout=10) is not None
            assert 0.5 < time.monotonic() - answered < 5
        with connect(port) as sock:
            sock.sendall(request_bytes(port, keys.editor))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"P")  # the next request starts, and stalls
            started = time.monotonic()
            assert closed_by_server(sock, timeout=10) is not None
            assert time.monotonic() - started < 5


def test_a_body_that_stops_arriving_gets_408_at_the_body_deadline(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "MCP_ADDRESS": f"{HOST}:0",
        "MCP_BODY_TIMEOUT": "1",
    }
    with ServerProcess(env, name="slow-body") as process:
        port = process.port_of("mcp_port")
        with connect(port) as sock:
            whole = request_bytes(port, keys.editor)
            sock.sendall(whole[:-10])  # all but the last 10 bytes of the body
            sent = time.monotonic()
            answer = closed_by_server(sock, timeout=10)
        assert answer is not None
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.5 < time.monotonic() - sent < 5
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["data"]["reason"] == "REQUEST_TIMEOUT"
        assert process.wait_for_record(
            lambda r: r.get("transport") == "mcp" and r.get("code") == "DEADLINE_EXCEEDED", 5
        )


def test_the_metrics_listener_caps_its_connections(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    env = {"API_KEYS_FILE": str(keys.path), "METRICS_ADDRESS": f"{HOST}:0"}
    with ServerProcess(env, name="metrics-cap") as process:
        port = process.port_of("metrics_port")
        with idle_connections(port, 16) as held:
            # Each is being served (its thread waits for its request line).
            with connect(port) as extra:
                assert closed_by_server(extra, timeout=5) == b""
            assert all(closed_by_server(sock, timeout=0.2) is None for sock in held)
        assert wait_until(lambda: refused_count(port, "metrics") == 1, 10)


def test_caps_that_do_not_fit_under_the_open_file_limit_stop_start_up(keys: TestKeys) -> None:
    env = {"API_KEYS_FILE": str(keys.path), "MCP_ADDRESS": f"{HOST}:0"}
    process = ServerProcess(env, name="low-limit", open_files=(1024, 1024))
    try:
        process.spawn()
        assert process.wait_for_line(lambda line: line.startswith("aiservices: "), 15)
        line = next(line for line in process.lines if line.startswith("aiservices: "))
    finally:
        process.close()
    assert line.startswith("aiservices: the open-file limit (1024; ")
    assert (
        "1000 (GRPC_MAX_CONNECTIONS) + 1000 (MCP_MAX_CONNECTIONS) + 1000 (UPSTREAM_MAX_CONNECTIONS)"
        in line
    )


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(keys: TestKeys) -> None:
    env = {"API_KEYS_FILE": str(keys.path), "MCP_ADDRESS": f"{HOST}:0"}
    with ServerProcess(env, name="raised", open_files=(1024, 4096)) as process:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert row.split()[3:5] == ["4096", "4096"], row


def test_sigterm_closes_every_connection_within_the_grace_period(
    bounded: ServerProcess, keys: TestKeys
) -> None:
    port = bounded.port_of("mcp_port")
    half_bodies = []
    try:
        for _ in range(50):
            sock = connect(port)
            sock.sendall(request_bytes(port, keys.editor)[:-10])
            half_bodies.append(sock)
        with connect(port) as stream:
            stream.sendall(
                request_bytes(port, keys.editor, method="GET").replace(
                    b"Accept: application/json, text/event-stream", b"Accept: text/event-stream"
                )
            )
            answer = closed_by_server(stream, timeout=5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 405 "), answer
        assert b"\r\nallow: POST\r\n" in answer
        signalled = time.monotonic()
        assert bounded.terminate(timeout=10) == 0
        took = time.monotonic() - signalled
        assert all(closed_by_server(sock, timeout=0.5) is not None for sock in half_bodies)
    finally:
        for sock in half_bodies:
            sock.close()
    assert took < 2 + 1.5, took  # SHUTDOWN_GRACE=2


def test_tls_connections_that_never_finish_their_handshake_are_capped_and_timed_out(
    upstream: StandinUpstream, keys: TestKeys, certs: TestCertificates
) -> None:
    """The cap counts a TLS connection from when it is accepted, and the handshake has the
    header deadline: silent TLS connections cannot hold descriptors as plain ones cannot."""
    env = {
        "API_KEYS_FILE": str(keys.path),
        **upstream_settings(upstream.url),
        "MCP_ADDRESS": f"{HOST}:0",
        "TLS_CERT_FILE": str(certs.server.cert_file),
        "TLS_KEY_FILE": str(certs.server.key_file),
        "MCP_MAX_CONNECTIONS": str(CAP),
        "GRPC_MAX_CONNECTIONS": str(CAP),
        "UPSTREAM_MAX_CONNECTIONS": "50",
        "MCP_HEADER_TIMEOUT": "2",
    }
    trusting = ssl.create_default_context(cadata=certs.ca.cert_pem.decode())
    with ServerProcess(env, name="tls-bounded", open_files=OPEN_FILES) as process:
        port = process.port_of("mcp_port")
        with idle_connections(port, FLOOD) as flood:
            with connect(port) as extra:
                assert closed_by_server(extra, timeout=5) == b""
            credentials = grpc.ssl_channel_credentials(certs.ca.cert_pem)
            with ToolClient(
                process.target, api_key=keys.editor, timeout=10, credentials=credentials
            ) as client:
                assert not client.call_tool(TOOL, ARGUMENTS).is_error
            assert all_closed(flood, timeout=15)
        listed = mcp_list(port, keys.editor, trusting)
        assert listed.status_code == 200, listed.text


def test_the_mcp_listener_keeps_accepting_after_running_out_of_descriptors(
    upstream: StandinUpstream, keys: TestKeys
) -> None:
    """An accept that fails for want of descriptors (another part of the process took them)
    is retried, not the end of the listener: once descriptors are free, a waiting client is
    served."""
    env = {"API_KEYS_FILE": str(keys.path), **upstream_settings(upstream.url)}
    env["MCP_ADDRESS"] = f"{HOST}:0"
    with ServerProcess(env, name="emfile") as process:
        port, pid = process.port_of("mcp_port"), process.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        # Below what is open: no new descriptor, whatever else the server opens meanwhile.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use - 4, limits[1]))
        try:
            with connect(port) as waiting:
                waiting.sendall(request_bytes(port, keys.editor))
                assert process.wait_for_record(
                    lambda r: r.get("msg") == "MCP connections not accepted for now", 10
                )
                resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
                waiting.settimeout(10)
                assert waiting.recv(65536).startswith(b"HTTP/1.1 200 ")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        assert mcp_list(port, keys.editor).status_code == 200
