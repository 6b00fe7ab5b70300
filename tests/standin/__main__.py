"""Run the stand-in upstream in the foreground: ``python -m tests.standin [--port 8080]``.

It serves the Agenta completion runner and OpenAI-compatible chat completions on one port.

Used by ``make demo`` and the benchmark, which start it as a separate process so its CPU does not
count against the client being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from tests.standin.app import RUN_PATH, Refine, Scenario, Slow, StandinUpstream, check_loopback
from tests.standin.openai import CHAT_PATH


def _host(value: str) -> str:
    try:
        return check_loopback(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.standin",
        description=(
            "Stand-in upstream on loopback: the Agenta completion runner (POST "
            f"{RUN_PATH}) and OpenAI-compatible chat completions (POST {CHAT_PATH}, also "
            "without /v1). Both refine deterministically."
        ),
    )
    parser.add_argument("--host", type=_host, default="127.0.0.1", help="127.0.0.1 or ::1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: ApiKey KEY' (Agenta endpoint)"
    )
    parser.add_argument(
        "--openai-api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (chat completions; open when not given)",
    )
    parser.add_argument(
        "--reject-json-schema",
        action="store_true",
        help="answer json_schema response formats with 400, as servers without them do",
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    scenario: Scenario = Slow(args.delay, Refine()) if args.delay > 0 else Refine()
    # No request log: a long benchmark run would otherwise keep every request in memory.
    upstream = StandinUpstream(
        api_key=args.api_key,
        openai_api_key=args.openai_api_key,
        reject_json_schema=args.reject_json_schema,
        host=args.host,
        port=args.port,
        default=scenario,
        record=False,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with upstream:
        print(f"stand-in upstream listening on {upstream.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM."""
    args = _parse(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"stand-in upstream: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
