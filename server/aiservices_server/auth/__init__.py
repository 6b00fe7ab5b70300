"""API keys: loading the keys file, authenticating presented keys, minting new ones (the
`keys` command that edits the file is `aiservices_server.keys_cli`).

Free of gRPC on purpose: the transport layer passes the `authorization` header value in and
maps a missing match to UNAUTHENTICATED.
"""

from aiservices_server.auth.keys import (
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
    "load_keys_file",
    "parse_authorization",
]
