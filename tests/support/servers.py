"""The real server, started in a thread with its own event loop.

A separate loop lets both the synchronous and the asyncio client call it from tests, exactly as
a separate process would, while tests can still reach into the server when they need to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from aiservices_server.app import AiServicesServer
from aiservices_server.config import Settings
from aiservices_server.tools.base import Tool
from tests.support.keys import load_test_keys

T = TypeVar("T")

UPSTREAM_KEY = "upstream-secret-key-0123456789"
ENVIRONMENT = "production"
APP = "ai-services-refine"


def make_settings(upstream_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys_file": load_test_keys().path,
        "grpc_address": "127.0.0.1:0",
        "shutdown_grace": 2.0,
        "upstream_timeout": 5.0,
    }
    if upstream_url is not None:
        values.update(
            api_key=UPSTREAM_KEY,
            api_url=upstream_url,
            environment_slug=ENVIRONMENT,
            refine_prompt_key=APP,
        )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class ServerThread:
    def __init__(self, settings: Settings, *, tools: Sequence[Tool] | None = None) -> None:
        self.settings = settings
        self.server = AiServicesServer(settings, tools=tools)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def loop_cpu_seconds(self) -> float:
        """CPU time the server's event-loop thread has used so far: what it spent working, as
        opposed to waiting for a core when the machine is busy."""
        assert self._thread.ident is not None, "the server has not started"
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = self.run(self.server.start())
        return self

    def stop(self, grace: float = 0.0) -> None:
        if self._thread.is_alive():
            self.run(self.server.stop(grace), timeout=grace + 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
