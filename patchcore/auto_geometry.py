"""``fit --auto``'s input geometry: square, aspect kept, or one size up, chosen from good
images and synthetic NG only, within a latency budget.

Candidates (``geometry_candidates``): the default square, the training images' median
aspect at about the square's pixel count (``geometry.keep_aspect_area``: about the same
compute; left out when it rounds to the square) and that aspect at ``HIGHER`` times the
pixels (288 x 288 for a square product). Each is fitted on the same seeded
sample of the training images (``SAMPLE``; all of them when fewer) with the same folds:
features at that size, fold banks, held-out good scores, and the same probe images with
the same synthetic defects (``probe_defects``: areas are shares of the frame, positions
relative, so they match across sizes), all under the default rule on the whole frame.
Separation and the paired bootstrap guard are ``selection.choose``'s. A candidate whose
measured time per image (the PatchCore forward, torch, batch 1, at the full bank's size,
timed interleaved with the default) exceeds ``LATENCY_BUDGET`` times the default's cannot
be chosen; its evidence is still reported.

The main fit then runs once at the chosen size (and chooses the part mask and the rule
there), so the comparison costs about (candidates x (SAMPLE + probe images)) extractions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ngcal.core.manifest import CandidateEvidence, FitChoice, Preprocessing

from . import io as mio
from .auto import Probe, fold_distances, probe_distances, rule_scores
from .backbones import default_preprocessing, load_backbone
from .coreset import random_projection
from .fitting import FitConfig, extract_features, fold_assignment, fold_banks
from .geometry import keep_aspect_area
from .model import PatchCore, PatchEmbedder
from .selection import choose, format_table

log = logging.getLogger(__name__)

#: training images each geometry candidate is fitted on for the comparison
SAMPLE = 160
#: a candidate's time per image may be at most this multiple of the default's
LATENCY_BUDGET = 1.5
#: pixels of the larger candidate over the default's (288 x 288 for a square product)
HIGHER = (288 / 256) ** 2
#: timed forwards per candidate (after two warm-ups), interleaved
TIMING_REPEATS = 7


@dataclass(frozen=True)
class Geometry:
    """One input geometry: (height, width)."""

    hw: tuple[int, int]

    @property
    def label(self) -> str:
        """``HxW``, e.g. ``288x256``."""
        return f"{self.hw[0]}x{self.hw[1]}"


def geometry_candidates(size: int, aspect: float, *, higher: float = HIGHER) -> list[Geometry]:
    """The square default ``size``, the aspect kept at the square's pixel count, and the
    aspect kept at ``higher`` times it (duplicates dropped; the default first)."""
    out = [Geometry((size, size))]
    for scale in (1.0, higher):
        g = Geometry(keep_aspect_area(size, aspect, scale=scale))
        if g.hw not in [c.hw for c in out]:
            out.append(g)
    return out


def _forward_ms(models: dict[str, PatchCore], x: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median ms of one batch-1 forward of each model, timed interleaved."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for k, m in models.items():
            for _ in range(2):
                m(x[k])
        for _ in range(TIMING_REPEATS):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x[k])
                times[k].append((time.perf_counter() - t0) * 1000.0)
    return {k: float(np.median(v)) for k, v in times.items()}


def choose_geometry(
    paths: Sequence[Path], cfg: FitConfig, candidates: Sequence[Geometry], *, sample: int = SAMPLE
) -> tuple[Geometry, FitChoice | None]:
    """The geometry among ``candidates`` (the default first) that best separates held-out
    good images from synthetic NG within the latency budget, and its evidence (None, and
    the default, without enough images for cross-fitting or with one candidate)."""
    if len(candidates) < 2:
        return candidates[0], None
    n_all = len(paths)
    keep = sorted(
        torch.randperm(n_all, generator=torch.Generator().manual_seed(cfg.seed + 5))[
            : min(sample, n_all)
        ].tolist()
    )
    sub = [paths[i] for i in keep]
    folds, fold_of = fold_assignment(len(sub), cfg)
    if not folds:
        log.warning("too few images for cross-fitting: keeping geometry %s", candidates[0].label)
        return candidates[0], None
    bb = load_backbone(cfg.backbone, weights=cfg.weights, allow_download=cfg.allow_download)
    raw_dim = sum(bb.channels)
    projection = None
    if cfg.projection_dim is not None and cfg.projection_dim < raw_dim:
        projection = random_projection(raw_dim, cfg.projection_dim, cfg.seed + 1)
    embedder = PatchEmbedder(bb.module, projection=projection).to(cfg.device).eval()
    rule = cfg.rule_candidates[0]
    normal: dict[str, np.ndarray] = {}
    ng: dict[str, np.ndarray] = {}
    timed: dict[str, PatchCore] = {}
    x1: dict[str, torch.Tensor] = {}
    quiet = replace(cfg, progress=False)
    for g in candidates:
        pre = default_preprocessing(cfg.backbone, max(g.hw))
        if g.hw[0] != g.hw[1]:
            pre = pre.model_copy(update={"input_hw": g.hw})
        feats = extract_features(
            embedder, sub, pre, batch_size=cfg.extraction_batch, device=cfg.device, progress=False
        )
        n, h, w, d = feats.shape
        flat = feats.reshape(-1, d)
        owner = torch.arange(n).repeat_interleave(h * w)
        idx = fold_banks(flat, owner, fold_of, folds, quiet)
        models = [_module(embedder, flat[i].contiguous(), g, cfg) for i in idx]
        held = fold_distances(models, feats, fold_of, with_index=rule.needs_index)
        probe = Probe(
            load=_loader(sub, pre),
            images=min(cfg.probe_images, len(sub)),
            seed=cfg.seed,
            batch=cfg.extraction_batch,
            device=cfg.device,
        )
        probed = probe_distances(models, fold_of, probe, with_index=rule.needs_index)
        normal[g.label] = rule_scores(models, held, rule)
        ng[g.label] = rule_scores(models, probed, rule)
        # timing at the full fit's bank size (rows drawn from this sample's patches)
        rows = max(1, math.ceil(cfg.coreset_ratio * n_all * h * w))
        pick = torch.randint(0, flat.shape[0], (rows,), generator=torch.Generator().manual_seed(0))
        timed[g.label] = _module(embedder, flat[pick].contiguous(), g, cfg)
        x1[g.label] = torch.from_numpy(mio.load_batch(sub[:1], pre)[0]).to(cfg.device)
    ms = _forward_ms(timed, x1)
    base = ms[candidates[0].label]
    eligible = [g.label for g in candidates if ms[g.label] <= LATENCY_BUDGET * base]
    table, won = choose(normal, ng, seed=cfg.seed, eligible=eligible)
    table = [replace(e, ms_per_image=round(ms[e.candidate], 2)) for e in table]
    log.info("geometry, held-out good vs synthetic NG:\n%s", format_table(table, won))
    choice = FitChoice(
        setting="geometry",
        chosen=won,
        n_normal=len(sub),
        n_ng=int(len(next(iter(ng.values())))),
        candidates=tuple(CandidateEvidence(**asdict(e)) for e in table),
        note=None,
    )
    return next(g for g in candidates if g.label == won), choice


def _loader(paths: Sequence[Path], pre: Preprocessing) -> Callable[[list[int]], np.ndarray]:
    """``Probe.load`` over ``paths`` at ``pre``."""

    def load(picks: list[int]) -> np.ndarray:
        return mio.load_batch([paths[i] for i in picks], pre)[0]

    return load


def _module(embedder: PatchEmbedder, bank: torch.Tensor, g: Geometry, cfg: FitConfig) -> PatchCore:
    rule = cfg.rule_candidates[0]
    return PatchCore(
        embedder,
        bank,
        image_size=max(g.hw),
        image_hw=g.hw,
        image_score=rule.name,
        topk=rule.k,
        reweight_neighbors=cfg.reweight_neighbors,
        smoothing_sigma=cfg.smoothing_sigma,
    ).eval()
