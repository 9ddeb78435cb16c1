"""Diffusion synthetic NG against real defects and GLASS, and its effect on k = 2 thresholds.

Usage::

    python benchmarks/diffusion.py --data <category dir> --model <model dir> \
        --glass <ngcal generate glass output dir> [--quick] [--seed 0]

Protocol: per defect type, 2 real NG (drawn with the seed) are given to ``ngcal generate
diffusion`` (``fewshot`` backend) and excluded from every evaluation below. The kept
diffusion NG are scored by the model; the held-out real NG are the other test defects of
the same types. Reported: training time, seconds per candidate, acceptance rate, KS and
Wasserstein-1 between the PatchCore scores of the diffusion NG and of the held-out real NG,
and the same KS for GLASS's image-space NG (``glass_image`` of a glass run on the same
model). Threshold effect: the ``threshold_quality`` protocol at k = 2 (test good split in a
calibration and an evaluation half per repeat; the 2 confirmed real NG are drawn from the
given references; cost mode at prevalence 0.02 and cost ratios 10 and 100, regret summed)
with normal + GLASS + 2 real NG evidence, and with the diffusion set added. The gate audit
(``gate_real_heldout``): ``--gate-real`` held-out real NG per type go through the same gate,
each against itself with its mask re-filled by a good image's texture; a realistic gate
passes most of them. ``--strength`` sets the reference-guided start (decision 0401).
Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance

REPO = Path(__file__).resolve().parents[1]


def say(msg: str) -> None:
    print(f"[diffusion] {msg}", file=sys.stderr, flush=True)


def _threshold_quality() -> Any:
    """``benchmarks/threshold_quality.py`` as a module (its evaluate, constants, scorer)."""
    spec = importlib.util.spec_from_file_location(
        "threshold_quality", REPO / "benchmarks" / "threshold_quality.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return p.name


def gate_real(
    model: Path, refs: list[Any], held: list[Any], donors: list[np.ndarray], crop: int
) -> dict[str, Any]:
    """The gate run on held-out real NG as if they were candidates: each real NG against its
    own good image estimated by cloning a good image's (``donors``, in turn) pixels under its
    mask seamlessly into it (the rest exact), near-copy against the given references' crops.
    A gate that rejects many real defects measures something other than realism."""
    from collections import Counter

    from ngcal.generation.diffusion.backend import Candidate, Request
    from ngcal.generation.diffusion.gate import GateConfig, verdict
    from ngcal.generation.diffusion.placement import clone
    from ngcal.generation.diffusion.run import gate_all
    from ngcal.generation.diffusion.windows import mask_window, take, take_mask
    from ngcal.patchcore.io import load_model

    loaded = load_model(model, device="cpu")
    reqs, cands = [], []
    for i, r in enumerate(held):
        good = clone(r.image, donors[i % len(donors)], r.mask)
        win = mask_window(r.mask, min_side=crop)
        reqs.append(Request(good, r.mask, r.group))
        cands.append([Candidate(r.image, take(r.image, win, crop), take_mask(r.mask, win, crop))])
    training = [take(r.image, mask_window(r.mask, min_side=crop), crop) for r in refs]
    gated = gate_all(reqs, cands, training, refs, loaded, GateConfig())
    fails: Counter[str] = Counter()
    passed = 0
    for row in gated:
        ok, failed = verdict(row[0][0])
        passed += ok
        fails.update(failed)
    return {
        "n": len(held),
        "pass_rate": passed / max(len(held), 1),
        "failed_checks": dict(fails),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, default=REPO / "runs" / "shared" / "tile" / "model")
    p.add_argument("--glass", type=Path, default=REPO / "runs" / "shared" / "tile" / "glass")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "diffusion_bench")
    p.add_argument("--quick", action="store_true", help="fewer targets and training steps")
    p.add_argument("--train-steps", type=int, default=None, help="override the fewshot steps")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="reference-guided start (SDEdit) strength, 1 = from pure noise (default: the "
        "fewshot backend's)",
    )
    p.add_argument("--per-type", type=int, default=2, help="real NG given per defect type")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--gate-real", type=int, default=8, help="held-out real NG per type run through the gate"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheet", type=Path, default=None, help="copy the contact sheet here")
    args = p.parse_args(argv)

    import torch

    from ngcal.calibration.estimate import calibrate
    from ngcal.core.dataset import load_category
    from ngcal.core.images import load_mask, load_rgb, resize_rgb
    from ngcal.core.manifest import manifest_sha256, read_manifest
    from ngcal.core.scoresets import NORMAL_SOURCES, SYNTHETIC_SOURCES, ScoreSet, load_scoresets
    from ngcal.core.thresholds import OperatingPoint
    from ngcal.generation.diffusion.backend import Reference
    from ngcal.generation.diffusion.fewshot import FewShotConfig
    from ngcal.generation.diffusion.run import DiffusionOptions, generate_diffusion

    torch.set_num_threads(1)
    tq = _threshold_quality()
    t_start = time.time()
    sha = manifest_sha256(args.model)
    size = read_manifest(args.model).preprocessing.image_size  # type: ignore[union-attr]
    ts = tq.test_scores(args.model, args.data, args.work / f"test_scores_{sha[:12]}.json")
    cat = load_category(args.data)
    rng = np.random.default_rng(args.seed)
    defects = [s for s in cat.test if s.label == 1 and s.mask is not None]
    refs, given_ids = [], set()
    for d in cat.defects:
        pool = [s for s in defects if s.defect == d]
        for i in rng.choice(len(pool), size=min(args.per_type, len(pool)), replace=False):
            s = pool[int(i)]
            assert s.mask is not None
            refs.append(
                Reference(resize_rgb(load_rgb(s.path), size), load_mask(s.mask, size), d, s.item_id)
            )
            given_ids.add(s.item_id)
    n_types = len(cat.defects)
    held_refs = []  # held-out real NG for the gate audit, drawn after the given ones
    for d in cat.defects:
        pool = [s for s in defects if s.defect == d and s.item_id not in given_ids]
        n = min(args.gate_real, len(pool))
        for i in rng.choice(len(pool), size=n, replace=False):
            s = pool[int(i)]
            assert s.mask is not None
            held_refs.append(
                Reference(resize_rgb(load_rgb(s.path), size), load_mask(s.mask, size), d, s.item_id)
            )
    count = (6 if args.quick else 16) * n_types
    strength = args.strength or FewShotConfig.strength
    fewshot = FewShotConfig(
        crop=32,
        train_steps=args.train_steps or (300 if args.quick else 1200),
        sample_steps=20 if args.quick else 40,
        strength=strength,
        seed=args.seed,
    )
    options = DiffusionOptions(
        count=count,
        candidates=3 if args.quick else 4,
        seed=args.seed,
        device="cpu",
        fewshot=fewshot,
    )
    tag = f"{'quick' if args.quick else 'full'}{args.train_steps or ''}_st{strength:g}"
    out = args.work / f"gen_{tag}_s{args.seed}"
    say(f"generating {count} targets from {len(refs)} real NG ({n_types} types) into {out}")
    t0 = time.time()
    res = generate_diffusion(args.model, args.data, out, options, progress=True, references=refs)
    gen_seconds = time.time() - t0
    summary = res.summary
    backend_rec: dict[str, Any] = summary["backend"]  # type: ignore[assignment]
    diff = res.scoreset
    say(f"gating {len(held_refs)} held-out real NG")
    donors = [resize_rgb(load_rgb(s.path), size) for s in cat.train[:8]]
    gate_real_rec = gate_real(args.model, refs, held_refs, donors, fewshot.crop)

    ids = list(ts["ids"])
    labels = np.asarray(ts["labels"], dtype=np.int64)
    scores = np.asarray(ts["scores"], dtype=np.float64)
    defect_of = list(ts["defects"])
    held = np.asarray([i for i in range(len(ids)) if labels[i] == 1 and ids[i] not in given_ids])
    given = np.asarray([i for i in range(len(ids)) if ids[i] in given_ids])
    real_held = scores[held]
    glass_sets = []
    if (args.glass / "scores").is_dir():
        glass_sets = [
            s for s in load_scoresets([args.glass / "scores"]) if s.source in SYNTHETIC_SOURCES
        ]
    else:
        say(f"no GLASS scores under {args.glass}: GLASS figures left out")
    glass_image = np.concatenate(
        [s.scores for s in glass_sets if s.source == "glass_image"] or [np.zeros(0)]
    )

    def dist(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
        if x.size == 0 or y.size == 0:
            return None, None
        return float(ks_2samp(x, y).statistic), float(wasserstein_distance(x, y))

    ks_d, w_d = dist(diff.scores, real_held)
    ks_g, w_g = dist(glass_image, real_held)
    per_type = {}
    for d in cat.defects:
        r = scores[[i for i in held if defect_of[i] == d]]
        x = diff.scores[[g == d for g in (diff.groups or ())]] if diff.groups else np.zeros(0)
        k, w = dist(x, r)
        per_type[d] = {
            "n": int(x.size),
            "ks": k,
            "wasserstein": w,
            "median": float(np.median(x)) if x.size else None,
        }

    # k = 2 threshold effect (threshold_quality's protocol, reimplemented for the split of
    # this benchmark: the 2 confirmed NG come from the references, evaluation excludes them).
    model_sets = [s for s in load_scoresets([args.model / "scores"]) if s.source in NORMAL_SOURCES]
    good = np.flatnonzero(labels == 0)
    rr = np.random.default_rng([args.seed, 2])
    regrets: dict[str, list[float]] = {"glass": [], "glass_diffusion": [], "diffusion": []}
    for _ in range(args.repeats):
        perm = rr.permutation(good)
        calib, evalg = perm[: good.size // 2], perm[good.size // 2 :]
        drawn = rr.choice(given, size=2, replace=False)
        ev_idx = np.r_[evalg, held]
        y, s = labels[ev_idx], scores[ev_idx]
        base = list(model_sets) + [
            ScoreSet(source="real_ok", scores=scores[calib], item_ids=tuple(ids[i] for i in calib)),
            ScoreSet(source="real_ng", scores=scores[drawn], item_ids=tuple(ids[i] for i in drawn)),
        ]
        variants = {
            "glass": base + glass_sets,
            "glass_diffusion": base + glass_sets + ([diff] if len(diff) else []),
            "diffusion": base + ([diff] if len(diff) else []),
        }
        for name, evidence in variants.items():
            total = 0.0
            for c in tq.COSTS:
                op = OperatingPoint(prevalence=tq.PREVALENCE, cost_ratio=c)
                t = calibrate(
                    evidence, mode="cost", operating_point=op, n_boot=0, prior_pseudo_count=2.0
                )
                total += tq.evaluate(y, s, t.value)[f"regret_{c:g}"]
            regrets[name].append(total)

    med = {k: float(np.median(v)) for k, v in regrets.items()}
    if args.sheet is not None:
        args.sheet.write_bytes(res.contact_sheet.read_bytes())
    rows = json.loads((out / "index.json").read_text())["items"]
    result: dict[str, Any] = {
        "data": args.data.name,
        "model_sha256": sha,
        "quick": args.quick,
        "seed": args.seed,
        "real_ng_given": sorted(given_ids),
        "real_ng_heldout": int(held.size),
        "targets": summary["targets"],
        "candidates": summary["candidates"],
        "kept": summary["kept"],
        "train_seconds": backend_rec["train_seconds"],
        "seconds_per_sample": summary["seconds_per_sample"],
        "generate_seconds": gen_seconds,
        "acceptance_rate": summary["acceptance_rate"],
        "candidate_pass_rate": float(np.mean([r["passed"] for r in rows])),
        "failed_checks": summary["failed_checks"],
        "gate_real_heldout": gate_real_rec,
        "loss_first_last": [backend_rec["loss_first"], backend_rec["loss_last"]],
        "ks_real_diffusion": ks_d,
        "ks_real_glass_image": ks_g,
        "wasserstein_real_diffusion": w_d,
        "wasserstein_real_glass_image": w_g,
        "median_score_diffusion": float(np.median(diff.scores)) if len(diff) else None,
        "median_score_real_heldout": float(np.median(real_held)),
        "median_score_glass_image": float(np.median(glass_image)) if glass_image.size else None,
        "per_type": per_type,
        "cost_regret_k2_glass": med["glass"],
        "cost_regret_k2_glass_diffusion": med["glass_diffusion"],
        "cost_regret_k2_diffusion": med["diffusion"],
        "repeats": args.repeats,
        "goals": {
            "acceptance_rate_ge_0.5": int(summary["acceptance_rate"] >= 0.5),  # type: ignore[operator]
            "ks_diffusion_lt_glass_image": int(
                ks_d is not None and ks_g is not None and ks_d < ks_g
            ),
            "k2_regret_not_raised": int(med["glass_diffusion"] <= med["glass"]),
        },
        "glass": _rel(args.glass),
        "model": _rel(args.model),
        "fewshot": backend_rec["config"],
        "total_seconds": time.time() - t_start,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
