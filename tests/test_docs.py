"""What README.md and docs/ show a command printing is what it prints, against `make demo`.

Every ```console block is a terminal session: a line starting with `$ ` is a command (a trailing
backslash continues it, and a here-document `<<'EOF'` runs to its `EOF` line), the lines after
it are what it prints, stdout and stderr together. The
test starts the demo in a scratch directory laid out like a checkout (`.venv` and `.tools`
linked, `.dev/` made by the demo), in the shell the README's "Calling it" section sets up: `$KEY`
and `AISERVICES_API_KEY` hold the demo's key, `.tools/node_modules/.bin` is on the PATH (and
`AISERVICES_TARGET` is the demo's address, which the docs' default stands for). A page is
read as a reader follows it, in one terminal: its blocks run in order in one bash, so what one
block exports the next one has, and every command's output is compared with the page's.

In a shown output, `...` stands for any text within a line, and a line of only `...` for any
number of lines: for what changes from run to run (ids, keys, times) or is too long to show.
The demo's addresses in the docs (127.0.0.1:50051 for gRPC, 127.0.0.1:50052 for MCP) become
the free ports it got, and back in what the commands print.
"""

from __future__ import annotations

import difflib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.demo import RunningDemo, demo_environment
from tests.support.processes import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
DOC_GRPC, DOC_MCP = "127.0.0.1:50051", "127.0.0.1:50052"
ANY = "..."
MARK = "@@ aiservices doc test: command done @@"


@dataclass(frozen=True)
class Command:
    text: str
    shown: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    where: str
    commands: tuple[Command, ...]


def console_blocks(path: Path) -> list[Block]:
    """The ```console blocks of one Markdown file, parsed into commands and their output."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    number = 0
    while number < len(lines):
        if lines[number].strip() != "```console":
            number += 1
            continue
        start, number = number + 1, number + 1
        commands: list[Command] = []
        text: list[str] | None = None
        shown: list[str] = []
        here_document = False
        while lines[number].strip() != "```":
            line = lines[number]
            continued = text is not None and not shown and text[-1].endswith("\\")
            if here_document:
                assert text is not None
                text.append(line)
                here_document = line != "EOF"
            elif continued:
                assert text is not None
                text.append(line)
            elif line.startswith("$ "):
                if text is not None:
                    commands.append(Command("\n".join(text), tuple(shown)))
                text, shown = [line.removeprefix("$ ")], []
                here_document = line.endswith("<<'EOF'")
            else:
                assert text is not None, f"{path.name}:{start}: output before any command"
                shown.append(line)
            number += 1
        assert text is not None, f"{path.name}:{start}: a console block without a command"
        commands.append(Command("\n".join(text), tuple(shown)))
        blocks.append(Block(f"{path.name}:{start}", tuple(commands)))
        number += 1
    return blocks


def line_matches(shown: str, printed: str) -> bool:
    """`printed` is `shown`, where each `...` in `shown` stands for any text."""
    pieces = shown.split(ANY)
    if len(pieces) == 1:
        return shown == printed
    first, *middle, last = pieces
    if not (printed.startswith(first) and printed.endswith(last)):
        return False
    at, end = len(first), len(printed) - len(last)
    for piece in middle:
        found = printed.find(piece, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return at <= end


def output_matches(shown: tuple[str, ...], printed: list[str]) -> bool:
    """Line by line, a shown line of only `...` standing for any number of printed lines."""
    # matched[i][j]: the first i shown lines match the first j printed lines.
    matched = [[False] * (len(printed) + 1) for _ in range(len(shown) + 1)]
    matched[0][0] = True
    for i, line in enumerate(shown, start=1):
        for j in range(len(printed) + 1):
            if line == ANY:
                matched[i][j] = matched[i - 1][j] or (j > 0 and matched[i][j - 1])
            else:
                matched[i][j] = (
                    j > 0 and matched[i - 1][j - 1] and line_matches(line, printed[j - 1])
                )
    return matched[len(shown)][len(printed)]


def test_the_matching_reads_the_ellipsis_as_the_docs_mean_it() -> None:
    assert output_matches(("a ... c", "..."), ["a b c", "d", "e"])
    assert output_matches(("x", "...", "z"), ["x", "z"])
    assert not output_matches(("a ... c",), ["a b d"])
    assert not output_matches(("a",), ["a", "b"])
    assert line_matches('"id": "..."', '"id": "5f40"') and not line_matches("ab...ba", "aba")


@dataclass(frozen=True)
class Demo:
    checkout: Path
    env: dict[str, str]
    grpc: str
    mcp: str

    def to_doc(self, text: str) -> str:
        return text.replace(self.grpc, DOC_GRPC).replace(self.mcp, DOC_MCP)

    def from_doc(self, text: str) -> str:
        return text.replace(DOC_GRPC, self.grpc).replace(DOC_MCP, self.mcp)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`make demo` in a scratch checkout, on free ports, and the shell the README sets up."""
    checkout = tmp_path_factory.mktemp("checkout")
    for name in (".venv", ".tools"):
        (checkout / name).symlink_to(REPO_ROOT / name)
    home = tmp_path_factory.mktemp("home")
    running = RunningDemo.start(
        checkout,
        demo_environment(home, grpc_address="127.0.0.1:0", mcp_address="127.0.0.1:0"),
    )
    try:
        grpc, mcp = running.addresses()
        assert mcp is not None
        key = (checkout / ".dev" / "api-key").read_text().strip()
        tools = checkout / ".tools" / "node_modules" / ".bin"
        env = {
            "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "MCP_INSPECTOR_SECRET_STORE": "memory",
            "KEY": key,
            "AISERVICES_API_KEY": key,
            # The command line's default target is the docs' demo address: here, the demo's.
            "AISERVICES_TARGET": grpc,
            "LC_ALL": "C.UTF-8",
        }
        yield Demo(checkout, env, grpc, mcp)
    finally:
        assert running.stop() == 0


PAGES = {path.name: blocks for path in DOCUMENTS if (blocks := console_blocks(path))}


def test_the_docs_have_console_blocks_to_check() -> None:
    assert {"README.md", "cli.md", "mcp.md", "contract.md"} <= set(PAGES), sorted(PAGES)


@pytest.mark.parametrize("page", list(PAGES))
def test_every_console_block_of_a_page_prints_what_it_shows(demo: Demo, page: str) -> None:
    commands = [(block.where, command) for block in PAGES[page] for command in block.commands]
    script = ["exec 2>&1"]
    for _, command in commands:
        # The mark after each command keeps its exit status for the next one (`echo $?`).
        script += [demo.from_doc(command.text), f"s=$?; printf '\\n%s\\n' '{MARK}'; (exit $s)"]
    ran = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=demo.checkout,
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    outputs = demo.to_doc(ran.stdout).split(f"\n{MARK}\n")
    assert len(outputs) == len(commands) + 1, ran.stdout
    failures = []
    for (where, command), output in zip(commands, outputs, strict=False):
        printed = output.splitlines()
        while printed and not printed[-1].strip():
            printed.pop()
        shown = list(command.shown)
        while shown and not shown[-1].strip():
            shown.pop()
        if not output_matches(tuple(shown), printed):
            diff = "\n".join(difflib.unified_diff(shown, printed, "shown", "printed", lineterm=""))
            failures.append(f"{where}: `{command.text}` printed otherwise:\n{diff}")
    assert not failures, "\n\n".join(failures)
