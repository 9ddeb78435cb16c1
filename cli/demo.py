"""``ngcal demo``: the whole offline job on a procedural demo category, end to end.

Steps, each the same command a user would type: make demo data -> ``fit`` ->
``generate glass`` -> ``calibrate`` (with the HTML report) -> ``export`` (ONNX bundle with
the thresholds) -> ``evaluate`` the bundle on the labelled demo test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal demo``."""
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--image-size", type=int, default=256, help="model input side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data and generators")
    p.add_argument("--train-images", type=int, default=80, help="good images to fit on")


def run(args: argparse.Namespace) -> int:
    """Run every step; stop at the first failing one with its exit code."""
    from ngcal.cli.main import main
    from ngcal.generation.demo_data import make_demo_category

    out: Path = args.out
    data = out / "data"
    model, glass, bundle = out / "model", out / "glass", out / "bundle"
    thresholds, report = out / "thresholds.json", out / "report.html"
    if not (data / "train" / "good").is_dir():
        print(f"[demo] writing the procedural demo category to {data}", file=sys.stderr)
        make_demo_category(data, n_train=args.train_images, seed=args.seed)
    steps = [
        [
            "fit",
            "--data",
            str(data),
            "--out",
            str(model),
            "--image-size",
            str(args.image_size),
            "--seed",
            str(args.seed),
        ],
        [
            "generate",
            "glass",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(glass),
            "--seed",
            str(args.seed),
        ],
        [
            "calibrate",
            "--model",
            str(model),
            "--scores",
            str(glass),
            "--out",
            str(thresholds),
            "--report",
            str(report),
        ],
        ["export", "--model", str(model), "--out", str(bundle), "--thresholds", str(thresholds)],
        ["evaluate", "--model", str(bundle), "--data", str(data), "--json"],
    ]
    for argv in steps:
        print(f"[demo] ngcal {' '.join(argv)}", file=sys.stderr)
        rc = main(argv)
        if rc:
            print(f"[demo] step `{argv[0]}` failed with exit code {rc}", file=sys.stderr)
            return rc
    print(
        f"[demo] done: bundle {bundle}, thresholds {thresholds}, report {report}", file=sys.stderr
    )
    return 0
