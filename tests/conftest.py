from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from aiservices import ToolClient
from tests.standin import StandinUpstream
from tests.support.certs import TestCertificates, make_certificates
from tests.support.clients import Harness
from tests.support.keys import TestKeys, load_test_keys
from tests.support.redis_server import RedisServer
from tests.support.servers import UPSTREAM_KEY, ServerThread, make_settings


@pytest.fixture
def upstream() -> Iterator[StandinUpstream]:
    """A real HTTP Agenta completion runner stand-in on 127.0.0.1."""
    standin = StandinUpstream(api_key=UPSTREAM_KEY)
    standin.start_in_thread()
    yield standin
    standin.stop_thread()


@pytest.fixture
def server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    with ServerThread(make_settings(upstream.url)) as running:
        yield running


@pytest.fixture
def no_upstream_retry_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """Each upstream failure becomes a tool error at once (the server retries nothing)."""
    with ServerThread(make_settings(upstream.url, upstream_retries=0)) as running:
        yield running


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    """Clients a test makes (tests.support.clients.Harness), closed after it."""
    made: list[Harness] = []
    yield made
    for harness in made:
        await harness.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    """A CA, server and client certificates (and untrusted ones), made once for the run."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def mcp_server(upstream: StandinUpstream) -> Iterator[ServerThread]:
    """The real server with MCP on a free loopback port beside gRPC."""
    with ServerThread(make_settings(upstream.url, mcp_address="127.0.0.1:0")) as running:
        yield running


@pytest.fixture
def keys() -> TestKeys:
    return load_test_keys()


@pytest.fixture
def client(server: ServerThread, keys: TestKeys) -> Iterator[ToolClient]:
    """A caller with the permission refine_prompt needs."""
    with ToolClient(server.target, api_key=keys.editor, timeout=10.0) as tool_client:
        yield tool_client


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, with a password, for the shared limits."""
    server = RedisServer(password=secrets.token_urlsafe(24))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
