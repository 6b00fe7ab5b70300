"""The bounds on JSON from outside: a parsed value's count is exact, and the count read from
text never says less than a parse would build."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aiservices_server.jsonbounds import holds_more_values, may_hold_more_values

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=60,
)


def members(value: Any) -> int:
    """Object members and list items, all the way down: what the bounds count."""
    if isinstance(value, dict):
        return len(value) + sum(members(item) for item in value.values())
    if isinstance(value, list):
        return len(value) + sum(members(item) for item in value)
    return 0


@given(JSON_VALUES, st.integers(min_value=0, max_value=80))
def test_a_parsed_value_is_counted_exactly(value: Any, limit: int) -> None:
    assert holds_more_values(value, limit) == (members(value) > limit)


@given(JSON_VALUES, st.integers(min_value=0, max_value=80))
def test_text_is_never_counted_as_holding_fewer_values_than_it_does(value: Any, limit: int) -> None:
    text = json.dumps(value)
    values = members(value) + 1  # and the value itself
    if values > limit:
        assert may_hold_more_values(text, limit)
        assert may_hold_more_values(text.encode(), limit)
