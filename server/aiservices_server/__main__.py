"""The entry point of `aiservices-server` and `python -m aiservices_server`; the commands
themselves are in `aiservices_server.command`.

A keys-file reload is asked for with SIGHUP, whose default action ends the process. Loading
the server takes a moment, and a SIGHUP sent meanwhile (by a deploy tool that reloads as soon
as it has started the process) must not kill it: SIGHUP is ignored here, before anything is
imported, until the server installs its reload handler.
"""

import signal
import sys


def console() -> int:
    """The `aiservices-server` console script."""
    inherited = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from aiservices_server.command import main  # noqa: PLC0415

    return main(sys.argv[1:], sighup=inherited)


if __name__ == "__main__":
    sys.exit(console())
