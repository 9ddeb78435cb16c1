"""Fit-time evidence: cross-fitted patch distances of good images and of synthetic NG.

``fit`` scores every training image with the bank of the fold that did not see it
(``heldout_distances``) and, when it chooses the image-score rule, a sample of those images
with one small synthetic defect pasted in (``probe_distances``, ``probe_defects``) with the
same fold banks. Every candidate rule is then a cheap reduction of the same distances
(``rule_scores``), so comparing rules costs one extra search, not one fit per rule.
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


def rule_scores(fold_models: Sequence[PatchCore], dists: Distances, rule: ImageRule) -> np.ndarray:
    """Image scores float64 [n] by ``rule``, each image with its fold bank's neighbourhoods."""
    out = np.empty(dists.dist.shape[0])
    with torch.inference_mode():
        for f, model in enumerate(fold_models):
            sel = torch.nonzero(dists.fold == f)[:, 0]
            if not len(sel):
                continue
            idx = None if dists.idx is None else dists.idx[sel]
            s = image_scores(
                rule, dists.feats[sel], dists.dist[sel], idx, model.bank_neighbour_rows
            )
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
) -> torch.Tensor:
    """Patch features [m, h, w, D] of model inputs [m, 3, H, W] with one small synthetic
    defect pasted into each (``probe_defects.paste_defects``)."""
    x = paste_defects(inputs, defects)
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(embedder(x[s : s + batch].to(device)).float().cpu())
    return torch.cat(out)


def choose_rule(
    candidates: Sequence[ImageRule],
    fold_models: Sequence[PatchCore],
    feats: torch.Tensor,
    fold: torch.Tensor,
    *,
    probe: Callable[[list[int]], np.ndarray],
    probe_images: int,
    seed: int,
    batch: int,
    device: str,
) -> tuple[ImageRule, FitChoice | None, Distances | None]:
    """The image-score rule among ``candidates`` that best separates held-out good images
    from synthetic NG, its evidence, and the held-out distances (None without folds).

    ``feats`` [n, h, w, D] are the training images' features, ``fold`` [n] their folds and
    ``fold_models`` the fold banks; ``probe(indices)`` returns the model inputs
    [m, 3, H, W] of those training images (they get the synthetic defects). With one
    candidate nothing is chosen; without folds the first candidate is kept.
    """
    if not fold_models:
        if len(candidates) > 1:
            log.warning("no cross-fitting folds: keeping image score %s", candidates[0].label)
        return candidates[0], None, None
    with_index = any(r.needs_index for r in candidates)
    held = fold_distances(fold_models, feats, fold, with_index=with_index)
    if len(candidates) == 1:
        return candidates[0], None, held
    picks = probe_inputs(probe_images, int(feats.shape[0]), seed)
    inputs = torch.from_numpy(probe(picks))
    defects = ProbeDefects(seed=seed)
    pf = probe_features(fold_models[0].embedder, inputs, defects, batch=batch, device=device)
    ng = fold_distances(fold_models, pf, fold[picks], with_index=with_index)
    table, won = choose(
        {r.label: rule_scores(fold_models, held, r) for r in candidates},
        {r.label: rule_scores(fold_models, ng, r) for r in candidates},
        seed=seed,
    )
    log.info("image score, held-out good vs synthetic NG:\n%s", format_table(table, won))
    choice = FitChoice(
        setting="image_score",
        chosen=won,
        n_normal=int(feats.shape[0]),
        n_ng=len(picks),
        candidates=tuple(CandidateEvidence(**asdict(e)) for e in table),
    )
    return next(r for r in candidates if r.label == won), choice, held
