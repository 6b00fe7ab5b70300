"""The command line a newcomer meets first: `make run` (`python -m server --dev-keys`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from aiservices import ToolClient

from tests.support.processes import REPO_ROOT, ServerProcess


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
        [sys.executable, "-m", "server", "--bogus"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "usage: python -m server" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
