"""Detection benchmark: what ``ngcal fit`` with its defaults detects on each product, at
what fit time and edge latency, against the old default (256 px square, top-10 mean).

    python benchmarks/detection.py [--data D ...] [--demo] [--table] [--long] [--no-default-data]
        [--ablation K,..] [--search] [--save F]

Per product (``--data``, repeatable; ``--demo`` adds the procedural demo product,
``--table`` the procedural part on a cluttered table, ``--long`` a 1:2.5 long part,
``detection_products``) it runs
``ngcal fit`` with no size or rule (so ``--auto`` chooses from good images and synthetic NG
only), scores the labelled test split once (test labels are used for the figures only,
never for a choice) and prints one JSON object: ``image_auroc``, ``pixel_auroc``,
``f1_oracle``, ``fit_seconds``, ``ort_p50_ms`` (onnxruntime, 1 thread, batch 1, the
exported bundle), the settings ``--auto`` chose with its evidence (geometry, part mask,
rule; ``whole_frame_image_auroc``: the chosen rule without the mask), the same figures for the
old default (the same memory bank and distances with the top-10 mean, when the geometry is
the old one; else its own fit) and ``ort_p50_ratio``: new / old, timed interleaved in one
process (the machine is shared). ``test_auroc_by_rule`` shows what each candidate rule
would have given (reporting only). ``--ablation`` adds fits without cross-fitting at
other geometries (``ABLATION``: aspect kept, 320 px) with every rule; ``--search`` the
search/score-set checks of ``detection_search``. ``--save F`` writes ``{"products": [...]}`` to F.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "magnetic_tile" / "tile"
)
OLD_DEFAULT = ("topk_mean", 10)


def log(msg: str) -> None:
    print(f"[detection] {msg}", file=sys.stderr, flush=True)


def run_fit(data: Path, out: Path, threads: int, *extra: str) -> float:
    """``ngcal fit --data data --out out [extra]`` through the CLI; wall seconds."""
    from ngcal.cli.main import main

    t0 = time.perf_counter()
    args = ["fit", "--data", str(data), "--out", str(out), "--threads", str(threads), "--quiet"]
    if main([*args, *extra]) != 0:
        raise SystemExit(f"fit failed on {data}")
    return time.perf_counter() - t0


def test_scores(model_dir: Path, data: Path) -> dict[str, Any]:
    """Every candidate rule's image scores and the anomaly maps on the labelled test split,
    from one search per image (with the nearest rows, for reweighted_max), with the
    model's part mask applied as the model applies it (``scores``) and without it
    (``whole``)."""
    import torch

    from ngcal.core.dataset import load_category
    from ngcal.patchcore.io import load_batch, load_model
    from ngcal.patchcore.nn_search import nearest
    from ngcal.patchcore.rules import image_scores
    from ngcal.patchcore.selection import CANDIDATE_RULES

    loaded = load_model(model_dir)
    m = loaded.module
    test = [s for s in load_category(data).test if s.label is not None]
    scores = {r.label: np.empty(len(test)) for r in CANDIDATE_RULES}
    whole = {r.label: np.empty(len(test)) for r in CANDIDATE_RULES}
    maps, whole_maps = [], []
    with torch.inference_mode():
        for i, s in enumerate(test):
            x, _, _ = load_batch([s.path], loaded.preprocessing)
            feats = m.embed(torch.from_numpy(x))
            _, h, w, d = feats.shape
            dist, idx = nearest(feats.reshape(-1, d), m.memory_bank, m.bank_sq, chunk=m.chunk)
            raw, idx = dist.reshape(1, -1), idx.reshape(1, -1)
            dist = m.masked(raw)
            for r in CANDIDATE_RULES:
                v = image_scores(r, feats, dist, idx, m.bank_neighbour_rows)
                scores[r.label][i] = float(v[0])
                v = image_scores(r, feats, raw, idx, m.bank_neighbour_rows)
                whole[r.label][i] = float(v[0])
            maps.append(m.anomaly_map(dist, (h, w))[0].numpy())
            whole_maps.append(m.anomaly_map(raw, (h, w))[0].numpy() if m.has_foreground else None)
    return {
        "loaded": loaded,
        "test": test,
        "scores": scores,
        "whole": whole,
        "maps": np.stack(maps),
        "whole_maps": np.stack(whole_maps) if m.has_foreground else np.stack(maps),
    }


def without_mask(m: Any, rule: tuple[str, int]) -> Any:
    """The same detector (embedder, bank) without its part mask, scoring by ``rule``."""
    from ngcal.patchcore.model import PatchCore

    return PatchCore(
        m.embedder,
        m.memory_bank,
        image_size=m.image_size,
        image_hw=m.image_hw,
        image_score=rule[0],
        topk=rule[1],
        reweight_neighbors=m.reweight_neighbors,
        smoothing_sigma=m.smoothing_sigma,
    ).eval()


def figures(
    labels: np.ndarray, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray
) -> dict[str, Any]:
    """image_auroc, pixel_auroc, f1_oracle (test labels: reporting only)."""
    from ngcal.calibration.evaluation import downsample, image_figures, pixel_auroc

    f = image_figures(labels, scores)
    return {
        "image_auroc": round(f["image_auroc"], 4),
        "pixel_auroc": round(pixel_auroc(downsample(maps, 64), masks) or float("nan"), 4),
        "f1_oracle": round(f["f1_oracle"], 4),
    }


def ort_p50(
    onnx_paths: dict[str, Path], pre: dict[str, Any], x: dict[str, np.ndarray], reps: int
) -> dict[str, float]:
    """Median ms per image (batch 1, 1 thread) of each graph, timed interleaved."""
    from ngcal.core.ort_backend import OrtScorer

    sessions = {k: OrtScorer(p, pre[k], threads=1, max_batch=1) for k, p in onnx_paths.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        for _ in range(3):
            s.score(x[k])
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.score(x[k])
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def product(data: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark of one product (see the module docstring)."""
    import torch

    from ngcal.calibration.evaluation import load_masks
    from ngcal.core.manifest import ModelManifest, read_manifest
    from ngcal.export.bundle_writer import export_bundle
    from ngcal.export.onnx_graph import export_onnx
    from ngcal.patchcore.io import load_batch

    torch.set_num_threads(args.threads)
    name = data.resolve().name
    model, bundle = tmp / f"{name}_model", tmp / f"{name}_bundle"
    log(f"{name}: ngcal fit (defaults: --auto)")
    fit_s = run_fit(data, model, args.threads)
    man = read_manifest(model)
    assert isinstance(man, ModelManifest)
    pc = man.patchcore
    log(f"{name}: scoring the test split")
    ts = test_scores(model, data)
    test = ts["test"]
    labels = np.array([s.label for s in test])
    masks = load_masks([s.mask for s in test], 64)
    chosen = f"topk_mean_{pc.image_score_k}" if pc.image_score == "topk_mean" else pc.image_score
    res: dict[str, Any] = {"data": name, "n_train": pc.num_train_images, "n_test": len(test)}
    res.update(figures(labels, ts["scores"][chosen], ts["maps"], masks))
    res["fit_seconds"] = round(fit_s, 1)
    res["fit_parts"] = {k: v for k, v in pc.stats.items() if k.endswith("_seconds")}
    res["settings"] = {
        "input_hw": list(man.preprocessing.hw),
        "foreground": pc.foreground is not None,
        "foreground_coverage": pc.stats.get("foreground_coverage"),
        "foreground_contrast": pc.stats.get("foreground_contrast"),
        "image_score": chosen,
        "choices": [c.model_dump() for c in pc.choices],
    }
    res["whole_frame_image_auroc"] = round(
        figures(labels, ts["whole"][chosen], ts["maps"], masks)["image_auroc"], 4
    )
    res["test_auroc_by_rule"] = {
        k: round(figures(labels, v, ts["maps"], masks)["image_auroc"], 4)
        for k, v in ts["scores"].items()
    }
    log(f"{name}: export + onnxruntime timing")
    export_bundle(model, bundle)
    old_label = f"{OLD_DEFAULT[0]}_{OLD_DEFAULT[1]}"
    old_pre = man.preprocessing
    if man.preprocessing.hw == (256, 256):  # same bank and distances: rule and mask differ
        old = without_mask(ts["loaded"].module, OLD_DEFAULT)
        res["old_default"] = figures(labels, ts["whole"][old_label], ts["whole_maps"], masks)
    else:
        log(f"{name}: fitting the old default (256 px square, top-10 mean) for comparison")
        old_dir = tmp / f"{name}_old"
        run_fit(data, old_dir, args.threads, "--image-size", "256", "--cv-folds", "0")
        ots = test_scores(old_dir, data)
        old = ots["loaded"].module
        old_pre = ots["loaded"].preprocessing
        res["old_default"] = figures(labels, ots["scores"][old_label], ots["maps"], masks)
    old_onnx = tmp / f"{name}_old.onnx"
    export_onnx(old, old_onnx)
    x = {
        "new": load_batch([test[0].path], man.preprocessing)[0],
        "old": load_batch([test[0].path], old_pre)[0],
    }
    p50 = ort_p50(
        {"new": bundle / "model.onnx", "old": old_onnx},
        {"new": man.preprocessing, "old": old_pre},
        x,
        args.reps,
    )
    res["ort_p50_ms"] = round(p50["new"], 2)
    res["old_default"]["ort_p50_ms"] = round(p50["old"], 2)
    res["ort_p50_ratio"] = round(p50["new"] / p50["old"], 3)
    if args.ablation:
        keys = list(ABLATION) if args.ablation == "all" else args.ablation.split(",")
        res["ablation"] = ablation(data, tmp, args.threads, labels, masks, keys)
    if args.search:
        from detection_search import compare_rules, normal_vs_test_good

        _, timing = compare_rules(ts["loaded"], test, labels)
        timing["cdist_over_matmul"] = timing["search_ms_cdist"] / timing["search_ms_matmul"]
        timing["cdist_over_gemm_only"] = timing["search_ms_cdist"] / timing["search_ms_gemm_only"]
        res["search"] = timing
        res["normal_scores_vs_test_good"] = normal_vs_test_good(model, test, ts["scores"][chosen])
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return res


ABLATION = {
    "square_256": ["--image-size", "256"],
    "keep_aspect_256": ["--image-size", "256", "--aspect", "keep"],
    "square_320": ["--image-size", "320"],
    "keep_aspect_288": ["--image-size", "288", "--aspect", "keep"],
    "square_288": ["--image-size", "288"],
    "keep_aspect_320": ["--image-size", "320", "--aspect", "keep"],
    "keep_aspect_416": ["--image-size", "416", "--aspect", "keep"],
    "keep_aspect_448": ["--image-size", "448", "--aspect", "keep"],
    "foreground_on": ["--image-size", "256", "--foreground", "on"],
}


def ablation(
    data: Path, tmp: Path, threads: int, labels: np.ndarray, masks: np.ndarray, keys: list[str]
) -> dict[str, Any]:
    """Fits without cross-fitting at the ``ABLATION`` geometries ``keys``: test AUROC of
    every rule, pixel AUROC, fit time."""
    out: dict[str, Any] = {}
    for key in keys:
        if key not in ABLATION:
            raise SystemExit(f"--ablation {key!r}: one of {list(ABLATION)}")
        extra = ABLATION[key]
        log(f"ablation {key}")
        d = tmp / f"ablation_{key}"
        fit_s = run_fit(data, d, threads, *extra, "--cv-folds", "0")
        ts = test_scores(d, data)
        out[key] = {
            "input_hw": list(ts["loaded"].preprocessing.hw),
            "foreground": ts["loaded"].manifest.patchcore.foreground is not None,
            "fit_seconds": round(fit_s, 1),
            "pixel_auroc": figures(labels, ts["scores"]["max"], ts["maps"], masks)["pixel_auroc"],
            "image_auroc_by_rule": {
                k: round(figures(labels, v, ts["maps"], masks)["image_auroc"], 4)
                for k, v in ts["scores"].items()
            },
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append", default=None)
    ap.add_argument("--demo", action="store_true", help="add the procedural demo product")
    ap.add_argument(
        "--table",
        action="store_true",
        help="add the procedural part on a cluttered table (detection_products)",
    )
    ap.add_argument("--long", action="store_true", help="add the procedural 1:2.5 long part")
    ap.add_argument(
        "--no-default-data",
        action="store_true",
        help="only the procedural products (no --data, no magnetic tile)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="timed runs per graph")
    ap.add_argument(
        "--ablation",
        default="",
        help=f"comma-separated extra fits, of {','.join(ABLATION)} (or 'all')",
    )
    ap.add_argument("--search", action="store_true")
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()
    datas: list[Path] = args.data or (
        [] if args.no_default_data else [Path(os.environ.get("NGCAL_DATA", DEFAULT_DATA))]
    )
    results = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.demo:
            from ngcal.generation.demo_data import make_demo_category

            datas.append(make_demo_category(tmp / "demo", seed=1))
        if args.table:
            from detection_products import make_part_on_table

            datas.append(make_part_on_table(tmp / "table", seed=0))
        if args.long:
            from detection_products import make_long_part

            datas.append(make_long_part(tmp / "long", seed=0))
        for data in datas:
            res = product(data, tmp, args)
            print(json.dumps(res), flush=True)
            results.append(res)
    if args.save is not None:
        args.save.write_text(json.dumps({"products": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
