"""``ngcal`` entry point: a table of sub-commands, each in its own module.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps
its module top level light (stdlib only): heavy parts (torch, onnxruntime, paho) are
imported inside ``run``, so ``ngcal serve`` never loads torch and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ngcal.core.errors import NgcalError

#: sub-command -> (module under ngcal.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fit", "fit PatchCore on good images and write a model directory"),
    "evaluate": ("evaluate", "score a labelled test split: AUROC, F1-max, threshold quality"),
    "generate": ("generate", "synthesise NG evidence (glass: feature and image anomalies)"),
    "calibrate": ("calibrate", "turn score sets into thresholds.json and an HTML report"),
    "export": ("export", "export a model directory to a verified ONNX/TensorRT bundle"),
    "serve": ("serve", "run the edge daemon: watch folders, score, publish over MQTT"),
    "status": ("status", "show the daemon's state from its state database"),
    "demo": ("demo", "run fit, generate, calibrate, export and evaluate on procedural demo data"),
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; imports every command module (each is import-light)."""
    parser = argparse.ArgumentParser(
        prog="ngcal",
        description="Calibrated PatchCore inspection: fit, generate NG, calibrate, export, serve.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"ngcal.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"ngcal.cli.{module}":
                raise
            continue  # command not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ngcal``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._module.run(args) or 0)
    except NgcalError as e:
        print(f"ngcal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
