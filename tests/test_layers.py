"""The layers import one way: faces -> core -> tools -> upstream adapters and stores, with the
shared vocabulary (`call`, `errors`) below them all. Only faces know a transport, so a second
face can reuse everything else as it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server" / "aiservices_server"

TRANSPORTS = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "aiservices", "mcp")
PACKAGE = "aiservices_server"
FACES, CORE, TOOLS, APP = (f"{PACKAGE}.{part}" for part in ("faces", "core", "tools", "app"))
# What each layer must not import: any transport, and any layer above it.
FORBIDDEN = {
    "core": (*TRANSPORTS, FACES, APP),
    "tools": (*TRANSPORTS, FACES, CORE, APP),
    "upstream": (*TRANSPORTS, FACES, CORE, TOOLS, APP),
    "ratelimit": (*TRANSPORTS, FACES, CORE, TOOLS, APP),
    "auth": (*TRANSPORTS, FACES, CORE, TOOLS, APP),
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
    forbidden = (*TRANSPORTS, FACES, CORE, TOOLS, APP)
    assert violations([SERVER / name for name in VOCABULARY], forbidden) == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        "import grpc.aio\nfrom aiservices_server.faces.grpc import status\nimport json\n"
    )
    assert violations([module], FORBIDDEN["core"]) == [
        "bad.py imports aiservices_server.faces.grpc",
        "bad.py imports grpc.aio",
    ]
