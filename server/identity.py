"""Who is calling: the identity every layer below the transport sees."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key and, when it may act for users, the end user behind it."""

    key_id: str
    permissions: frozenset[str] = field(default_factory=frozenset)
    organization: str | None = None
    user_id: str | None = None

    def may(self, permission: str) -> bool:
        return "*" in self.permissions or permission in self.permissions


ANONYMOUS = Principal(key_id="anonymous", permissions=frozenset({"*"}))
