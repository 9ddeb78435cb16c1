"""Search and score-set checks of a fitted PatchCore (``detection.py --search``).

``compare_rules``: our chunked-matmul search against torch.cdist on the same bank (image
scores asserted equal to 1e-4; patch distances' largest difference against cdist and a
float64 reference), the direct search's one-GEMM floor (``cdist_over_gemm_only`` is the most
any exact fp32 matmul search could show) and image-score rules on identical distances;
``normal_vs_test_good``: how the normal score sets (LOO, cross-fitted holdout) compare to
test/good; ``machine_speed``: the CPU's 1-thread matmul rate, to compare machines.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

#: anchors.md: 4096^2 fp32 matmul on 1 thread on the machine the anchor figures come from
ANCHOR_MATMUL_GFLOPS = 137.0


def compare_rules(
    loaded: Any, test: list[Any], labels: np.ndarray
) -> tuple[dict[str, float], dict[str, float]]:
    """AUROC of each image-score rule on identical patch distances; and search timings."""
    import torch

    from ngcal.core.metrics import auroc
    from ngcal.patchcore.io import load_batch
    from ngcal.patchcore.nn_search import (
        nearest,
        nearest_cdist,
        nearest_distance_gemm,
    )
    from ngcal.patchcore.rules import ImageRule

    m = loaded.module
    rules = {
        "max": ("max", 1),
        "topk_mean_3": ("topk_mean", 3),
        "topk_mean_5": ("topk_mean", 5),
        "topk_mean_10": ("topk_mean", 10),
        "topk_mean_20": ("topk_mean", 20),
        "reweighted_max": ("reweighted_max", 1),
    }
    out = {k: np.empty(len(test)) for k in rules}
    t_ours = t_cdist = t_gemm = t_direct = 0.0
    max_diff_f64 = 0.0
    score_diff = 0.0
    factored = False
    t_naive = 0.0
    n_naive = 0
    max_diff = 0.0
    saved = m.rule
    with torch.inference_mode():
        for i, s in enumerate(test):
            x, _, _ = load_batch([s.path], loaded.preprocessing)
            m.rule = saved  # the rules loop below changes it
            levels = m.embedder.levels(torch.from_numpy(x))
            feats = m.embedder.combine(levels)
            q = feats.reshape(-1, feats.shape[-1])
            factored = m.factored(levels)
            t0 = time.perf_counter()
            if factored:  # the product's path (PatchCore.forward)
                d = m.level_patch_scores(levels, feats).reshape(-1)
            else:
                d = nearest_distance_gemm(q, m.bank_gemm, chunk=m.chunk)
            t1 = time.perf_counter()
            dc, ic = nearest_cdist(q, m.memory_bank)
            t2 = time.perf_counter()
            nearest_distance_gemm(q, m.bank_gemm, chunk=m.chunk)  # the direct search, D wide
            t_direct += time.perf_counter() - t2
            exact = torch.cdist(q[None].double(), m.memory_bank[None].double())[0].amin(1)
            max_diff_f64 = max(max_diff_f64, float((d.double() - exact).abs().max()))
            k = min(m.topk, d.numel())
            score_diff = max(
                score_diff, abs(float(d.topk(k).values.mean() - dc.topk(k).values.mean()))
            )
            # the floor of any exact fp32 matmul search: the one GEMM alone, no reduction
            qa = torch.cat([q, torch.ones_like(q[:, :1])], dim=1)
            t3 = time.perf_counter()
            torch.matmul(qa, m.bank_gemm)
            t_gemm += time.perf_counter() - t3
            t_ours += t1 - t0
            t_cdist += t2 - t1
            max_diff = max(max_diff, float((d - dc).abs().max()))
            _, idx = nearest(q, m.memory_bank, m.bank_sq, chunk=m.chunk)  # reweighted_max only
            if i % 50 == 0:  # the mm-free cdist is ~30x slower: sample it
                t3 = time.perf_counter()
                torch.cdist(
                    q[None], m.memory_bank[None], compute_mode="donot_use_mm_for_euclid_dist"
                )[0].min(1)
                t_naive += time.perf_counter() - t3
                n_naive += 1
            dist, ind = d.reshape(1, -1), idx.reshape(1, -1)
            for name, (rule, k) in rules.items():
                m.rule = ImageRule(rule, k)
                out[name][i] = float(m.image_scores(feats, dist, ind)[0])
    m.rule = saved
    if score_diff > 1e-4:
        raise SystemExit(f"image scores from our search differ from cdist's by {score_diff}")
    n = len(test)
    timing = {
        "search_ms_matmul": t_ours / n * 1000,
        "search_ms_cdist": t_cdist / n * 1000,
        "search_ms_gemm_only": t_gemm / n * 1000,
        "search_ms_direct": t_direct / n * 1000,
        "search_ms_cdist_no_mm": t_naive / max(n_naive, 1) * 1000,
        "search_factored": float(factored),
        "cdist_max_abs_diff": max_diff,
        "float64_max_abs_diff": max_diff_f64,
        "image_score_max_abs_diff_vs_cdist": score_diff,
    }
    return {k: auroc(labels, v) for k, v in out.items()}, timing


def normal_vs_test_good(model_dir: Path, test: list[Any], scores: np.ndarray) -> dict[str, Any]:
    """KS statistic and p99/p99-based FPR of normal score sets against test/good scores."""
    from scipy.stats import ks_2samp

    from ngcal.core.scoresets import load_scoreset

    good = scores[np.array([s.label == 0 for s in test])]
    out: dict[str, Any] = {
        "test_good_p99": float(np.quantile(good, 0.99)),
        "n_test_good": int(good.size),
    }
    for name in ("normal_loo", "normal_holdout"):
        p = model_dir / "scores" / f"{name}.json"
        if not p.is_file():
            continue
        ss = load_scoreset(p).scores
        ks = ks_2samp(ss, good)
        p99 = float(np.quantile(ss, 0.99))
        out[name] = {
            "ks_statistic": float(ks.statistic),
            "ks_pvalue": float(ks.pvalue),
            "p99": p99,
            "test_good_fpr_at_p99": float(np.mean(good >= p99)),
            "p95": float(np.quantile(ss, 0.95)),
            "test_good_fpr_at_p95": float(np.mean(good >= np.quantile(ss, 0.95))),
        }
    return out


def machine_speed() -> dict[str, Any]:
    """The CPU's name and its 4096^2 fp32 matmul rate on 1 thread (best of 3): anchors.md
    measured 137 GFLOP/s on the machine of its figures, so times can be compared across
    machines of this kind, which vary (shared vCPUs)."""
    import torch

    name = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    a = torch.randn(4096, 4096)
    torch.mm(a, a)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(saved)
    return {
        "cpu": name,
        "matmul_gflops_1t": round(2 * 4096**3 / best / 1e9, 1),
        "anchor_machine_matmul_gflops_1t": ANCHOR_MATMUL_GFLOPS,
    }
