"""Fit-time evidence: cross-fitted patch distances of good images and of synthetic NG.

``fit`` scores every training image with the bank of the fold that did not see it
(``fold_distances``) and, when it chooses the image-score rule or the part mask, a sample
of those images with one small synthetic defect pasted in (``probe_distances``,
``probe_defects``) with the same fold banks. Every candidate rule, with or without the
part mask, is then a cheap reduction of the same distances (``rule_scores``), so comparing
them costs one extra search, not one fit per candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ngcal.core.manifest import CandidateEvidence, FitChoice

from .model import PatchCore, PatchEmbedder
from .nn_search import nearest
from .probe_defects import ProbeDefects, paste_defects
from .rules import ImageRule, image_scores
from .selection import choose, format_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distances:
    """Patch distances ``dist`` [n, P] of n images to their fold's bank, the nearest bank
    rows ``idx`` [n, P] (None when no rule needs them), the features [n, h, w, D] and each
    image's fold ``fold`` [n]."""

    dist: torch.Tensor
    idx: torch.Tensor | None
    feats: torch.Tensor
    fold: torch.Tensor


def fold_distances(
    fold_models: Sequence[PatchCore],
    feats: torch.Tensor,
    fold: torch.Tensor,
    *,
    with_index: bool,
    batch: int = 2,
) -> Distances:
    """Distances of images ``feats`` [n, h, w, D] to the bank of their fold ``fold`` [n]."""
    n, h, w, d = feats.shape
    dist = torch.empty(n, h * w)
    idx = torch.empty(n, h * w, dtype=torch.long) if with_index else None
    with torch.inference_mode():
        for f, model in enumerate(fold_models):
            members = torch.nonzero(fold == f)[:, 0]
            for s in range(0, len(members), batch):
                sel = members[s : s + batch]
                q = feats[sel].reshape(-1, d)
                if idx is not None:
                    dv, iv = nearest(q, model.memory_bank, model.bank_sq, chunk=model.chunk)
                    idx[sel] = iv.reshape(len(sel), h * w)
                else:
                    dv, _ = model.patch_scores(feats[sel])
                dist[sel] = dv.reshape(len(sel), h * w)
    return Distances(dist, idx, feats, fold)


def rule_scores(
    fold_models: Sequence[PatchCore],
    dists: Distances,
    rule: ImageRule,
    mask: torch.Tensor | None = None,
) -> np.ndarray:
    """Image scores float64 [n] by ``rule``, each image with its fold bank's neighbourhoods;
    ``mask`` (float [h, w], the part mask) multiplies the patch distances first."""
    dist = dists.dist if mask is None else dists.dist * mask.reshape(1, -1)
    out = np.empty(dist.shape[0])
    with torch.inference_mode():
        for f, model in enumerate(fold_models):
            sel = torch.nonzero(dists.fold == f)[:, 0]
            if not len(sel):
                continue
            idx = None if dists.idx is None else dists.idx[sel]
            s = image_scores(rule, dists.feats[sel], dist[sel], idx, model.bank_neighbour_rows)
            out[sel.numpy()] = s.double().numpy()
    return out


def probe_inputs(count: int, n: int, seed: int) -> list[int]:
    """Indices of the ``count`` training images (of n) that get a synthetic defect."""
    g = torch.Generator().manual_seed(seed + 3)
    return sorted(torch.randperm(n, generator=g)[: min(count, n)].tolist())


def probe_features(
    embedder: PatchEmbedder,
    inputs: torch.Tensor,
    defects: ProbeDefects,
    *,
    batch: int,
    device: str,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch features [m, h, w, D] of model inputs [m, 3, H, W] with one small synthetic
    defect pasted into each (``probe_defects.paste_defects``; on the part where ``allowed``
    bool [H, W] is given)."""
    x = paste_defects(inputs, defects, allowed=allowed)
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(embedder(x[s : s + batch].to(device)).float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Probe:
    """How fit makes synthetic NG: ``load(indices)`` returns the model inputs
    [m, 3, H, W] of those training images; ``images`` how many get a defect."""

    load: Callable[[list[int]], np.ndarray]
    images: int
    seed: int
    batch: int
    device: str


def probe_distances(
    fold_models: Sequence[PatchCore],
    fold: torch.Tensor,
    probe: Probe,
    *,
    with_index: bool,
    allowed: torch.Tensor | None = None,
) -> Distances:
    """Fold-bank distances of ``probe.images`` training images with a synthetic defect
    each (on the part where ``allowed`` is given), each scored by its own fold's bank."""
    picks = probe_inputs(probe.images, int(fold.shape[0]), probe.seed)
    inputs = torch.from_numpy(probe.load(picks))
    defects = ProbeDefects(seed=probe.seed)
    pf = probe_features(
        fold_models[0].embedder,
        inputs,
        defects,
        batch=probe.batch,
        device=probe.device,
        allowed=allowed,
    )
    return fold_distances(fold_models, pf, fold[picks], with_index=with_index)


def choose_rule(
    candidates: Sequence[ImageRule],
    fold_models: Sequence[PatchCore],
    held: Distances,
    ng: Distances,
    *,
    mask: torch.Tensor | None,
    seed: int,
) -> tuple[ImageRule, FitChoice]:
    """The image-score rule among ``candidates`` (the default first) that best separates
    held-out good images ``held`` from synthetic NG ``ng`` (both with the part mask
    ``mask`` applied when given), and its evidence."""
    table, won = choose(
        {r.label: rule_scores(fold_models, held, r, mask) for r in candidates},
        {r.label: rule_scores(fold_models, ng, r, mask) for r in candidates},
        seed=seed,
    )
    log.info("image score, held-out good vs synthetic NG:\n%s", format_table(table, won))
    choice = FitChoice(
        setting="image_score",
        chosen=won,
        n_normal=int(held.dist.shape[0]),
        n_ng=int(ng.dist.shape[0]),
        candidates=tuple(CandidateEvidence(**asdict(e)) for e in table),
    )
    return next(r for r in candidates if r.label == won), choice


#: labels of the foreground candidates (the default first)
WHOLE_FRAME, PART_MASK = "whole_frame", "part_mask"


def choose_foreground(
    rule: ImageRule,
    fold_models: Sequence[PatchCore],
    held: Distances,
    ng: Distances,
    mask: torch.Tensor,
    *,
    seed: int,
) -> tuple[bool, FitChoice]:
    """Whether the part ``mask`` [h, w] separates held-out good ``held`` from synthetic NG
    on the part ``ng`` better than the whole frame under ``rule`` (the same bootstrap
    guard as the rule: ``selection.choose``), and the evidence."""
    table, won = choose(
        {
            WHOLE_FRAME: rule_scores(fold_models, held, rule),
            PART_MASK: rule_scores(fold_models, held, rule, mask),
        },
        {
            WHOLE_FRAME: rule_scores(fold_models, ng, rule),
            PART_MASK: rule_scores(fold_models, ng, rule, mask),
        },
        seed=seed,
    )
    log.info("foreground, held-out good vs synthetic NG:\n%s", format_table(table, won))
    choice = FitChoice(
        setting="foreground",
        chosen=won,
        n_normal=int(held.dist.shape[0]),
        n_ng=int(ng.dist.shape[0]),
        candidates=tuple(CandidateEvidence(**asdict(e)) for e in table),
    )
    return won == PART_MASK, choice
