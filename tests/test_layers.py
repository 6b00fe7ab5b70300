"""The layers import one way: faces -> core -> tools -> upstream adapters and stores, with the
shared vocabulary (`call`, `errors`) below them all. Only faces know a transport, so a second
face can reuse everything else as it is.

Each module's own import lines are read here; the core is also imported in a fresh interpreter,
so what it pulls in through other modules (a package `__init__`, a helper that imports a
transport) counts too."""

from __future__ import annotations

import ast
import builtins
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


# Nothing is mutated on the way up: an error is built whole where it is raised (what it carries,
# such as headers or the upstream attempt, goes to its constructor), and a layer that adds to an
# error it caught raises a new one (`with_headers`, `with_attempt`, `with_upstream`).
#
# Read from the source, so simple rather than complete: a name holds an exception when it is
# bound by `except ... as name`, or to a call of an exception class, of a function annotated to
# return one (or `Self` in an exception class), or to another such name; so does `self` in an
# exception class's methods other than `__init__`. Setting or deleting an attribute of it, an
# item of one, or calling a mutating method on one (`error.headers.update(...)`) is a mutation.
MUTATING_METHODS = frozenset(
    {"update", "setdefault", "pop", "popitem", "clear", "append", "extend", "insert", "remove"}
)
# The one place allowed, by file and code: the gRPC face's private `_TooLarge` collects the path
# to the field where the count ran out as it unwinds the conversion, and never leaves the module.
ALLOWED_MUTATIONS = frozenset(
    {
        ("aiservices_server/faces/grpc/convert.py", "exc.path.append(index)"),
        ("aiservices_server/faces/grpc/convert.py", "exc.path.append(key)"),
    }
)
BUILTIN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)

Scope = ast.Module | ast.FunctionDef | ast.AsyncFunctionDef


def type_name(node: ast.expr | None) -> str:
    """The last name of a base class or annotation: `errors.InvalidArgument` is InvalidArgument."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return type_name(node.value)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.rsplit(".", 1)[-1]
    return ""


def exception_classes(trees: list[ast.Module]) -> set[str]:
    """The names of the classes that derive from an exception, builtin or defined here."""
    bases = [
        (node.name, {type_name(base) for base in node.bases})
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]
    known = set(BUILTIN_EXCEPTIONS)
    while True:
        more = {name for name, of in bases if name not in known and of & known}
        if not more:
            return known
        known |= more


def in_scope(scope: Scope) -> list[ast.AST]:
    """The nodes of `scope`'s own code: not those of the functions defined in it."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(scope.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            todo.extend(ast.iter_child_nodes(node))
    return found


def root_name(node: ast.expr) -> tuple[str, bool]:
    """The name an attribute or item chain starts from, and whether it goes through an
    attribute: `error.headers["x"]` is ("error", True), `values[0]` is ("values", False)."""
    through_attribute = False
    while isinstance(node, ast.Attribute | ast.Subscript):
        through_attribute = through_attribute or isinstance(node, ast.Attribute)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else "", through_attribute)


def error_mutations(paths: list[Path], root: Path) -> list[str]:
    """`file:line: code` for each place that changes an exception after it was created."""
    trees = {path: ast.parse(path.read_text(), filename=str(path)) for path in paths}
    classes = exception_classes(list(trees.values()))
    producers = set(classes)
    # The methods of exception classes other than __init__: `self` in them is an exception.
    methods: dict[int, str] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and type_name(node.returns) in classes
            ):
                producers.add(node.name)
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for method in node.body:
                    if not isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef):
                        continue
                    if type_name(method.returns) == "Self":
                        producers.add(method.name)
                    if method.name != "__init__" and method.args.args:
                        methods[id(method)] = method.args.args[0].arg

    def holds_exception(value: ast.expr | None, names: set[str]) -> bool:
        if isinstance(value, ast.Call):
            return type_name(value.func) in producers
        if isinstance(value, ast.Name):
            return value.id in names
        if isinstance(value, ast.IfExp):
            return holds_exception(value.body, names) or holds_exception(value.orelse, names)
        if isinstance(value, ast.BoolOp):
            return any(holds_exception(part, names) for part in value.values)
        return False

    found: set[tuple[str, int, str]] = set()
    for path, tree in trees.items():
        scopes: list[Scope] = [tree]
        scopes += [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for scope in scopes:
            nodes = in_scope(scope)
            names = {methods[id(scope)]} if id(scope) in methods else set()
            names |= {n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}
            while True:
                bound = {
                    target.id
                    for n in nodes
                    if isinstance(n, ast.Assign | ast.AnnAssign | ast.NamedExpr)
                    and holds_exception(n.value, names)
                    for target in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(target, ast.Name)
                }
                if bound <= names:
                    break
                names |= bound

            def changes(target: ast.expr, names: set[str] = names) -> bool:
                if isinstance(target, ast.Tuple | ast.List):
                    return any(changes(part) for part in target.elts)
                name, through_attribute = root_name(target)
                return name in names and through_attribute

            for n in nodes:
                targets: list[ast.expr] = []
                if isinstance(n, ast.Assign | ast.Delete):
                    targets = n.targets
                elif isinstance(n, ast.AugAssign | ast.AnnAssign):
                    targets = [n.target]
                elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                    if n.func.attr in MUTATING_METHODS:
                        targets = [n.func.value]
                    elif n.func.attr == "__setattr__" and n.args:
                        targets = [ast.Attribute(n.args[0], "?")]
                elif isinstance(n, ast.Call) and type_name(n.func) in ("setattr", "delattr"):
                    targets = [ast.Attribute(n.args[0], "?")] if n.args else []
                if any(changes(target) for target in targets):
                    where = path.relative_to(root).as_posix()
                    code = ast.unparse(n).splitlines()[0]
                    found.add((where, getattr(n, "lineno", 0), code))
    return [
        f"{where}:{line}: {code}"
        for where, line, code in sorted(found)
        if (where, code) not in ALLOWED_MUTATIONS
    ]


def test_no_error_is_changed_after_it_was_created() -> None:
    paths = sorted(SERVER.rglob("*.py"))
    assert error_mutations(paths, SERVER.parent) == []


def test_the_check_sees_an_error_changed_after_it_was_created(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text(
        """
from typing import Self

class Refused(ValueError):
    def __init__(self, message, headers=None):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.attempt = None

    def with_headers(self, headers) -> Self:
        return type(self)(self.message, {**self.headers, **headers})

    def later(self):
        self.attempt = 1

class Refusal(Refused):
    pass

def refused() -> Refused:
    return Refused("no")

async def handle(exchange, response):
    exchange.headers.update({"a": "b"})
    response.meta.trace_id = "t"
    built = Refusal("no")
    built.headers.update({"a": "b"})
    rebuilt = built.with_headers({})
    rebuilt.upstream = None
    made = refused()
    made.headers["x"] = "y"
    try:
        pass
    except Refused as error:
        error.trace_id, other = "t", 1
        setattr(error, "attempt", 2)
        raise error.with_headers({"a": "b"}) from None
    except OSError as failure:
        del failure.headers
        failure.headers.setdefault("a", "b")
        raise
"""
    )
    assert error_mutations([module], tmp_path) == [
        "bad.py:14: self.attempt = 1",
        "bad.py:26: built.headers.update({'a': 'b'})",
        "bad.py:28: rebuilt.upstream = None",
        "bad.py:30: made.headers['x'] = 'y'",
        "bad.py:34: error.trace_id, other = ('t', 1)",
        "bad.py:35: setattr(error, 'attempt', 2)",
        "bad.py:38: del failure.headers",
        "bad.py:39: failure.headers.setdefault('a', 'b')",
    ]


# --- one access line --------------------------------------------------------------------------

ACCESS_MESSAGE = "rpc"  # the `msg` of every access line (docs/operations.md)


def access_line_writers(paths: list[Path], root: Path) -> list[str]:
    """Where a logging call writes an access line (a call whose first argument is its
    message), as `file:line`."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value == ACCESS_MESSAGE
            ):
                found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return found


def test_the_access_line_of_either_face_is_written_in_one_place() -> None:
    found = access_line_writers(sorted(SERVER.rglob("*.py")), SERVER.parent)
    assert [where.partition(":")[0] for where in found] == [
        "aiservices_server/faces/envelope.py"
    ], found


def test_the_check_sees_a_second_access_line_writer(tmp_path: Path) -> None:
    module = tmp_path / "face.py"
    module.write_text('log.info("rpc", extra=fields)\nlog.info("other")\naccess.info("rpc")\n')
    assert access_line_writers([module], tmp_path) == ["face.py:1", "face.py:3"]


# --- the bench stays small ------------------------------------------------------------------

MAX_BENCH_LINES = 1200


def test_the_bench_stays_within_its_line_budget() -> None:
    """bench/ measures every scenario docs/performance.md lists in at most MAX_BENCH_LINES."""
    files = sorted((SERVER.parent.parent / "bench").glob("*.py"))
    assert files
    counts = {path.name: len(path.read_bytes().splitlines()) for path in files}
    assert sum(counts.values()) <= MAX_BENCH_LINES, counts
