"""Choosing among fit candidates from good images and synthetic NG only (never test labels).

The evidence for a candidate (an image-score rule, an input geometry) is how well it
separates held-out good images (each scored by the cross-fitting fold bank that did not see
it: ``normal_holdout``) from the same kind of images with one small synthetic defect pasted
in (``probe_defects``), scored by the same fold banks. ``separation`` is the AUROC of the two
score sets; ``tpr_at_p99`` the share of synthetic NG above the 99th percentile of the
held-out good scores (the regime a calibrated threshold works in) is reported beside it. A
candidate replaces the default (the first) only when it separates better in at least 90%
of paired bootstrap resamples of the images (``choose``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ngcal.core.metrics import auroc

from .rules import ImageRule

#: Image-score rules ``fit`` compares when it chooses (the default first: ties keep it).
CANDIDATE_RULES = (
    ImageRule("topk_mean", 10),
    ImageRule("topk_mean", 3),
    ImageRule("topk_mean", 30),
    ImageRule("max", 1),
    ImageRule("reweighted_max", 1),
)
#: a candidate replaces the default only when its separation beats the default's in at
#: least this share of bootstrap resamples of the images (paired: same resample for both)
CONFIDENCE = 0.9
RESAMPLES = 200


@dataclass(frozen=True)
class Evidence:
    """One candidate's separation of held-out good vs synthetic NG scores."""

    candidate: str
    separation: float
    tpr_at_p99: float
    ms_per_image: float | None = None
    #: share of bootstrap resamples in which it separates better than the default
    beats_default: float | None = None


def evidence(
    candidate: str, normal: np.ndarray, ng: np.ndarray, *, ms_per_image: float | None = None
) -> Evidence:
    """AUROC of ``normal`` [n] (label 0) vs ``ng`` [m] (label 1) and the NG share above
    the normal 99th percentile."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(ng))]
    sep = auroc(labels, np.r_[normal, ng])
    tpr = float(np.mean(ng > np.quantile(normal, 0.99)))
    return Evidence(candidate, float(sep), tpr, ms_per_image)


def beats(
    normal: Mapping[str, np.ndarray],
    ng: Mapping[str, np.ndarray],
    candidate: str,
    default: str,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> float:
    """Share of paired bootstrap resamples (good and NG images drawn with replacement, the
    same draw for both) in which ``candidate`` has the higher AUROC than ``default``."""
    rng = np.random.default_rng(seed)
    n, m = len(normal[default]), len(ng[default])
    labels = np.r_[np.zeros(n), np.ones(m)]
    wins = 0
    for _ in range(resamples):
        i, j = rng.integers(0, n, n), rng.integers(0, m, m)
        a = auroc(labels, np.r_[normal[candidate][i], ng[candidate][j]])
        b = auroc(labels, np.r_[normal[default][i], ng[default][j]])
        wins += a > b
    return wins / resamples


def choose(
    normal: Mapping[str, np.ndarray],
    ng: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    eligible: Collection[str] | None = None,
) -> tuple[list[Evidence], str]:
    """Evidence per candidate (labels in ``normal``'s order, the first is the default) and
    the choice: the best-separating candidate that beats the default in at least
    ``CONFIDENCE`` of the bootstrap resamples, else the default (a difference the sample
    cannot tell from noise does not move a product off the default). Only candidates in
    ``eligible`` (default: all) may be chosen; the others' evidence is still reported."""
    labels = list(normal)
    default = labels[0]
    table = [evidence(k, normal[k], ng[k]) for k in labels]
    table = [
        replace(
            e,
            beats_default=None
            if e.candidate == default
            else beats(normal, ng, e.candidate, default, seed=seed),
        )
        for e in table
    ]
    base = table[0].separation
    better = [
        e
        for e in table[1:]
        if e.separation > base
        and (e.beats_default or 0) >= CONFIDENCE
        and (eligible is None or e.candidate in eligible)
    ]
    chosen = max(better, key=lambda e: e.separation).candidate if better else default
    return table, chosen


def format_table(table: Sequence[Evidence], chosen: str) -> str:
    """The evidence as a small text table (one line per candidate, the choice marked)."""
    head = f"{'candidate':<28} {'separation':>10} {'tpr@p99':>8} {'beats':>6} {'ms/image':>9}"
    lines = [head]
    for e in table:
        ms = f"{e.ms_per_image:9.1f}" if e.ms_per_image is not None else f"{'-':>9}"
        won = f"{e.beats_default:6.2f}" if e.beats_default is not None else f"{'-':>6}"
        mark = " <- chosen" if e.candidate == chosen else ""
        lines.append(f"{e.candidate:<28} {e.separation:10.4f} {e.tpr_at_p99:8.3f} {won} {ms}{mark}")
    return "\n".join(lines)
