"""GLASS synthetic NG against real defects: severity curve, KS and Wasserstein distances.

Usage::

    python benchmarks/glass.py --data <category dir> [--model <model dir>] [--count 64]

For each GAS severity: the fraction of synthetic NG scoring above the 99th percentile of
the model's leave-one-out normal scores (``scores/normal_loo.json``), and the two-sample
KS statistic and Wasserstein-1 distance between the synthetic scores and the real test
defects' scores (all defects, and per defect type). The same for LAS images at a fixed
blend (``--beta``, default 0.5), and for the pooled scores of every contiguous window of
the severity grid (a severity *range*, since one severity gives a narrow score spread).
Real test scores come from ``ngcal.patchcore.io.score_paths`` once per model and are
cached under ``runs/``.
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "runs" / "tile" / "model"


def distances(synthetic: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """KS statistic and Wasserstein-1 distance between two score samples."""
    return {
        "ks": float(ks_2samp(synthetic, real).statistic),
        "wasserstein": float(wasserstein_distance(synthetic, real)),
    }


def real_scores(model_dir: Path, data: Path, cache_dir: Path) -> dict[str, object]:
    """Scores of every test image (cached per model sha256): ids, defect types, scores."""
    from ngcal.core.dataset import load_category
    from ngcal.core.manifest import manifest_sha256

    sha = manifest_sha256(model_dir)
    cache = cache_dir / f"test_scores_{sha[:16]}.json"
    if cache.is_file():
        cached: dict[str, object] = json.loads(cache.read_text())
        if cached.get("model_sha256") == sha:
            return cached
        print(f"[glass] {cache} was scored by another model; re-scoring", file=sys.stderr)
    from ngcal.patchcore.io import load_model, score_paths

    cat = load_category(data)
    loaded = load_model(model_dir)
    t0 = time.perf_counter()
    scored = score_paths(loaded, [s.path for s in cat.test], progress=True, with_maps=False)
    out = {
        "model_sha256": sha,
        "seconds": time.perf_counter() - t0,
        "ids": [s.item_id for s in cat.test],
        "defects": [s.defect for s in cat.test],
        "labels": [int(s.label or 0) for s in cat.test],
        "scores": [float(x) for x in scored.scores],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "glass_bench")
    ap.add_argument("--severities", default="0.25,0.5,0.75,1,1.5,2,3")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=0.5, help="fixed LAS blend")
    ap.add_argument("--variant", choices=("manifold", "hypersphere"), default="manifold")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from ngcal.core.scoresets import load_scoreset
    from ngcal.generation.glass import GlassOptions, generate_glass

    torch.set_num_threads(args.threads)
    severities = tuple(float(x) for x in args.severities.split(","))
    real = real_scores(args.model, args.data, args.out)
    labels = np.asarray(real["labels"])
    defects = np.asarray(real["defects"])
    scores = np.asarray(real["scores"], dtype=np.float64)
    ng = scores[labels == 1]
    types = sorted(set(defects[labels == 1].tolist()))
    loo = load_scoreset(args.model / "scores" / "normal_loo.json").scores
    p99 = float(np.quantile(loo, 0.99))

    t0 = time.perf_counter()
    options = GlassOptions(
        severities=severities,
        count=args.count,
        seed=args.seed,
        epochs=args.epochs,
        beta=args.beta,
        variant=args.variant,
        device=args.device,
    )
    result = generate_glass(args.model, args.data, args.out / "glass", options, progress=True)
    gen_seconds = time.perf_counter() - t0

    def describe(x: np.ndarray) -> dict[str, object]:
        d = distances(x, ng)
        return {
            "frac_above_p99": float(np.mean(x > p99)),
            "ks_real": d["ks"],
            "wasserstein_real": d["wasserstein"],
            "median": float(np.median(x)),
            "per_defect": {t: distances(x, scores[(labels == 1) & (defects == t)]) for t in types},
        }

    curve = []
    for s in result.feature_sets:
        curve.append({"severity": s.severity, **describe(s.scores)})
    las = describe(result.image_set.scores)
    fracs = [c["frac_above_p99"] for c in curve]
    medians = [c["median"] for c in curve]
    best = min(curve, key=lambda c: c["ks_real"])
    windows = []
    sets = [x.scores for x in result.feature_sets]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets) + 1):
            pooled = np.concatenate(sets[i:j])
            windows.append({"severities": list(severities[i:j]), **distances(pooled, ng)})
    best_window = min(windows, key=lambda w: w["ks"])  # type: ignore[arg-type, return-value]
    out = {
        "data": args.data.name,
        "model_sha256": result.summary["model_sha256"],
        "r0": result.summary["r0"],
        "count_per_severity": args.count,
        "epochs": args.epochs,
        "variant": args.variant,
        "seed": args.seed,
        "device": result.summary["device"],
        "normal_loo_p99": p99,
        "real_ng_count": int(ng.size),
        "real_ng_frac_above_p99": float(np.mean(ng > p99)),
        "real_ng_median": float(np.median(ng)),
        "real_ok_frac_above_p99": float(np.mean(scores[labels == 0] > p99)),
        "severity_curve": curve,
        "max_severity_frac_above_p99": fracs[int(np.argmax(severities))],
        "severity_curve_monotone": int(bool(np.all(np.diff(fracs) >= 0))),
        "severity_median_monotone": int(bool(np.all(np.diff(medians) >= 0))),
        "best_severity": best["severity"],
        "best_severity_ks_real": best["ks_real"],
        "best_severity_wasserstein_real": best["wasserstein_real"],
        "best_window_severities": best_window["severities"],
        "best_window_ks_real": best_window["ks"],
        "best_window_wasserstein_real": best_window["wasserstein"],
        "las_beta": args.beta,
        "las_frac_above_p99": las["frac_above_p99"],
        "las_ks_real": las["ks_real"],
        "las_wasserstein_real": las["wasserstein_real"],
        "las_median": las["median"],
        "las_per_defect": las["per_defect"],
        "some_severity_beats_las_ks": int(best["ks_real"] < las["ks_real"]),
        "generate_seconds": gen_seconds,
        "test_scoring_seconds": real["seconds"],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
