"""The first checks every URL setting gets, before what is particular to its use."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

MAX_PORT = 65535


def split_url(url: str, schemes: tuple[str, ...], invalid: str) -> SplitResult:
    """`url` split into its parts, or ValueError saying what is wrong (`invalid` when it does
    not parse, e.g. a port that is not a number from 0 to MAX_PORT, or port 0).

    Messages never quote the URL: a mistaken one may hold a password.
    """
    if not url.startswith(schemes):
        named = ", ".join(schemes[:-1]) + " or " + schemes[-1]
        raise ValueError(f"must start with {named}")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(invalid) from None
    if port == 0:
        raise ValueError(f"the port must be a number from 1 to {MAX_PORT}")
    return parts
