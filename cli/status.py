"""``ngcal status``: the daemon's state from its state database (works while it runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", required=True, help="the daemon's state_dir")
    parser.add_argument("--last", type=int, default=10, help="how many recent verdicts to show")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ngcal.core.errors import ArtifactError
    from ngcal.daemon.store import DB_NAME, Store

    if not (Path(args.state_dir) / DB_NAME).is_file():
        raise ArtifactError(f"{args.state_dir}: no {DB_NAME} (not a daemon state dir?)")
    store = Store(args.state_dir)
    try:
        state = store.get_meta("policy_state") or {}
        cur = next(
            (
                t
                for t in state.get("history", [])
                if t.get("version") == state.get("current_version")
            ),
            None,
        )
        report = {
            "service": store.get_meta("service"),
            "threshold": None
            if cur is None
            else {"value": cur["value"], "version": cur["version"], "mode": cur.get("mode")},
            "outbox": store.outbox_stats(),
            "verdicts": store.verdict_counts(),
            "alarms": store.active_alarms(),
            "last_verdicts": [
                {
                    k: v[k]
                    for k in (
                        "decided_at",
                        "camera",
                        "path",
                        "verdict",
                        "score",
                        "reason",
                        "msg_id",
                    )
                }
                for v in store.last_verdicts(args.last)
            ],
        }
    finally:
        store.close()
    try:
        if args.json:
            print(json.dumps(report, indent=2, default=str))
        else:
            _print_text(args.state_dir, report)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left (`ngcal status --json | head`): not an error; silence the
        # interpreter's own flush of stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _print_text(state_dir: str, report: dict[str, Any]) -> None:
    """The report for a person: rounded numbers, times as ages."""
    from ngcal.cli.readable import num, seconds

    t = report["threshold"]
    ob = report["outbox"]
    print(f"state dir: {state_dir}")
    if t is not None:
        print(f"threshold: v{t['version']} {num(t['value'])} ({t['mode']})")
    oldest = ob.get("oldest_age_s")
    print(
        f"outbox: {ob['backlog']} unsent ({ob['refused']} refused by the broker)"
        + ("" if oldest is None else f", oldest {seconds(float(oldest))} old")
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["verdicts"].items())) or "none"
    print(f"verdicts: {counts}")
    print(f"alarms: {len(report['alarms'])}")
    for a in report["alarms"]:
        print(f"  {a['kind']}: {a['detail']} (x{a['count']})")
    if report["last_verdicts"]:
        print("last verdicts:")
    for v in report["last_verdicts"]:
        print(
            f"  {v['camera']}/{v['path']}: {v['verdict']} score {num(v['score'])}"
            + (f" ({v['reason']})" if v["reason"] else "")
        )
