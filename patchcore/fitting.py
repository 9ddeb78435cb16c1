"""Fit a PatchCore model directory: features, coreset, leave-one-out and cross-fitted scores.

Pipeline (Roth et al., CVPR 2022, plus the normal evidence calibration needs):
1. locally aware patch features of every training image (``PatchEmbedder``);
2. greedy k-center coresets (``coreset``): the full bank (``coreset_ratio`` of all patches)
   and, with ``cv_folds`` = K >= 2, one bank per fold fitted on the other K-1 folds. To keep
   the fit fast on CPU, fold banks select from a random ``fold_sample`` fraction of the
   patches (same bank density as the full bank), all K in one lockstep pass; a fold bank is
   thus slightly sparser in coverage than the full one, which errs towards higher (safer)
   holdout scores; ``fold_sample=1`` removes the difference at about 3x the coreset time;
3. ``normal_loo``: each training image scored against the full bank minus the rows that
   came from it (its own patches would score ~0);
4. ``normal_holdout``: each image scored by the bank of the fold that did not see it
   (cross-fitting), the closest thing to unseen good parts the training data offers;
   with ``foreground`` on or auto, a part mask is learnt from the training images
   (``foreground``) and, with auto, kept only when it separates held-out good images
   from synthetic NG on the part better (``auto.choose_foreground``); with
   ``image_score="auto"`` the rule is chosen the same way (``auto.choose_rule``);
5. the model directory, written to a temporary sibling and renamed into place.

An unreadable training image stops the fit with a DataError naming the file (a model must
not silently depend on which files happened to decode).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch

from ngcal.core.errors import ConfigError, DataError
from ngcal.core.manifest import (
    FitChoice,
    ModelManifest,
    PatchCoreSpec,
    Preprocessing,
    write_manifest,
)
from ngcal.core.scoresets import ScoreSet, save_scoreset

from . import io as mio
from .auto import (
    WHOLE_FRAME,
    Distances,
    Probe,
    choose_foreground,
    choose_rule,
    fold_distances,
    probe_distances,
    rule_scores,
)
from .backbones import LITE0, default_preprocessing, load_backbone
from .coreset import CoresetRun, greedy_coresets, random_projection
from .foreground import PartMask, PartMaskLearner
from .model import PatchCore, PatchEmbedder
from .nn_search import nearest, nearest_distance, squared_norms
from .rules import ImageRule, image_scores
from .selection import CANDIDATE_RULES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Options of ``ngcal fit``; defaults are the measured best on the magnetic-tile data."""

    backbone: str = LITE0
    weights: str | None = None
    allow_download: bool = False
    image_size: int = 256
    #: input (height, width) when not square (``geometry.keep_aspect_hw``); overrides
    #: ``image_size``
    input_hw: tuple[int, int] | None = None
    coreset_ratio: float = 0.01
    coreset_proj_dim: int | None = 32
    projection_dim: int | None = None
    cv_folds: int = 5
    fold_sample: float = 0.25
    seed: int = 0
    device: str = "cpu"
    #: an ``IMAGE_SCORE_RULES`` name, or "auto": chosen among ``selection.CANDIDATE_RULES``
    #: by held-out good vs synthetic NG (needs cv_folds >= 2; else the default rule)
    image_score: str = "topk_mean"
    topk: int = 10
    #: training images that get a synthetic defect when the rule is chosen
    probe_images: int = 96
    #: "fixed": ``image_size``/``input_hw`` as given; "auto": chosen among the square, the
    #: aspect kept and one size up (``auto_geometry``) before the fit
    geometry: str = "fixed"
    #: part mask over the patch grid (``foreground``): "off", "on" (learnt and used), or
    #: "auto" (learnt, kept when it separates held-out good from synthetic NG better)
    foreground: str = "off"
    reweight_neighbors: int = 9
    smoothing_sigma: float = 4.0
    #: images per forward pass during extraction; None: 4 on CPU, where small batches stay
    #: in cache (measured faster per image than 16 for Lite0 at 256 px), 32 on GPU
    batch_size: int | None = None
    progress: bool = False

    @property
    def rule_candidates(self) -> tuple[ImageRule, ...]:
        """The rules fit compares: every candidate with "auto", else the one configured."""
        if self.image_score == "auto":
            return CANDIDATE_RULES
        return (ImageRule(self.image_score, self.topk),)

    @property
    def extraction_batch(self) -> int:
        """``batch_size``, or the measured default for the device."""
        if self.batch_size is not None:
            return self.batch_size
        return 4 if self.device == "cpu" else 32

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size}: must be >= 1")
        if not 0 < self.coreset_ratio <= 1:
            raise ConfigError(f"--coreset-ratio {self.coreset_ratio}: must be in (0, 1]")
        if self.image_score != "auto":
            ImageRule(self.image_score, self.topk)  # ConfigError on an unknown rule or k < 1
        if self.geometry not in ("fixed", "auto"):
            raise ConfigError(f"geometry {self.geometry!r}: fixed or auto")
        if self.foreground not in ("off", "on", "auto"):
            raise ConfigError(f"--foreground {self.foreground!r}: one of auto, on, off")
        if self.probe_images < 2:
            raise ConfigError(f"probe images {self.probe_images}: must be >= 2")
        if not 0 < self.fold_sample <= 1:
            raise ConfigError(f"--fold-sample {self.fold_sample}: must be in (0, 1]")
        if self.cv_folds == 1 or self.cv_folds < 0:
            raise ConfigError(f"--cv-folds {self.cv_folds}: 0 (off) or at least 2")


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` wrote: the manifest and where, plus timings in seconds."""

    root: Path
    manifest: ModelManifest
    timings: dict[str, float] = field(default_factory=dict)


def extract_features(
    embedder: PatchEmbedder,
    paths: Sequence[Path],
    spec_pre: Preprocessing,
    *,
    batch_size: int,
    device: str,
    progress: bool,
    on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Patch features of every image: float32 [n, h, w, D]; DataError on an unreadable file.
    ``on_batch(inputs [b, 3, H, W], features [b, h, w, D])`` sees every batch."""
    out: list[torch.Tensor] = []
    bar = mio._bar(len(paths), progress, "features")
    with torch.inference_mode():
        for s in range(0, len(paths), batch_size):
            chunk = paths[s : s + batch_size]
            batch, _ok, errors = mio.load_batch(chunk, spec_pre)
            if errors:
                p, reason = errors[0]
                raise DataError(
                    f"{p}: unreadable training image ({reason}); fix or remove it and fit again"
                )
            x = torch.from_numpy(batch)
            out.append(embedder(x.to(device)).float().cpu())
            if on_batch is not None:
                on_batch(x, out[-1])
            bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def loo_scores(
    model: PatchCore, feats: torch.Tensor, source: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out image scores [n] and patch distances [n * P] of the training images.

    Image i is scored against the bank without rows whose ``source`` is i, with the same
    rule as ``model.image_score`` (neighbourhoods of the reweighting also exclude them).
    """
    n, h, w, d = feats.shape
    bank, bank_sq = model.memory_bank, model.bank_sq
    scores = np.empty(n)
    patch = np.empty((n, h * w), dtype=np.float32)
    with torch.inference_mode():
        for i in range(n):
            own = source == i
            q = feats[i].reshape(-1, d)
            if model.needs_index:
                dist, idx = nearest(q, bank, bank_sq, exclude=own)
            else:
                dist, idx = nearest_distance(q, bank, bank_sq, exclude=own), None
            patch[i] = dist.numpy()
            rows = None if idx is None else idx[None]
            nbrs = _neighbours_excluding(model, own)
            masked = model.masked(dist[None])
            scores[i] = float(image_scores(model.rule, q[None], masked, rows, nbrs)[0])
    return scores, patch.reshape(-1)


def _neighbours_excluding(
    model: PatchCore, own: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reweighting's bank neighbourhoods [N, b, D] of rows m_star [N] among the bank rows
    not in ``own`` (bool [M]): m* first, then its nearest other rows."""
    bank = model.memory_bank
    b = min(model.reweight_neighbors, int((~own).sum()))

    def rows(m_star: torch.Tensor) -> torch.Tensor:
        out = []
        for m in m_star.tolist():
            d2 = squared_norms(bank - bank[m][None]).masked_fill(own, float("inf"))
            d2[m] = -1.0  # m* itself first
            out.append(bank[d2.topk(b, largest=False).indices])
        return torch.stack(out)

    return rows


def fold_assignment(n: int, cfg: FitConfig) -> tuple[int, torch.Tensor]:
    """Cross-fitting folds K (0: none; fewer images than ``cv_folds`` means none) and each
    of the n images' fold [n] (a seeded permutation, dealt round robin)."""
    folds = cfg.cv_folds if cfg.cv_folds >= 2 and n >= cfg.cv_folds else 0
    fold_of = torch.zeros(n, dtype=torch.long)
    if folds:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        fold_of[perm] = torch.arange(n) % folds
    return folds, fold_of


def fold_banks(
    flat: torch.Tensor, owner: torch.Tensor, fold_of: torch.Tensor, folds: int, cfg: FitConfig
) -> list[torch.Tensor]:
    """Row indices into ``flat`` [n*P, D] of each fold's bank (patches of the other folds;
    ``owner`` [n*P] is each patch's image): greedy on a random ``fold_sample`` fraction of
    the patches, all folds in one lockstep pass, each as large as the full-data ratio
    implies for its K-1 folds. Empty without folds."""
    if not folds:
        return []
    pool = torch.arange(flat.shape[0])
    if cfg.fold_sample < 1.0:
        g = torch.Generator().manual_seed(cfg.seed + 2)
        count = max(1, int(cfg.fold_sample * flat.shape[0]))
        pool = torch.randperm(flat.shape[0], generator=g)[:count].sort().values
    runs = []
    for f in range(folds):
        size = max(1, math.ceil(cfg.coreset_ratio * int((fold_of[owner] != f).sum())))
        runs.append(CoresetRun(size, fold_of[owner[pool]] != f))
    picked = greedy_coresets(
        flat[pool], runs, proj_dim=cfg.coreset_proj_dim, seed=cfg.seed, progress=cfg.progress
    )
    return [pool[s] for s in picked]


def fit(
    paths: Sequence[Path], out: str | Path, cfg: FitConfig, item_ids: Sequence[str]
) -> FitResult:
    """Fit on good images ``paths`` and write the model directory ``out`` (replaced atomically)."""
    t0 = time.perf_counter()
    n = len(paths)
    if n < 2:
        raise DataError(f"{n} training image(s): PatchCore needs at least 2 (leave-one-out)")
    prior: tuple[FitChoice, ...] = ()
    if cfg.geometry == "auto":
        # imported here: auto_geometry builds on this module's extraction and fold banks
        from .auto_geometry import choose_geometry, geometry_candidates
        from .geometry import median_aspect

        cands = geometry_candidates(cfg.image_size, median_aspect(paths))
        g, gchoice = choose_geometry(paths, cfg, cands)
        square = g.hw[0] == g.hw[1]
        cfg = replace(
            cfg, geometry="fixed", image_size=max(g.hw), input_hw=None if square else g.hw
        )
        prior = () if gchoice is None else (gchoice,)
    t_geo = time.perf_counter()
    pre = default_preprocessing(cfg.backbone, cfg.image_size)
    if cfg.input_hw is not None:
        pre = pre.model_copy(update={"image_size": max(cfg.input_hw), "input_hw": cfg.input_hw})
    bb = load_backbone(cfg.backbone, weights=cfg.weights, allow_download=cfg.allow_download)
    raw_dim = sum(bb.channels)
    projection = None
    if cfg.projection_dim is not None and cfg.projection_dim < raw_dim:
        projection = random_projection(raw_dim, cfg.projection_dim, cfg.seed + 1)
    embedder = PatchEmbedder(bb.module, projection=projection).to(cfg.device).eval()
    learners: list[PartMaskLearner] = []

    def learn(x: torch.Tensor, f: torch.Tensor) -> None:
        if not learners:
            learners.append(PartMaskLearner((int(f.shape[1]), int(f.shape[2]))))
        learners[0].add(x)

    feats = extract_features(
        embedder,
        paths,
        pre,
        batch_size=cfg.extraction_batch,
        device=cfg.device,
        progress=cfg.progress,
        on_batch=learn if cfg.foreground != "off" else None,
    )
    part = learners[0].mask() if learners else None
    t_feat = time.perf_counter()
    _, h, w, d = feats.shape
    flat = feats.reshape(-1, d)
    owner = torch.arange(n).repeat_interleave(h * w)

    folds, fold_of = fold_assignment(n, cfg)
    main_size = max(1, math.ceil(cfg.coreset_ratio * flat.shape[0]))
    (main_idx,) = greedy_coresets(
        flat,
        [CoresetRun(main_size)],
        proj_dim=cfg.coreset_proj_dim,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    t_main = time.perf_counter()
    fold_idx = fold_banks(flat, owner, fold_of, folds, cfg)
    t_core = time.perf_counter()

    bank = flat[main_idx].contiguous()
    source = owner[main_idx]
    fold_models = [
        _patchcore(embedder, flat[fold_idx[f]].contiguous(), cfg, ImageRule()) for f in range(folds)
    ]
    probe = Probe(
        load=lambda picks: mio.load_batch([paths[i] for i in picks], pre)[0],
        images=cfg.probe_images,
        seed=cfg.seed,
        batch=cfg.extraction_batch,
        device=cfg.device,
    )
    held = None
    if fold_models:
        with_index = any(r.needs_index for r in cfg.rule_candidates)
        held = fold_distances(fold_models, feats, fold_of, with_index=with_index)
    rule, mask, choices = _choose(cfg, fold_models, held, fold_of, probe, part, pre.hw)
    t_hold = time.perf_counter()
    holdout = rule_scores(fold_models, held, rule, mask) if held is not None else np.full(n, np.nan)
    model = _patchcore(embedder, bank, cfg, rule, mask)
    loo, loo_patch = loo_scores(model, feats, source)
    t_loo = time.perf_counter()

    q50, q90, q99 = np.quantile(loo_patch, [0.5, 0.9, 0.99]).tolist()
    timings = {
        "geometry_seconds": t_geo - t0,
        "extract_seconds": t_feat - t_geo,
        "coreset_seconds": t_main - t_feat,
        "fold_coreset_seconds": t_core - t_main,
        "holdout_seconds": t_hold - t_core,
        "loo_seconds": t_loo - t_hold,
    }
    spec = PatchCoreSpec(
        feature_dim=d,
        raw_feature_dim=raw_dim,
        feature_map_size=(h, w),
        neighbourhood=3,
        coreset_ratio=cfg.coreset_ratio,
        coreset_size=int(bank.shape[0]),
        num_train_images=n,
        image_score=rule.name,
        image_score_k=rule.manifest_k,
        reweight_neighbors=cfg.reweight_neighbors,
        smoothing_sigma=cfg.smoothing_sigma,
        seed=cfg.seed,
        choices=prior + choices,
        foreground=mio.FOREGROUND_FILE if mask is not None else None,
        stats={
            **(
                {"foreground_coverage": part.coverage, "foreground_contrast": part.contrast}
                if part is not None
                else {}
            ),
            "loo_patch_nn_p50": q50,
            "loo_patch_nn_p90": q90,
            "loo_patch_nn_p99": q99,
            "coreset_proj_dim": float(cfg.coreset_proj_dim or 0),
            "cv_folds": float(folds),
            "fold_sample": float(cfg.fold_sample),
            **{k: round(v, 3) for k, v in timings.items()},
        },
    )
    manifest = ModelManifest(backbone=bb.spec, preprocessing=pre, patchcore=spec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        final = _write_model_dir(
            tmp,
            out,
            manifest,
            bb.module,
            bank,
            source,
            projection,
            mask,
            loo,
            holdout,
            folds,
            fold_of,
            item_ids,
            {"image_score": rule.label, "image_size": pre.image_size, "cv_folds": folds},
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["fit_seconds"] = time.perf_counter() - t0
    log.info("fitted %s in %.1f s (%s)", out, timings["fit_seconds"], timings)
    return FitResult(root=out, manifest=final, timings=timings)


def _write_model_dir(
    tmp: Path,
    out: Path,
    manifest: ModelManifest,
    backbone: torch.nn.Module,
    bank: torch.Tensor,
    source: torch.Tensor,
    projection: torch.Tensor | None,
    mask: torch.Tensor | None,
    loo: np.ndarray,
    holdout: np.ndarray,
    folds: int,
    fold_of: torch.Tensor,
    item_ids: Sequence[str],
    meta: dict[str, str | int],
) -> ModelManifest:
    """Fill ``tmp``, write its manifest last, then move it to ``out``."""
    os.chmod(tmp, 0o755)
    mio.save_backbone(tmp, backbone)
    mio.save_arrays(
        tmp,
        bank.numpy(),
        source.numpy(),
        None if projection is None else projection.numpy(),
        None if mask is None else mask.numpy(),
    )
    save_scoreset(
        tmp / "scores" / "normal_loo.json", ScoreSet("normal_loo", loo, tuple(item_ids), meta=meta)
    )
    if folds:
        groups = tuple(f"fold{int(f)}" for f in fold_of.tolist())
        save_scoreset(
            tmp / "scores" / "normal_holdout.json",
            ScoreSet("normal_holdout", holdout, tuple(item_ids), groups=groups, meta=meta),
        )
    final = write_manifest(tmp, manifest)
    mio.replace_dir(tmp, out)
    return cast(ModelManifest, final)


def _choose(
    cfg: FitConfig,
    fold_models: Sequence[PatchCore],
    held: Distances | None,
    fold_of: torch.Tensor,
    probe: Probe,
    part: PartMask | None,
    hw: tuple[int, int],
) -> tuple[ImageRule, torch.Tensor | None, tuple[FitChoice, ...]]:
    """The image-score rule, the part mask [h, w] (None: whole frame) and the evidence of
    each choice made (``auto``): the mask first, under the default rule, with synthetic NG
    on the part; then the rule, under the mask kept, on the same NG where possible."""
    candidates = cfg.rule_candidates
    rule = candidates[0]
    with_index = any(r.needs_index for r in candidates)
    n = int(fold_of.shape[0])
    mask: torch.Tensor | None = None
    ng_part: Distances | None = None
    choices: list[FitChoice] = []
    if part is not None:
        problem = part.problem()
        grid_mask = torch.from_numpy(part.grid)
        if cfg.foreground == "on":
            if problem:
                log.warning("--foreground on: %s; the mask is used as asked", problem)
            mask = grid_mask
        elif problem or held is None:
            note = problem or "no cross-fitting folds to compare on"
            log.info("foreground: whole frame kept (%s)", note)
            choices.append(
                FitChoice(setting="foreground", chosen=WHOLE_FRAME, n_normal=n, n_ng=0, note=note)
            )
        else:
            ng_part = probe_distances(
                fold_models, fold_of, probe, with_index=with_index, allowed=part.allowed(hw)
            )
            use, choice = choose_foreground(
                rule, fold_models, held, ng_part, grid_mask, seed=cfg.seed
            )
            choices.append(choice)
            mask = grid_mask if use else None
    if len(candidates) > 1:
        if held is None:
            log.warning("no cross-fitting folds: keeping image score %s", rule.label)
        else:
            ng = ng_part if mask is not None else None
            if ng is None:
                allowed = part.allowed(hw) if mask is not None and part is not None else None
                ng = probe_distances(
                    fold_models, fold_of, probe, with_index=with_index, allowed=allowed
                )
            rule, choice = choose_rule(candidates, fold_models, held, ng, mask=mask, seed=cfg.seed)
            choices.append(choice)
    return rule, mask, tuple(choices)


def _patchcore(
    embedder: PatchEmbedder,
    bank: torch.Tensor,
    cfg: FitConfig,
    rule: ImageRule,
    mask: torch.Tensor | None = None,
) -> PatchCore:
    return PatchCore(
        embedder,
        bank,
        image_size=max(cfg.input_hw) if cfg.input_hw else cfg.image_size,
        image_hw=cfg.input_hw,
        image_score=rule.name,
        topk=rule.k,
        reweight_neighbors=cfg.reweight_neighbors,
        smoothing_sigma=cfg.smoothing_sigma,
        foreground=mask,
    ).eval()
