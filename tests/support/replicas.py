"""Callers of several replicas that share one rate-limit budget in Redis.

Each replica is called as a delegated user (the gateway key plus `x-agenta-user-id`), so every
phase of a test can use a user of its own and no budget carries over between phases.
"""

from __future__ import annotations

import json

import grpc
import pytest

from aiservices import ToolClient, ToolServiceError
from aiservices_server.ratelimit.redis_store import DEFAULT_PREFIX

TOOL = "tools.agenta.api.refine_prompt"
ARGUMENTS = {
    "prompt_template_json": json.dumps({"messages": [{"role": "user", "content": "Hi {{name}}"}]})
}
ORGANIZATION = "acme"  # the gateway key's organization in the test keys file


def redis_key(user: str) -> str:
    """Where Redis keeps `user`'s budget for the tool."""
    return f"{DEFAULT_PREFIX}{ORGANIZATION}|u:{user}|{TOOL}"


class ReplicaCaller:
    """A client of one replica, calling the tool as delegated users."""

    def __init__(self, name: str, client: ToolClient) -> None:
        self.name = name
        self.client = client

    def call(self, user: str) -> None:
        """One call as `user`; it must be admitted and served by the upstream."""
        result = self.client.call_tool(TOOL, ARGUMENTS, metadata=[("x-agenta-user-id", user)])
        assert not result.is_error, f"{self.name}: tool error for {user}: {result.error}"
        assert result.structured_content and result.structured_content["messages"]

    def refused(self, user: str) -> ToolServiceError:
        try:
            self.call(user)
        except ToolServiceError as error:
            return error
        pytest.fail(f"{self.name}: a call for {user} was admitted past the shared budget")


def assert_one_budget(a: ReplicaCaller, b: ReplicaCaller, user: str, burst: int) -> None:
    """`burst` calls alternating between A and B are admitted; the next is refused on both,
    with a retry delay of 1 or 2 s."""
    for index in range(burst):
        replica = (a, b)[index % 2]
        try:
            replica.call(user)
        except ToolServiceError as exc:
            pytest.fail(f"{replica.name}: call {index + 1} of {burst} for {user} failed: {exc}")
    for replica in (a, b):
        error = replica.refused(user)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED, f"{replica.name}: {error}"
        assert error.retry_after is not None and 1 <= error.retry_after <= 2, error.retry_after
