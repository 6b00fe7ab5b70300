"""`python -m server` runs the service; `python -m server keys ...` manages API keys."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from server.app import AiServicesServer, BindError
from server.auth.cli import keys_main
from server.config import SettingsError, load_settings
from server.logs import configure_logging

log = logging.getLogger("aiservices.server")


async def serve() -> int:
    settings = load_settings()
    configure_logging(settings.log_level.value)
    server = AiServicesServer(settings)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("draining", extra={"grace_seconds": settings.shutdown_grace})
    await server.stop()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    if argv and argv[0] not in ("serve",):
        print(
            f"usage: python -m server [serve | keys ...]; unknown command {argv[0]!r}",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(serve())
    except (SettingsError, BindError) as exc:
        print(f"aiservices: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
