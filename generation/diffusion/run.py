"""``ngcal generate diffusion``: draw targets, paint candidates, gate them, score the kept ones.

Pipeline: load the PatchCore model (its input size is the working resolution); read the real
NG references (``--ng``, none = zero-NG mode); pick ``count`` good training images (seeded)
and one target mask each (``targets``), round-robin over the defect types; let the backend
prepare (train or load) and paint ``candidates`` candidates per target; run the gate on every
candidate; of each target's passing candidates keep the one least like its good image; score
the kept images with the model as real images: decoded and preprocessed as
``ngcal.patchcore.io.score_paths`` does, by the leave-group-out PatchCore that never saw the
good image they were painted on (``ngcal.generation.heldout``, as GLASS's sets).

Outputs under ``out`` (like GLASS's): ``scores/diffusion.json`` (source ``diffusion``, group =
defect type), ``images/<k>.png`` and ``masks/<k>_mask.png`` (every candidate; the mask is the
label re-derived from the actual change), ``index.json`` (one record per candidate, accepted
or not, with every gate figure), ``contact_sheet.png`` (good | mask | NG triples, kept and
rejected marked) and ``diffusion_run.json`` (options, backend record, counts).

``index.json`` also records each kept image's full-model score (``score_full_model``): the
memory bank holds the good image's own patches, so that score is biased low.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ngcal.core.errors import ConfigError
from ngcal.core.files import atomic_write_json
from ngcal.core.images import load_rgb, normalize, resize_rgb
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.patchcore.io import LoadedModel

from ..heldout import HeldOutScorer, TrainImage, bank_sources, training_index
from ..las import contact_sheet, save_png
from ..perlin import cells_to_pixels, otsu_foreground, pool_to_grid
from .backend import Candidate, DefectBackend, Reference, Request
from .fewshot import ZERO_NG_GROUP, FewShotBackend, FewShotConfig
from .gate import (
    Check,
    GateConfig,
    check_background,
    check_copy,
    check_drawn,
    check_feature,
    check_label,
    check_seam,
    derived_mask,
    loo_spread,
    nn_median,
    seam_limit,
    verdict,
)
from .placement import GuidedRequest
from .targets import draw_placed_target, load_references

log = logging.getLogger(__name__)

BackendName = Literal["fewshot", "pretrained"]


@dataclass(frozen=True)
class DiffusionOptions:
    """Options of ``generate_diffusion`` (the CLI's flags)."""

    count: int = 32
    candidates: int = 2
    backend: BackendName = "fewshot"
    model_path: str | None = None
    ng: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"
    foreground: bool = False
    pool_images: int = 32
    sd_resolution: int = 512
    sd_steps: int = 30
    sd_mode: str = "auto"
    sd_strength: float | None = None
    lora_steps: int | None = None
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.count < 1 or self.candidates < 1 or self.pool_images < 1:
            raise ConfigError(
                f"count {self.count}, candidates {self.candidates} and pool_images "
                f"{self.pool_images} must all be >= 1"
            )
        if self.backend == "pretrained" and not self.model_path:
            raise ConfigError("--backend pretrained needs --model-path (a local SD folder)")


@dataclass(frozen=True)
class DiffusionOutput:
    """What ``generate_diffusion`` wrote."""

    scoreset: ScoreSet
    out: Path
    contact_sheet: Path
    summary: dict[str, object]


def make_backend(options: DiffusionOptions, device: torch.device) -> DefectBackend:
    """The backend named in ``options``."""
    if options.backend == "fewshot":
        cfg = options.fewshot
        if cfg.seed != options.seed:
            cfg = FewShotConfig(**{**asdict(cfg), "seed": options.seed})
        return FewShotBackend(cfg, device=str(device))
    from .pretrained import PretrainedBackend, PretrainedConfig
    from .pretrained_lora import LoraSettings

    lora = LoraSettings() if options.lora_steps is None else LoraSettings(steps=options.lora_steps)
    return PretrainedBackend(
        PretrainedConfig(
            model_path=str(options.model_path),
            seed=options.seed,
            resolution=options.sd_resolution,
            steps=options.sd_steps,
            mode=options.sd_mode,
            strength=options.sd_strength,
            lora=lora,
        ),
        device=str(device),
    )


@torch.no_grad()
def _embed(loaded: LoadedModel, images: Sequence[np.ndarray], batch: int = 8) -> np.ndarray:
    """PatchCore features of uint8 RGB images at model size: float32 [N, h, w, D]."""
    spec = loaded.manifest.preprocessing
    device = next(loaded.module.buffers()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([normalize(im, spec) for im in images[i : i + batch]]))
        out.append(loaded.module.embed(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.float32)


def _real_features(
    loaded: LoadedModel, refs: Sequence[Reference], grid: tuple[int, int]
) -> dict[str, list[np.ndarray]]:
    """Per defect type, the features of each real NG's defect cells [n_i, D]."""
    if not refs:
        return {}
    feats = _embed(loaded, [r.image for r in refs])
    out: dict[str, list[np.ndarray]] = {}
    for r, f in zip(refs, feats, strict=True):
        out.setdefault(r.group, []).append(f[pool_to_grid(r.mask, grid)])
    return out


def gate_all(
    requests: Sequence[Request],
    cands: list[list[Candidate]],
    training: Sequence[np.ndarray],
    refs: Sequence[Reference],
    loaded: LoadedModel,
    cfg: GateConfig,
) -> list[list[tuple[list[Check], np.ndarray]]]:
    """Every candidate's checks and derived label, in the shape of ``cands`` (``training``:
    the backend's training crops, for the near-copy check)."""
    grid = tuple(int(v) for v in loaded.manifest.patchcore.feature_map_size)
    per_ref = _real_features(loaded, refs, (grid[0], grid[1]))
    real = {g: np.concatenate(v) for g, v in per_ref.items()}
    spread = {g: loo_spread(v) for g, v in per_ref.items()}
    limits = {
        g: seam_limit([(r.image, r.mask) for r in refs if r.group == g], cfg)
        for g in {r.group for r in requests}
    }
    goods_f = _embed(loaded, [r.good for r in requests]) if real else None
    out = []
    for j, (req, row) in enumerate(zip(requests, cands, strict=True)):
        ng_f = _embed(loaded, [c.image for c in row]) if real else None
        cells = pool_to_grid(req.target, (grid[0], grid[1]))
        bank = real.get(req.group)
        if bank is None and real:
            bank = np.concatenate(list(real.values()))
        res = []
        for i, c in enumerate(row):
            derived = derived_mask(req.good, c.image, req.target, cfg.change_tau)
            d_ng = d_good = None
            if bank is not None and ng_f is not None and goods_f is not None and cells.any():
                d_ng = nn_median(ng_f[i][cells], bank)
                d_good = nn_median(goods_f[j][cells], bank)
            checks = [
                check_background(req.good, c.image, req.target),
                check_drawn(req.good, c.image, req.target, cfg),
                check_label(derived, req.target, cfg),
                check_seam(c.image, req.target, limits[req.group]),
                check_copy(c.crop, c.crop_mask, training, cfg),
                check_feature(d_ng, d_good, spread.get(req.group)),
            ]
            res.append((checks, derived))
        out.append(res)
    return out


def _pick_goods(
    loaded: LoadedModel, data: Path, n: int, rng: np.random.Generator
) -> list[TrainImage]:
    """``n`` distinct training images drawn with ``rng``, with their fit indices."""
    index = training_index(Path(loaded.root), data, loaded.manifest.patchcore.num_train_images)
    order = rng.permutation(len(index))
    return [index[int(i)] for i in order[:n]]


def score_heldout(
    loaded: LoadedModel, paths: Sequence[Path], fit_indices: Sequence[int], group: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(held-out scores, full-model scores) float64 [N] of image files.

    Each file is decoded and preprocessed exactly as ``score_paths`` does for a real image;
    the held-out score comes from the PatchCore without the memory bank rows of the good
    images these NG were painted on (``ngcal.generation.heldout``, as GLASS's sets), so the
    untouched background is as new to the model as a real image's.
    """
    from ngcal.core.images import load_and_preprocess

    spec = loaded.manifest.preprocessing
    device = next(loaded.module.buffers()).device
    scorer = HeldOutScorer(
        loaded.module, bank_sources(Path(loaded.root), loaded.module.memory_bank.shape[0])
    )
    held, full = np.zeros(len(paths)), np.zeros(len(paths))
    with torch.inference_mode():
        for s in range(0, len(paths), group):
            x = np.stack([load_and_preprocess(p, spec) for p in paths[s : s + group]])
            feats = loaded.module.embed(torch.from_numpy(x).to(device))
            _, sc = scorer.head(feats, list(fit_indices[s : s + group]))
            held[s : s + group] = sc.double().cpu().numpy()
            _, sc_full = loaded.module.head(feats)
            full[s : s + group] = sc_full.double().cpu().numpy()
    return held, full


def model_part_pixels(loaded: LoadedModel, shape: tuple[int, int]) -> np.ndarray | None:
    """The model's part mask (``fit --foreground``) as a bool pixel mask of ``shape``, on
    the patch grid's cell boundaries; None when the model has none."""
    module = loaded.module
    if not module.has_foreground:
        return None
    grid = tuple(loaded.manifest.patchcore.feature_map_size)
    cells = module.foreground.detach().cpu().numpy().reshape(grid) > 0.5
    return cells_to_pixels(cells, shape)


def generate_diffusion(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    options: DiffusionOptions = DiffusionOptions(),
    *,
    progress: bool = True,
    references: Sequence[Reference] | None = None,
) -> DiffusionOutput:
    """Generate, gate, score and write diffusion NG (see the module docstring)."""
    from ngcal.patchcore.io import load_model

    from ..glass import resolve_device, square_side

    device = resolve_device(options.device)
    loaded = load_model(model_dir, device=str(device))
    spec = loaded.manifest.preprocessing
    size = square_side(spec, "ngcal generate diffusion")
    out = Path(out_dir)
    refs = list(references) if references is not None else load_references(options.ng, size)
    rng = np.random.default_rng(options.seed)
    picked = _pick_goods(loaded, Path(data_dir), options.count + options.pool_images, rng)
    rgb = [resize_rgb(load_rgb(t.sample.path), size, spec.resample) for t in picked]
    slots = [j % len(picked) for j in range(options.count)]
    pool = rgb[options.count :] or rgb
    groups = sorted({r.group for r in refs}) or [ZERO_NG_GROUP]
    # a model with a part mask does not score the background (decision 0201): targets go
    # on the part, as GLASS's regions do (decision 0203)
    part = model_part_pixels(loaded, (size, size))
    requests, kinds = [], []
    for j, s in enumerate(slots):
        g = groups[j % len(groups)]
        fg = otsu_foreground(rgb[s][..., 0]) if options.foreground else None
        if part is not None:
            fg = part if fg is None or not (fg & part).any() else fg & part
        t = draw_placed_target([r for r in refs if r.group == g], (size, size), rng, foreground=fg)
        requests.append(GuidedRequest(rgb[s], t.mask, g, t.reference, t.placement))
        kinds.append(t.kind)

    backend = make_backend(options, device)
    record = backend.prepare(refs, pool, progress=progress)
    t0 = time.perf_counter()
    cands = backend.generate(requests, candidates=options.candidates, progress=progress)
    sample_seconds = time.perf_counter() - t0
    gated = gate_all(requests, cands, backend.training_crops(), refs, loaded, options.gate)

    for sub in ("images", "masks", "scores"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    kept: list[int] = []  # row index of each kept candidate
    sheet_items: list[tuple[np.ndarray, np.ndarray, str]] = []
    fails: Counter[str] = Counter()
    for j, (req, row, res) in enumerate(zip(requests, cands, gated, strict=True)):
        best, best_change = -1, -1.0
        for i, (c, (checks, derived)) in enumerate(zip(row, res, strict=True)):
            k = len(rows)
            ok, failed = verdict(checks)
            fails.update(failed)
            change = float(checks[1].value or 0.0)
            if ok and change > best_change:
                best, best_change = k, change
            save_png(str(out / "images" / f"{k:04d}.png"), c.image)
            save_png(str(out / "masks" / f"{k:04d}_mask.png"), derived)
            rows.append(
                {
                    "k": k,
                    "slot": j,
                    "candidate": i,
                    "group": req.group,
                    "good": picked[slots[j]].sample.item_id,
                    "target_kind": kinds[j],
                    "target_fraction": float(req.target.mean()),
                    "image": f"images/{k:04d}.png",
                    "mask": f"masks/{k:04d}_mask.png",
                    "passed": ok,
                    "failed": failed,
                    "kept": False,
                    "checks": {ch.name: ch.as_dict() for ch in checks},
                    "backend": c.record,
                }
            )
        if best >= 0:
            rows[best]["kept"] = True
            kept.append(best)
        show = best if best >= 0 else len(rows) - len(row)
        if len(sheet_items) < 24:
            r = rows[show]
            tag = "KEPT" if best >= 0 else "REJECTED " + ",".join(r["failed"])  # type: ignore[arg-type]
            c = row[int(r["candidate"])]  # type: ignore[call-overload]
            empty = np.zeros_like(req.target)
            mask_rgb = np.repeat(req.target[..., None].astype(np.uint8) * 255, 3, axis=2)
            sheet_items += [
                (req.good, empty, f"{show:04d} good {req.group}"),
                (mask_rgb, empty, f"target {kinds[j]}"),
                (c.image, req.target, tag),
            ]

    scores = full = np.zeros(0)
    if kept:
        fit = [picked[slots[int(rows[k]["slot"])]].fit_index for k in kept]  # type: ignore[call-overload]
        scores, full = score_heldout(loaded, [out / str(rows[k]["image"]) for k in kept], fit)
    for k, score, score_full in zip(kept, scores, full, strict=True):
        rows[k]["score"] = float(score)
        rows[k]["score_full_model"] = float(score_full)
    acceptance = len(kept) / max(len(requests), 1)
    meta: dict[str, object] = {
        "backend": options.backend,
        "seed": options.seed,
        "acceptance_rate": acceptance,
        "candidates_per_target": options.candidates,
        "references": [r.item_id for r in refs],
        "index": "index.json",
        "holdout": "train/good images scored without the memory bank rows they contributed",
    }
    ss = ScoreSet(
        source="diffusion",
        scores=scores,
        item_ids=tuple(f"{rows[k]['good']}#diffusion{k}" for k in kept),
        groups=tuple(str(rows[k]["group"]) for k in kept),
        model_sha256=loaded.sha256,
        meta=meta,
    )
    save_scoreset(out / "scores" / "diffusion.json", ss)
    atomic_write_json(out / "index.json", {"schema": "ngcal.diffusion_index/1", "items": rows})
    sheet = out / "contact_sheet.png"
    save_png(str(sheet), contact_sheet(sheet_items, columns=6, tile=128))
    summary: dict[str, object] = {
        "schema": "ngcal.diffusion_run/1",
        "model": str(loaded.root),
        "model_sha256": loaded.sha256,
        "data": str(data_dir),
        "device": str(device),
        "options": asdict(options),
        "backend": record,
        "targets": len(requests),
        "candidates": len(rows),
        "kept": len(kept),
        "acceptance_rate": acceptance,
        "failed_checks": dict(fails),
        "sample_seconds": sample_seconds,
        "seconds_per_sample": sample_seconds / max(len(rows), 1),
        "median_score": float(np.median(scores)) if scores.size else None,
        "part_mask": None if part is None else {"used": True, "coverage": float(part.mean())},
    }
    atomic_write_json(out / "diffusion_run.json", summary)
    return DiffusionOutput(ss, out, sheet, summary)
