"""The `aiservices` console script's entry point, outside the `aiservices` package.

It runs before anything imports grpc, which it must: gRPC's C core reads GRPC_VERBOSITY once, as
it loads, and would otherwise print its own log lines (a failed TLS handshake, say) beside the
command's one-line errors. Importing the package takes a moment, so Ctrl-C can land there too.
"""

from __future__ import annotations

import os
import sys

EXIT_INTERRUPTED = 130


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        from aiservices.cli import main as run  # noqa: PLC0415 (after GRPC_VERBOSITY is set)
    except KeyboardInterrupt:
        print("aiservices: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run()
