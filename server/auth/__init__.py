"""API keys: loading the keys file, authenticating presented keys, minting new ones.

Free of gRPC on purpose: the transport layer passes the `authorization` header value in and
maps a missing match to UNAUTHENTICATED.
"""

from server.auth.cli import keys_main
from server.auth.keys import (
    ApiKey,
    KeysFileError,
    KeyStore,
    generate_key,
    hash_key,
    load_keys_file,
    parse_authorization,
)

__all__ = [
    "ApiKey",
    "KeyStore",
    "KeysFileError",
    "generate_key",
    "hash_key",
    "keys_main",
    "load_keys_file",
    "parse_authorization",
]
