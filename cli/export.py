"""``ngcal export``: a model directory -> a verified ONNX bundle (and this GPU's TensorRT engine).

Examples::

    ngcal export --model runs/tile/model --out runs/tile/bundle
    ngcal export --model runs/tile/model --out bundle --format tensorrt --precision fp16 \\
        --thresholds runs/tile/thresholds.json
    ngcal export --model runs/tile/model --out runs/tile/bundle_fast --bank-fraction 0.25

``--bank-fraction F`` keeps the first ceil(F * M) memory-bank rows, which is the greedy
k-center coreset of ``--coreset-ratio`` ratio * F (the bank is stored in selection order);
such a bundle carries no score sets and takes no ``--thresholds`` (they belong to the full
bank): see ``ngcal.export.bundle_writer``.

``--format tensorrt`` builds the engine for the GPU of the machine running the command
(engines do not move between GPUs or TensorRT versions; devices build their own on first
start). Without TensorRT or a GPU it stops before doing any work and says which is missing.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ngcal export``."""
    parser.add_argument("--model", required=True, help="model directory written by `ngcal fit`")
    parser.add_argument("--out", required=True, help="bundle directory to write (atomically)")
    parser.add_argument(
        "--format",
        action="append",
        choices=["onnx", "tensorrt"],
        dest="formats",
        help="onnx (always written) and/or tensorrt (engine for this GPU); repeatable",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="engine precision recorded in the bundle (the ONNX itself stays fp32)",
    )
    parser.add_argument("--thresholds", help="thresholds.json to ship with the bundle")
    parser.add_argument(
        "--exporter",
        choices=["legacy", "dynamo"],
        default="legacy",
        help="torch.onnx exporter: legacy (opset 17, default) or dynamo (opset 18)",
    )
    parser.add_argument(
        "--parity-data",
        help="folder of images to add to the parity check (up to 4 are used)",
    )
    parser.add_argument(
        "--bank-fraction",
        type=float,
        default=1.0,
        help="keep this fraction of the memory bank (its greedy k-center prefix; default 1.0)",
    )
    parser.add_argument(
        "--max-batch", type=int, default=8, help="largest batch of the TensorRT profile"
    )


def run(args: argparse.Namespace) -> int:
    """Export, print a one-line JSON summary; errors are NgcalErrors (exit 2)."""
    from ngcal.core.dataset import list_images
    from ngcal.export.bundle_writer import export_bundle

    images = list_images(args.parity_data)[:4] if args.parity_data else []
    formats = args.formats or ["onnx"]
    report = export_bundle(
        args.model,
        args.out,
        formats=formats,
        precision=args.precision,
        thresholds=args.thresholds,
        exporter=args.exporter,
        parity_images=images,
        max_batch=args.max_batch,
        bank_fraction=args.bank_fraction,
    )
    summary = {
        "bundle": str(report.bundle),
        "onnx_mb": round(report.onnx_bytes / 2**20, 2),
        "opset": report.opset,
        "exporter": report.exporter,
        "parity_max_abs_diff": report.parity.max_abs_diff,
        "parity_tolerance": report.parity.tolerance,
        "bank_rows": report.bank_rows,
        "seconds": round(report.seconds, 1),
    }
    if report.engine is not None and report.engine_parity is not None:
        summary["engine"] = str(report.engine)
        summary["engine_parity_max_abs_diff"] = report.engine_parity.max_abs_diff
    print(json.dumps(summary))
    return 0
