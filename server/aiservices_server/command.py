"""The `aiservices-server` commands: with no command it runs the service;
`aiservices-server keys ...` manages API keys; `aiservices-server config` prints the effective
settings.

`--dev-keys` (used by `make run`) creates a local development key when no keys file is set.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiservices_server import __version__
from aiservices_server.app import AiServicesServer, StartupError, run_event_loop
from aiservices_server.config import (
    ENV_PREFIX,
    AuthMode,
    Settings,
    SettingsError,
    load_settings,
    unknown_settings,
)
from aiservices_server.devkeys import ensure_dev_keys
from aiservices_server.keys_cli import keys_main
from aiservices_server.logs import configure_logging
from aiservices_server.workers import Supervisor, WorkerLink

log = logging.getLogger("aiservices.server")


async def serve(settings: Settings, *, dev_keys: bool = False) -> int:
    """Serve until signalled: this process, or WORKERS processes under a supervisor."""
    link = WorkerLink.from_environ(os.environ)
    fields = None if link is None else {"worker": link.number}
    configure_logging(settings.log_level.value, fields=fields)
    for name, suggestion in unknown_settings(os.environ) if link is None else ():
        # The name only: a value set under a misspelled name may still be a secret.
        hint = {} if suggestion is None else {"did_you_mean": suggestion}
        log.warning("unknown setting ignored", extra={"setting": name, **hint})
    if dev_keys and settings.auth is AuthMode.KEYS and settings.api_keys_file is None:
        keys_file, key = ensure_dev_keys(Path(".dev"))
        settings = settings.model_copy(update={"api_keys_file": keys_file})
        print(
            f"development API key (kept in {keys_file.parent}/api-key): {key}\n"
            f"send it as metadata 'authorization: Bearer <key>'",
            file=sys.stderr,
        )
    if link is None and settings.worker_count > 1:
        return await Supervisor(settings, settings.worker_count).run()
    server = AiServicesServer(settings, reuse_port=link is not None)
    server.handle_signals()
    await server.start()
    if link is not None:
        link.serving()
        link.on_supervisor_gone(server.stop_soon)
    # Rarer collections: the 1,000-in-flight target (900 req/s) holds by 4 req/s at defaults.
    gc.set_threshold(5_000, 20, 20)
    await server.serve_until_signalled()
    return 0


USAGE = """usage: aiservices-server [--dev-keys]        serve (settings: AGENTA_AI_SERVICES_*)
       aiservices-server config                   print the effective settings, secrets redacted
       aiservices-server keys new|hash|list|revoke ...   manage API keys (keys --help)
       aiservices-server --version | --help

Settings and their defaults: docs/configuration.md."""


def print_config() -> int:
    """Every setting as it would be used, one `NAME=value` line each; secrets as asterisks."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"aiservices: {exc}", file=sys.stderr)
        return 2
    for name, value in settings.model_dump(mode="json").items():
        shown = "" if value is None else value
        print(f"{ENV_PREFIX}{name.upper()}={shown}")
    return 0


def main(argv: list[str], *, sighup: Any = signal.SIG_DFL) -> int:
    """Run the command `argv`; `sighup` is what SIGHUP did before the entry point ignored it,
    given back to every command but the server (under `nohup`, still ignored)."""
    serving = argv in ([], ["--dev-keys"])
    if not serving:
        signal.signal(signal.SIGHUP, signal.SIG_DFL if sighup is None else sighup)
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    if argv in (["--help"], ["-h"]):
        print(USAGE)
        return 0
    if argv == ["--version"]:
        print(f"aiservices-server {__version__}")
        return 0
    if argv == ["config"]:
        return print_config()
    dev_keys = argv[:1] == ["--dev-keys"]
    if argv[dev_keys:]:
        print(
            "usage: aiservices-server [--dev-keys] | config | keys ... | --version | --help; "
            f"unknown argument {argv[dev_keys]!r}",
            file=sys.stderr,
        )
        return 2
    try:
        settings = load_settings()
        return run_event_loop(serve(settings, dev_keys=dev_keys), settings.event_loop)
    except (SettingsError, StartupError) as exc:
        error = exc
    finally:
        logging.shutdown()  # every log line queued so far is written before the process exits
    print(f"aiservices: {error}", file=sys.stderr)
    return 2
