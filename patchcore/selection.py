"""Choosing among fit candidates from good images and synthetic NG only (never test labels).

The evidence for a candidate (an image-score rule, an input geometry) is how well it
separates held-out good images (each scored by the cross-fitting fold bank that did not see
it: ``normal_holdout``) from the same kind of images with one small synthetic defect pasted
in (``probe_defects``), scored by the same fold banks. ``separation`` is the AUROC of the two
score sets; ``tpr_at_p99`` the share of synthetic NG above the 99th percentile of the
held-out good scores (the regime a calibrated threshold works in) breaks near-ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
#: AUROC differences below this count as ties (decided by ``tpr_at_p99``, then order).
TIE = 0.002


@dataclass(frozen=True)
class Evidence:
    """One candidate's separation of held-out good vs synthetic NG scores."""

    candidate: str
    separation: float
    tpr_at_p99: float
    ms_per_image: float | None = None


def evidence(
    candidate: str, normal: np.ndarray, ng: np.ndarray, *, ms_per_image: float | None = None
) -> Evidence:
    """AUROC of ``normal`` [n] (label 0) vs ``ng`` [m] (label 1) and the NG share above
    the normal 99th percentile."""
    labels = np.r_[np.zeros(len(normal)), np.ones(len(ng))]
    sep = auroc(labels, np.r_[normal, ng])
    tpr = float(np.mean(ng > np.quantile(normal, 0.99)))
    return Evidence(candidate, float(sep), tpr, ms_per_image)


def best(table: Sequence[Evidence]) -> Evidence:
    """The candidate with the highest separation; within ``TIE`` of it the highest
    ``tpr_at_p99``, then the earliest (so the default wins real ties)."""
    top = max(e.separation for e in table)
    near = [e for e in table if e.separation >= top - TIE]
    top_tpr = max(e.tpr_at_p99 for e in near)
    return next(e for e in near if e.tpr_at_p99 == top_tpr)


def rule_table(normal: Mapping[str, np.ndarray], ng: Mapping[str, np.ndarray]) -> list[Evidence]:
    """Evidence per rule label, in ``normal``'s order (the labels of ``ImageRule.label``)."""
    return [evidence(label, normal[label], ng[label]) for label in normal]


def format_table(table: Sequence[Evidence], chosen: str) -> str:
    """The evidence as a small text table (one line per candidate, the choice marked)."""
    lines = [f"{'candidate':<28} {'separation':>10} {'tpr@p99':>8} {'ms/image':>9}"]
    for e in table:
        ms = f"{e.ms_per_image:9.1f}" if e.ms_per_image is not None else f"{'-':>9}"
        mark = " <- chosen" if e.candidate == chosen else ""
        lines.append(f"{e.candidate:<28} {e.separation:10.4f} {e.tpr_at_p99:8.3f} {ms}{mark}")
    return "\n".join(lines)
