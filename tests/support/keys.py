"""API keys for tests: one keys file per test session, written like an operator would."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from aiservices_server.auth import generate_key, hash_key


@dataclass(frozen=True)
class TestKeys:
    __test__ = False  # not a test class, despite the name

    path: Path
    full: str  # "*"
    editor: str  # edit_workflows
    viewer: str  # nothing that calls a tool
    gateway: str  # edit_workflows + act_for_users
    tiered: str  # edit_workflows with its own limit: burst 3, 60 per minute
    other_org: str  # edit_workflows in organization "globex"


@cache
def load_test_keys() -> TestKeys:
    directory = Path(tempfile.mkdtemp(prefix="aiservices-keys-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    keys = {name: generate_key() for name in TestKeys.__dataclass_fields__ if name != "path"}
    entries = {
        "full": 'permissions = ["*"]',
        "editor": 'permissions = ["edit_workflows"]\norganization = "acme"',
        "viewer": 'permissions = ["read_workflows"]',
        "gateway": 'permissions = ["edit_workflows", "act_for_users"]\norganization = "acme"',
        "tiered": 'permissions = ["edit_workflows"]\nrate_limit = { burst = 3, per_minute = 60 }',
        "other_org": 'permissions = ["edit_workflows"]\norganization = "globex"',
    }
    text = "".join(
        f'[[keys]]\nid = "{name}"\nhash = "{hash_key(keys[name])}"\n{entry}\n\n'
        for name, entry in entries.items()
    )
    path = directory / "keys.toml"
    path.write_text(text)
    path.chmod(0o600)  # as an operator keeps it: a keys file others can read is warned about
    return TestKeys(path=path, **keys)
