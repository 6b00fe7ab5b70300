"""Which Host and Origin headers /mcp answers: protection against DNS rebinding.

A web page can make a browser send requests to any name it controls, and point that name at
127.0.0.1 or an internal address; the browser then thinks the server is the page's own. The
Host header still carries the page's name, and a cross-site request carries its Origin, so a
server that answers only the names it is reachable as, and only browser pages of those names,
cannot be reached that way. Requests without an Origin (every non-browser client) pass the
Origin check; a Host is always required.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

ANY = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::")


def split_host(value: str) -> tuple[str, str]:
    """A Host value as (host, port), the port "" when absent; an IPv6 host keeps its brackets."""
    if value.startswith("["):
        host, _, after = value.partition("]")
        return host + "]", after.removeprefix(":")
    host, _, port = value.partition(":")
    return host, port


def listener_names(host: str) -> tuple[str, ...]:
    """The names a listener bound to `host` is reachable as without any setting: the address
    itself, and the loopback names when it is a loopback (or every-address) bind."""
    bracketed = f"[{host}]" if ":" in host else host
    loopback = host == "localhost" or host in WILDCARD_ADDRESSES
    if not loopback:
        with contextlib.suppress(ValueError):
            loopback = ipaddress.ip_address(host).is_loopback
    own = () if host in WILDCARD_ADDRESSES else (bracketed.lower(),)
    return tuple(dict.fromkeys(own + (LOOPBACK_NAMES if loopback else ())))


@dataclass(frozen=True)
class OriginPolicy:
    """`hosts` holds allowed Host values, `name` (any port) or `name:port`, lower case;
    `origins` allowed Origin values besides those whose host is an allowed Host (pages of the
    server itself). `*` in either accepts anything."""

    hosts: frozenset[str]
    origins: frozenset[str]

    @classmethod
    def for_listener(
        cls, host: str, port: int, *, hosts: Iterable[str] = (), origins: Iterable[str] = ()
    ) -> OriginPolicy:
        own = {f"{name}:{port}" for name in listener_names(host)}
        return cls(
            frozenset(own | {h.lower() for h in hosts}), frozenset(o.lower() for o in origins)
        )

    def host_allowed(self, value: str | None) -> bool:
        return ANY in self.hosts or (bool(value) and self._named(str(value).lower()))

    def origin_allowed(self, value: str | None) -> bool:
        """No Origin (not a browser) passes; `null` (a sandboxed or file page) and anything not
        `scheme://host[:port]` fail unless `*` is allowed."""
        if value is None or ANY in self.origins:
            return True
        value = value.lower()
        if value in self.origins:
            return True
        scheme, sep, rest = value.partition("://")
        return bool(sep) and scheme in ("http", "https") and "/" not in rest and self._named(rest)

    def _named(self, value: str) -> bool:
        """Whether a lower-case `host[:port]` is one of `hosts` (the wildcard aside)."""
        return value in self.hosts or split_host(value)[0] in self.hosts
