"""``ngcal evaluate``: score a labelled test split with a model dir or an exported bundle.

Prints image AUROC, pixel AUROC (where masks exist), AUPRO (``--aupro``), the oracle
F1-max and its threshold, and, when the model or bundle has ``thresholds.json``, how that
threshold does (FPR, miss rate, F1 gap, cost regret). ``--csv`` writes per-image scores.
A bundle is scored through onnxruntime (``ngcal.core.runtime``), without torch.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal evaluate``."""
    p.add_argument("--model", required=True, type=Path, help="model directory or exported bundle")
    p.add_argument(
        "--data", required=True, type=Path, help="category dir with test/ (MVTec layout)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--csv", type=Path, default=None, help="write item_id,path,label,defect,score")
    p.add_argument(
        "--pixel-size", type=int, default=64, help="map side for pixel metrics (default 64)"
    )
    p.add_argument("--aupro", action="store_true", help="also compute AUPRO (slower)")
    p.add_argument("--backend", default="ort-cpu", help="bundle runtime (default ort-cpu)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _is_bundle(root: Path) -> bool:
    from ngcal.core.files import read_json
    from ngcal.core.manifest import BUNDLE_SCHEMA, MANIFEST_NAME

    raw = read_json(root / MANIFEST_NAME)
    return isinstance(raw, dict) and raw.get("schema") == BUNDLE_SCHEMA


def _score_bundle(
    args: argparse.Namespace, paths: list[Path], with_maps: bool
) -> tuple[Any, Any, Any]:
    import numpy as np

    from ngcal.core.bundle import open_bundle
    from ngcal.core.errors import ImageError
    from ngcal.core.images import load_and_preprocess
    from ngcal.core.runtime import open_scorer

    bundle = open_bundle(args.model)
    scorer = open_scorer(bundle, backend=args.backend, threads=args.threads)
    try:
        spec = scorer.preprocessing
        h, w = spec.hw
        scores = np.full(len(paths), np.nan)
        maps = np.full((len(paths), h, w), np.nan, np.float32) if with_maps else None
        errors: list[tuple[str, str]] = []
        step = max(1, min(args.batch_size, scorer.max_batch))
        for start in range(0, len(paths), step):
            arrays, idx = [], []
            for i in range(start, min(start + step, len(paths))):
                try:
                    arrays.append(load_and_preprocess(paths[i], spec))
                    idx.append(i)
                except ImageError as e:
                    errors.append((str(paths[i]), e.reason))
            if arrays:
                res = scorer.score(np.stack(arrays))
                scores[idx] = np.asarray(res.image_scores, np.float64)
                if maps is not None and res.anomaly_maps is not None:
                    maps[idx] = res.anomaly_maps
        return scores, maps, errors
    finally:
        scorer.close()


def run(args: argparse.Namespace) -> int:
    """Evaluate and print figures."""
    import numpy as np

    from ngcal.calibration.evaluation import (
        aupro,
        downsample,
        image_figures,
        load_masks,
        pixel_auroc,
    )
    from ngcal.core.dataset import load_category
    from ngcal.core.errors import DataError
    from ngcal.core.thresholds import load_thresholds

    cat = load_category(args.data)
    samples = [s for s in cat.test if s.label is not None]
    if not samples:
        raise DataError(f"{args.data}: no labelled test images (test/good, test/<defect>)")
    paths = [s.path for s in samples]
    has_masks = any(s.mask is not None for s in samples)
    bundle = _is_bundle(args.model)
    if bundle:
        scores, maps, errors = _score_bundle(args, paths, has_masks)
    else:
        import torch

        from ngcal.patchcore.io import load_model, score_paths

        torch.set_num_threads(max(1, args.threads))
        loaded = load_model(args.model)
        res = score_paths(
            loaded, paths, batch_size=args.batch_size, progress=not args.quiet, with_maps=has_masks
        )
        scores, maps, errors = res.scores, res.maps, res.errors
    for p, reason in errors:
        print(f"ngcal evaluate: warning: {p}: unreadable ({reason}); left out", file=sys.stderr)
    ok = np.isfinite(scores)
    labels = np.array([s.label for s in samples], dtype=int)
    tpath = args.model / "thresholds.json"
    thresholds = load_thresholds(tpath) if tpath.is_file() else None
    out: dict[str, Any] = image_figures(labels[ok], scores[ok], thresholds)
    out["pixel_auroc"] = None
    if has_masks and maps is not None:
        small = downsample(maps[ok], args.pixel_size)
        kept = [s.mask for s, good in zip(samples, ok, strict=True) if good]
        masks = load_masks(kept, args.pixel_size)
        out["pixel_auroc"] = pixel_auroc(small, masks)
        if args.aupro:
            out["aupro"] = aupro(small, masks)
    out["errors"] = [{"path": p, "reason": r} for p, r in errors]
    out["model"] = str(args.model)
    out["kind"] = "bundle" if bundle else "model"
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["item_id", "path", "label", "defect", "score"])
            for s, sc in zip(samples, scores, strict=True):
                w.writerow(
                    [
                        s.item_id,
                        str(s.path),
                        s.label,
                        s.defect,
                        "" if not np.isfinite(sc) else repr(float(sc)),
                    ]
                )
    if args.json:
        print(json.dumps(out))
    else:
        for key in (
            "image_auroc",
            "pixel_auroc",
            "aupro",
            "f1_oracle",
            "threshold_oracle",
            "threshold",
            "mode",
            "fpr",
            "fnr",
            "f1",
            "f1_gap",
            "cost_regret",
        ):
            if key in out:
                v = out[key]
                print(f"{key:18s} {v:.4f}" if isinstance(v, float) else f"{key:18s} {v}")
    return 0
