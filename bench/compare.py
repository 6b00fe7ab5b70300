"""A/B: the real server in several variants against the bare baseline, runs interleaved.

    .venv/bin/python -m bench.compare call 3 prod: nolog:LOG_LEVEL=WARNING
    .venv/bin/python -m bench.compare status 3 prod: 'neither:LOG_LEVEL=WARNING;AUTH=disabled'
    .venv/bin/python -m bench.compare call 5 before@/tmp/old-checkout after
    .venv/bin/python -m bench.compare status 3 --floor prod:

A variant is ``NAME[@CHECKOUT][:SETTING=VALUE;...]``: settings are AGENTA_AI_SERVICES_ names
(prefix optional); a checkout directory runs that tree's ``server`` package instead of this one,
to compare code changes. Each round runs every variant once (concurrency 64, 2 s after 0.5 s of
warm-up, same pinning as ``python -m bench``); prints the median server CPU µs per call.
``--floor`` adds the bare baseline behind the floor interceptor (``bench/floor.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field

from bench.harness import Server, env_setting, harness
from bench.procs import Pinning


@dataclass
class Variant:
    name: str
    checkout: str | None = None
    settings: dict[str, str] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    head, _, settings_text = text.partition(":")
    name, _, checkout = head.partition("@")
    settings = dict(map(env_setting, filter(None, settings_text.split(";"))))
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r} has no name")
    return Variant(name, checkout or None, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rpc", choices=("status", "call"))
    parser.add_argument("rounds", type=int)
    parser.add_argument("variants", nargs="+", type=parse_variant)
    parser.add_argument("--floor", action="store_true", help="add the floor baseline")
    args = parser.parse_args(argv)
    with harness(Pinning.detect(), {}) as h:
        assert h.instant is not None
        servers: dict[str, Server] = {}
        saved = os.environ.get("PYTHONPATH")
        for variant in args.variants:
            h.server_env = variant.settings
            if variant.checkout is not None:
                os.environ["PYTHONPATH"] = variant.checkout
            try:
                servers[variant.name] = h.real_server(h.instant[0])
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
        h.capture_status(next(iter(servers.values())))
        servers["bare"] = h.baseline(h.instant[0])
        if args.floor:
            servers["floor"] = h.baseline(h.instant[0], floor=True)
        costs: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, server in servers.items():
                run = h.load(
                    server,
                    h.instant[1],
                    rpc=args.rpc,
                    concurrency=64,
                    channels=4,
                    warmup_s=0.5,
                    duration_s=2.0,
                    timeout_s=10.0,
                )
                costs[name].append(run.server_cpu_us_per_call or 0.0)
                print(f"{name}: {costs[name][-1]:,.0f} µs/call", file=sys.stderr, flush=True)
    for name, values in costs.items():
        runs = " ".join(f"{value:,.0f}" for value in values)
        print(f"{name:12s} median {statistics.median(values):7,.0f} µs/call   runs {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
