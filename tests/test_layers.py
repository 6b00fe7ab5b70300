"""The layers import one way: faces -> core -> tools -> upstream adapters and stores, with the
shared vocabulary (`call`, `errors`) below them all. Only faces know a transport, so a second
face can reuse everything else as it is.

Each module's own import lines are read here; the core is also imported in a fresh interpreter,
so what it pulls in through other modules (a package `__init__`, a helper that imports a
transport) counts too."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import clean_env

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


# What the core must not load, through any chain of imports: a transport or an HTTP library, the
# settings, the command line, or a module beside the faces (the app, the metrics listener, the
# upstream adapters). Names are modules or packages (a package covers its submodules).
CORE_NEVER_LOADS = (
    *TRANSPORTS,
    "google.protobuf",
    "google.rpc",
    "starlette",
    "uvicorn",
    "httpx",
    "httpcore",
    "httpx_aiohttp",
    "aiohttp",
    "h11",
    "h2",
    "redis",
    "prometheus_client",
    "pydantic_settings",
    "dotenv",
    "argparse",
    "http.server",
    "http.client",
    "urllib.request",
    "wsgiref",
    *(
        f"{PACKAGE}.{name}"
        for name in (
            "__main__",
            "app",
            "command",
            "config",
            "devkeys",
            "faces",
            "keys_cli",
            "metrics",
            "tls",
            "upstream.agenta",
            "upstream.http",
            "upstream.openai",
            "ratelimit.redis_store",
        )
    ),
)

# Run in a fresh interpreter: imports the modules named on the command line, one after the
# other, and prints the modules they loaded, each with the module whose code imported it.
IMPORT_TRACER = """
import json, sys

importers = {}


class Tracer:
    def find_spec(self, name, path=None, target=None):
        frame = sys._getframe(1)
        while frame is not None and (
            frame.f_code.co_filename.startswith("<frozen importlib")
            or frame.f_globals.get("__name__") == "importlib"
        ):
            frame = frame.f_back
        importers.setdefault(name, "?" if frame is None else frame.f_globals.get("__name__", "?"))
        return None


before = set(sys.modules)
sys.meta_path.insert(0, Tracer())
for name in sys.argv[1:]:
    __import__(name)
loaded = sorted(set(sys.modules) - before)
print(json.dumps({"loaded": loaded, "importers": importers}))
"""


def loaded_by(modules: list[str], cwd: Path) -> dict[str, Any]:
    """What importing `modules` in a fresh interpreter loads: `loaded` (module names) and
    `importers` (each module's importer, `__main__` for the modules named)."""
    ran = subprocess.run(
        [sys.executable, "-c", IMPORT_TRACER, *modules],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


def chain(module: str, importers: dict[str, str]) -> list[str]:
    """[a, b, module]: a (a module named on the command line) imports b, which imports module."""
    links = [module]
    while (importer := importers.get(links[-1], "__main__")) != "__main__":
        if importer in links:
            break
        links.append(importer)
    return links[::-1]


def is_within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def forbidden_chains(modules: list[str], forbidden: tuple[str, ...], cwd: Path) -> list[str]:
    """How importing `modules` reaches a forbidden module: one chain for each forbidden name it
    loads, leaving out chains that pass through another forbidden module first."""
    found = loaded_by(modules, cwd)
    chains = set()
    for name in forbidden:
        hits = [module for module in found["loaded"] if is_within(module, (name,))]
        if hits:
            links = chain(min(hits, key=len), found["importers"])
            if not any(is_within(link, forbidden) for link in links[:-1]):
                chains.add(" imports ".join(links))
    return sorted(chains)


def test_the_core_loads_no_transport_settings_or_command_line(tmp_path: Path) -> None:
    core = [f"{CORE}.{path.stem}" for path in sorted((SERVER / "core").glob("*.py"))]
    core = [CORE if name == f"{CORE}.__init__" else name for name in core]
    assert f"{CORE}.service" in core
    assert forbidden_chains(core, CORE_NEVER_LOADS, tmp_path) == []


def test_the_transitive_check_names_the_chain(tmp_path: Path) -> None:
    (tmp_path / "outer.py").write_text("import json\nimport middle\n")
    (tmp_path / "middle.py").write_text(
        "def later():\n    import argparse\n\nfrom aiservices_server import config\n"
    )
    assert forbidden_chains(["outer"], CORE_NEVER_LOADS, tmp_path) == [
        "outer imports middle imports aiservices_server.config",
    ]
