"""`aiservices`: the ToolService from a terminal, for people.

Every outcome maps to one exit code and, on failure, one line on stderr, so the command works
both by hand and in scripts. The API key is read from a flag, a file or the environment and is
only ever sent to the server, never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from aiservices import __version__
from aiservices._cli.elapsed import Elapsed
from aiservices._cli.inputs import (
    UsageError,
    call_arguments,
    parse_object,
    read_text,
    test_cases_file,
    write_atomically,
)
from aiservices._cli.output import (
    EXIT_UNREACHABLE,
    PROG,
    error_json,
    for_terminal,
    messages_diff,
    refusal_json,
    refusal_line,
    tool_error_json,
    tool_error_line,
    tools_table,
)
from aiservices._convert import as_json
from aiservices.client import Status, ToolClient, ToolResult, ToolServiceError
from aiservices.refine import REFINE_PROMPT, refine_arguments, refined_prompt
from aiservices.retry import NO_RETRY
from aiservices.settings import (
    DEFAULT_TARGET,
    ENV_API_KEY,
    ENV_CA_FILE,
    ENV_CERT_FILE,
    ENV_KEY_FILE,
    ENV_TARGET,
    ENV_TLS,
    Connection,
    Flags,
    SettingsError,
    read_connection,
)

T = TypeVar("T")

REFINE_TOOL = REFINE_PROMPT
# The largest ListTools page `tools` takes, refused by gRPC as it arrives, before it is parsed: a
# page is at most 100 tools of a few KB, and tiny tools parse into some 50 times their bytes
# (16 MiB of them, the client's usual limit, into 800 MB). The listing's own bounds are the
# client's: MAX_LISTING_BYTES and MAX_LISTING_TOOLS.
MAX_TOOLS_PAGE_BYTES = 1024 * 1024

EXIT_OK = 0
EXIT_TOOL_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_BUG = 70
EXIT_INTERRUPTED = 130

EPILOG = f"""\
environment (read as ToolClient.from_env reads it; a flag wins):
  {ENV_TARGET}     the server address (default {DEFAULT_TARGET})
  {ENV_API_KEY}    the API key
  {ENV_TLS}        1 (true, yes, on) for TLS with the system's CAs
  {ENV_CA_FILE}    TLS: trust this CA file
  {ENV_CERT_FILE}  mTLS: the client certificate file ({ENV_KEY_FILE}: its key)

exit codes:
  0    ok
  1    the tool ran but failed (a tool error; --json still prints the result)
  2    usage error: bad flags, bad --args JSON, a file that cannot be read
  3    the service refused the call (a non-OK status such as UNAUTHENTICATED,
       PERMISSION_DENIED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, INTERNAL)
  4    the service could not be reached or did not answer in time
       (UNAVAILABLE, DEADLINE_EXCEEDED): worth retrying
  70   a bug in aiservices itself
  130  interrupted (Ctrl-C)

Reference: docs/cli.md in the aiservices repository."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line instead of a usage block (printed by `run`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------
# Arguments


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < seconds < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return seconds


def _add_connection_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The same flags before or after the command; after it, unset ones keep the top's value."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=default,
        help=f"host:port (env {ENV_TARGET}; default {DEFAULT_TARGET})",
    )
    keys = group.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key",
        metavar="KEY",
        default=default,
        help=f"API key (prefer {ENV_API_KEY} or --api-key-file)",
    )
    keys.add_argument(
        "--api-key-file", metavar="PATH", default=default, help="read the API key from this file"
    )
    group.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        default=default,
        help="seconds to wait for each call (default: the client's)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default,
        help=f"use TLS with the system's CAs (env {ENV_TLS})",
    )
    group.add_argument(
        "--ca-file",
        metavar="PEM",
        default=default,
        help=f"TLS: trust this CA file; implies --tls (env {ENV_CA_FILE})",
    )
    group.add_argument(
        "--cert-file",
        metavar="PEM",
        default=default,
        help=f"mTLS: the client certificate file (env {ENV_CERT_FILE})",
    )
    group.add_argument(
        "--key-file",
        metavar="PEM",
        default=default,
        help=f"mTLS: the client certificate's key file (env {ENV_KEY_FILE})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="print machine-readable JSON"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Call the aiservices ToolService from a terminal.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_connection_flags(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"examples:\n{examples}\n\n{EPILOG}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_connection_flags(sub, top=False)
        return sub

    command(
        "status",
        "whether the feature is enabled, which upstream, and the tools this key may call",
        f"  {PROG} status\n  {ENV_TARGET}=svc.internal:50051 {PROG} status --ca-file ca.crt",
    )
    command(
        "tools",
        "list the tools this key may call (name, title, hints)",
        f"  {PROG} tools\n  {PROG} tools --json",
    )
    call = command(
        "call",
        "call a tool with JSON arguments and print its result",
        f"  {PROG} call {REFINE_TOOL} --args @args.json\n"
        f'  echo \'{{"prompt_template_json": "..."}}\' | {PROG} call {REFINE_TOOL} --args @-',
    )
    call.add_argument("name", help="the tool's name")
    call.add_argument(
        "--args",
        metavar="JSON",
        default="{}",
        help="a JSON object, @FILE to read it from a file, or @- for stdin (default {})",
    )
    refine = command(
        "refine",
        "refine a prompt template; prints a diff of its messages and the summary",
        f"  {PROG} refine prompt.json --guidelines 'be concise'\n"
        f"  {PROG} refine prompt.json -o prompt.refined.json\n"
        f"  {PROG} refine prompt.json --test-cases cases.json\n"
        f"  cat prompt.json | {PROG} refine - --json",
    )
    refine.add_argument("template", metavar="TEMPLATE.json", help="the template file, or - (stdin)")
    refine.add_argument(
        "--guidelines", metavar="TEXT", help="what to improve, e.g. 'make it shorter'"
    )
    refine.add_argument("--context", metavar="TEXT", help="background on how the prompt is used")
    refine.add_argument(
        "--test-cases",
        metavar="FILE",
        help="a JSON list of {inputs, expected_output, actual_output?, note?}: cases the refined "
        "template should get right (- for stdin)",
    )
    refine.add_argument(
        "-o", "--output", metavar="FILE", help="write the refined template (other keys kept)"
    )
    return parser


# --------------------------------------------------------------------------------------------
# Connection


def _connection(args: argparse.Namespace) -> Connection:
    """The flags over the environment, read by the one reader `ToolClient.from_env` uses."""
    flags = Flags(
        target=args.target,
        api_key=args.api_key,
        api_key_file=args.api_key_file,
        tls=bool(args.tls),
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
    try:
        return read_connection(os.environ, flags)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def _connect(args: argparse.Namespace, connection: Connection) -> ToolClient:
    options: list[tuple[str, int]] = []
    if args.command == "tools":
        options.append(("grpc.max_receive_message_length", MAX_TOOLS_PAGE_BYTES))
    try:
        # Each call is sent once, reads included: a person sees at once that nothing answers
        # (exit 4), and a script decides itself whether to try again.
        return ToolClient(
            connection.target,
            api_key=connection.api_key,
            credentials=connection.credentials,
            timeout=args.timeout,
            options=options,
            retry=NO_RETRY,
        )
    except ValueError as exc:  # settings the client refuses; its messages never hold the key
        raise UsageError(str(exc)) from None


def _waiting(label: str, run: Callable[[], T]) -> T:
    with Elapsed(sys.stderr, label):
        return run()


def _exit_code(err: ToolServiceError) -> int:
    unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return EXIT_UNREACHABLE if err.code in unreachable else EXIT_REFUSED


def _show(text: str) -> None:
    """One line (or block) on stdout, with nothing in it that could drive the terminal."""
    print(for_terminal(text))


def _print_json(value: Any) -> None:
    # Field names as aiservices.as_json spells them (lowerCamelCase, as grpcurl, buf and MCP
    # do). Keys sorted: a Struct's keys come in no set order, and the same result should print
    # the same every time.
    _show(json.dumps(as_json(value), indent=2, ensure_ascii=False, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Commands


def _status(client: ToolClient, args: argparse.Namespace) -> int:
    status: Status = _waiting("status", client.status)
    if args.json:
        _print_json(status)
        return EXIT_OK
    _show(f"enabled   {'yes' if status.enabled else 'no'}")
    _show(f"upstream  {status.upstream or '-'}")
    _show(f"tools     {', '.join(t.name for t in status.tools) or '-'}")
    return EXIT_OK


def _tools(client: ToolClient, args: argparse.Namespace) -> int:
    tools = _waiting("tools", client.list_tools)
    if args.json:
        _print_json(tools)
    elif tools:
        _show(tools_table(tools))
    else:
        _show("no tools this key may call")
    return EXIT_OK


def _finish(result: ToolResult, args: argparse.Namespace, show: Callable[[], None]) -> int:
    if args.json:
        _print_json(result)
    elif not result.is_error:
        show()
    if result.is_error:
        failed = tool_error_json(result, EXIT_TOOL_ERROR) if args.json else tool_error_line(result)
        print(failed, file=sys.stderr)
        return EXIT_TOOL_ERROR
    return EXIT_OK


def _call(client: ToolClient, args: argparse.Namespace) -> int:
    arguments = call_arguments(str(args.args))
    result = _waiting(args.name, lambda: client.call_tool(args.name, arguments))

    def show() -> None:
        if result.text:
            _show(result.text)
        if result.structured_content is not None:
            _print_json(result.structured_content)

    return _finish(result, args, show)


def _refine(client: ToolClient, args: argparse.Namespace) -> int:
    source = str(args.template)
    text = read_text(source, "template")
    template = parse_object(text, "stdin" if source == "-" else source)
    test_cases = None
    if args.test_cases is not None:
        if args.test_cases == "-" == source:
            raise UsageError("the template and --test-cases cannot both be read from stdin")
        test_cases = test_cases_file(args.test_cases)
    # The file's text is sent exactly as it is written, as refine_prompt sends a str template.
    arguments = refine_arguments(
        text, guidelines=args.guidelines, context=args.context, test_cases=test_cases
    )
    result = _waiting("refining", lambda: client.call_tool(REFINE_TOOL, arguments))
    refined = (result.structured_content or {}).get("messages")
    if not result.is_error and args.output is not None:
        output = Path(args.output)
        written = refined_prompt(result).apply_to(template)  # checked: Internal if malformed
        try:
            write_atomically(output, json.dumps(written, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None

    def show() -> None:
        before = template.get("messages")
        for line in messages_diff(before if isinstance(before, list) else [], refined or []):
            _show(line)
        summary = (result.structured_content or {}).get("summary") or result.text
        _show(f"\nsummary: {summary}")

    return _finish(result, args, show)


COMMANDS: dict[str, Callable[[ToolClient, argparse.Namespace], int]] = {
    "status": _status,
    "tools": _tools,
    "call": _call,
    "refine": _refine,
}


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and return its exit code; errors are printed here, one
    line each, or one JSON object each with `--json`."""
    wants_json = _wants_json(argv)
    try:
        args = build_parser().parse_args(argv)
        connection = _connection(args)
        with _connect(args, connection) as client:
            try:
                return COMMANDS[str(args.command)](client, args)
            except ToolServiceError as err:
                code = _exit_code(err)
                target, tls = connection.target, connection.tls
                shown = (
                    refusal_json(err, target, tls=tls, exit_code=code)
                    if wants_json
                    else refusal_line(err, target, tls=tls)
                )
                print(shown, file=sys.stderr)
                return code
    except UsageError as exc:
        return _failed(wants_json, EXIT_USAGE, "usage", str(exc))


def _wants_json(argv: Sequence[str] | None) -> bool:
    """Whether `--json` was asked for, known before (and whatever) argparse makes of the rest,
    so that even a usage error comes as JSON."""
    return "--json" in (sys.argv[1:] if argv is None else argv)


def _failed(wants_json: bool, exit_code: int, kind: str, message: str) -> int:
    """A failure of the command itself (not a call's): one line or one JSON object."""
    shown = error_json({"kind": kind, "message": message, "exitCode": exit_code})
    print(shown if wants_json else f"{PROG}: {message}", file=sys.stderr)
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: `run`, plus Ctrl-C and anything unforeseen, each as one line."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        return _failed(_wants_json(argv), EXIT_INTERRUPTED, "interrupted", "interrupted")
    except BrokenPipeError:
        # The reader went away (`aiservices tools | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        message = f"unexpected error ({type(exc).__name__}); please report it"
        return _failed(_wants_json(argv), EXIT_BUG, "bug", message)


if __name__ == "__main__":
    sys.exit(main())
