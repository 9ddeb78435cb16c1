"""``ngcal serve``: run the edge daemon, or check its config file."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="daemon YAML config (see configs/)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check everything serve needs (config, credentials, folders, TLS files, bundle, "
        "runtime, state dir); print every problem, exit 2 on any",
    )


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ngcal.daemon.config import ConfigInvalid, load_config

    try:
        cfg = load_config(args.config)
    except ConfigInvalid as e:
        for issue in e.issues:
            print(str(issue), file=sys.stderr)
        print(f"{args.config}: {len(e.issues)} error(s)", file=sys.stderr)
        return 2
    if args.check_config:
        from ngcal.daemon.link import security_warnings

        for w in security_warnings(cfg.mqtt):  # warnings, not problems: exit status unchanged
            print(f"{args.config}: {w}", file=sys.stderr)
        from ngcal.daemon.preflight import all_problems

        problems = all_problems(cfg)
        for p in problems:
            print(f"{args.config}: {p}", file=sys.stderr)
        if problems:
            print(f"{args.config}: {len(problems)} problem(s)", file=sys.stderr)
            return 2
        print(f"{args.config}: OK ({len(cfg.cameras)} camera(s), device {cfg.device_id})")
        return 0

    import logging

    from ngcal.daemon.service import Daemon

    if getattr(args, "verbose", 0) == 0:  # a service logs its routine events (journald)
        logging.getLogger().setLevel(logging.INFO)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1`: thread stacks
    daemon = Daemon(cfg)
    try:
        daemon.start()
    except BaseException:
        stop.set()
        raise
    try:
        daemon.run_until(stop)
    finally:
        daemon.shutdown()
    return 0
