"""Run the stand-in upstream in the foreground: ``python -m server.standin [--port 8080]``.

Used by ``make demo`` and the benchmark, which start it as a separate process so its CPU does not
count against the client being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from server.standin.app import Refine, Scenario, Slow, StandinUpstream, check_loopback


def _host(value: str) -> str:
    try:
        return check_loopback(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server.standin", description="Stand-in Agenta completion runner."
    )
    parser.add_argument("--host", type=_host, default="127.0.0.1", help="127.0.0.1 or ::1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: ApiKey KEY'")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each reply")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    scenario: Scenario = Slow(args.delay, Refine()) if args.delay > 0 else Refine()
    # No request log: a long benchmark run would otherwise keep every request in memory.
    upstream = StandinUpstream(
        api_key=args.api_key, host=args.host, port=args.port, default=scenario, record=False
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
