"""A local development key so `make run` works from a fresh clone without any setup.

Kept in `.dev/` (git-ignored, mode 0600); production deployments set
AGENTA_AI_SERVICES_API_KEYS_FILE and never reach this code.
"""

from __future__ import annotations

import os
from pathlib import Path

from aiservices_server.auth import generate_key, hash_key

DEV_KEY_ID = "local-dev"


def ensure_dev_keys(directory: Path) -> tuple[Path, str]:
    """The keys file and the clear key, created on first use."""
    keys_file, key_file = directory / "keys.toml", directory / "api-key"
    if keys_file.exists() and key_file.exists():
        return keys_file, key_file.read_text().strip()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_key()
    entry = (
        "# Local development key, made by `make run`; never use it in production.\n"
        "[[keys]]\n"
        f'id = "{DEV_KEY_ID}"\n'
        f'hash = "{hash_key(key)}"\n'
        'permissions = ["*"]\n'
    )
    for path, text in ((keys_file, entry), (key_file, key + "\n")):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
    return keys_file, key
