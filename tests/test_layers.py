"""The layers import one way: faces -> core -> tools -> upstream adapters and stores, with the
shared vocabulary (`server.call`, `server.errors`) below them all. Only faces know a transport,
so a second face can reuse everything else as it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server"

TRANSPORTS = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "aiservices", "mcp")
# What each layer must not import: any transport, and any layer above it.
FORBIDDEN = {
    "core": (*TRANSPORTS, "server.faces", "server.app"),
    "tools": (*TRANSPORTS, "server.faces", "server.core", "server.app"),
    "upstream": (*TRANSPORTS, "server.faces", "server.core", "server.tools", "server.app"),
    "ratelimit": (*TRANSPORTS, "server.faces", "server.core", "server.tools", "server.app"),
    "auth": (*TRANSPORTS, "server.faces", "server.core", "server.tools", "server.app"),
}
VOCABULARY = ("call.py", "errors.py")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
    return names


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in paths:
        for module in sorted(imported_modules(path)):
            if any(module == name or module.startswith(name + ".") for name in forbidden):
                found.append(f"{path.name} imports {module}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_no_transport_and_nothing_above_it(layer: str) -> None:
    paths = sorted((SERVER / layer).rglob("*.py"))
    assert paths, f"server/{layer} has no modules"
    assert violations(paths, FORBIDDEN[layer]) == []


def test_the_shared_vocabulary_imports_no_layer() -> None:
    forbidden = (*TRANSPORTS, "server.faces", "server.core", "server.tools", "server.app")
    assert violations([SERVER / name for name in VOCABULARY], forbidden) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import grpc.aio\nfrom server.faces.grpc import status\nimport json\n")
    assert violations([module], FORBIDDEN["core"]) == [
        "bad.py imports grpc.aio",
        "bad.py imports server.faces.grpc",
    ]
