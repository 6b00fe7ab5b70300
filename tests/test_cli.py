"""The command line a newcomer meets first: `make run` (`aiservices-server --dev-keys`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aiservices import ToolClient, ToolServiceError
from tests.standin import Hang, StandinUpstream
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.servers import APP, ENVIRONMENT, UPSTREAM_KEY


def test_dev_keys_make_a_working_key_when_no_keys_file_is_set() -> None:
    with ServerProcess(args=["--dev-keys"]) as server:
        [line] = [line for line in server.lines if "development API key" in line]
        match = re.search(r"(ais_\S+)", line)
        assert match is not None, line
        key = match.group(1)
        with ToolClient(server.target, api_key=key, timeout=10) as client:
            status = client.status()
        # No upstream settings: the service runs, with the feature off.
        assert status.enabled is False
        assert server.terminate() == 0
    # The key was printed once for the developer, and never logged.
    assert sum(key in line for line in server.lines) == 1


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
def test_the_configured_event_loop_serves_and_drains(setting: str | None, loop: str) -> None:
    env = {"AUTH": "disabled"} | ({"EVENT_LOOP": setting} if setting else {})
    with ServerProcess(env) as server:
        [serving] = [r for r in server.records if r.get("msg") == "serving"]
        assert serving["event_loop"] == loop
        with ToolClient(server.target, timeout=10) as client:
            assert client.status().enabled is False
        assert server.terminate() == 0


def test_unknown_arguments_are_refused_with_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aiservices_server", "--bogus"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "usage: aiservices-server" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_second_signal_stops_at_once_without_waiting_the_grace() -> None:
    upstream = StandinUpstream(api_key=UPSTREAM_KEY, default=Hang()).start_in_thread()
    env = {
        "AUTH": "disabled",
        "SHUTDOWN_GRACE": "60",
        "API_KEY": UPSTREAM_KEY,
        "API_URL": upstream.url,
        "ENVIRONMENT_SLUG": ENVIRONMENT,
        "REFINE_PROMPT_KEY": APP,
    }
    try:
        with (
            ServerProcess(env) as server,
            ToolClient(server.target, timeout=30) as client,
            ThreadPoolExecutor(1) as pool,
        ):
            held = pool.submit(
                client.call_tool,
                "tools.agenta.api.refine_prompt",
                {"prompt_template_json": '{"messages": [{"role": "user", "content": "hi"}]}'},
            )
            assert upstream.wait_for_requests(1, timeout=10)
            os.kill(server.pid, signal.SIGTERM)
            assert server.wait_for_record(lambda r: r.get("msg") == "draining", timeout=10)
            started = time.monotonic()
            assert server.terminate(timeout=15) == 0  # the second SIGTERM
            assert time.monotonic() - started < 15  # not the 60 s grace
            assert any("second signal" in str(r.get("msg")) for r in server.records)
            with pytest.raises(ToolServiceError):
                held.result(timeout=10)
    finally:
        upstream.stop_thread()
