"""GLASS synthetic NG scored by ngcal's own PatchCore: ``glass_feature`` and ``glass_image`` sets.

Pipeline (GLASS: Chen et al., ECCV 2024; see ``gas`` and ``las`` for the two syntheses):

1. Held-out normal images: ``count`` distinct ``train/good`` images drawn with the seed;
   each is scored by a leave-group-out PatchCore without the bank rows it contributed
   (``heldout``), so it is an image the scoring model never saw. Test images are never used.
2. A pool of other training images gives normal patch features for the discriminator, the
   class centre per patch position and its radius (0.75 quantile, as GLASS's ``r_t``).
3. LAS: one synthetic image per held-out image (Perlin region, texture, random beta), saved
   as PNG with its binary mask, embedded and scored like a real image -> ``glass_image``.
4. GLASS's discriminator is trained on pool features against GAS features of the severity
   grid (plus the LAS patches with the focal term).
5. GAS per severity ``s``: the features of each held-out image under a Perlin-shaped region
   (same region for every severity, so the curve is paired) are replaced by GAS features in
   the band [s r0, 2 s r0] (``r0`` = ``loo_patch_nn_p50`` of the model) and the whole map goes
   through ``PatchCore.head``: image score exactly as for a real image -> ``glass_feature``.

Outputs under ``out``: ``scores/glass_feature_s<s>.json`` (one per severity),
``scores/glass_image.json``, ``las/images/<k>.png``, ``las/masks/<k>_mask.png``,
``las/index.json``, ``contact_sheet.png`` and ``glass_run.json`` (options and summary).

One severity gives a narrow score spread, so calibration pools a severity *range*
(evidence: ``docs/decisions/0006``, ``benchmarks/glass.py``).

On the part (``docs/decisions/0203``): when the model has a part mask (``fit --foreground``,
``PatchCoreSpec.foreground``), background patches do not count in its image score, so an
anomaly drawn there would score as good. Every LAS and GAS Perlin region is then cut to
the mask upsampled to the image (``perlin_mask_on_part``: redrawn, a bounded number of
times, when cut to less than a patch cell) and GAS replaces features only on part
patches; ``glass_run.json`` records the mask and the redraws, and the contact sheet
outlines the part in green. Without a mask every region and score is as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ngcal.core.errors import ArtifactError, ConfigError
from ngcal.core.files import atomic_write_json
from ngcal.core.images import load_rgb, normalize, resize_rgb
from ngcal.core.manifest import Preprocessing
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.patchcore.io import LoadedModel

from .gas import (
    Band,
    Discriminator,
    GasConfig,
    TrainConfig,
    Variant,
    implant,
    severity_band,
    train_discriminator,
)
from .heldout import HeldOutScorer, TrainImage, bank_sources, training_index
from .las import LasSample, contact_sheet, save_png, synthesize
from .perlin import (
    PART_TRIES,
    AnomalyMask,
    cells_to_pixels,
    otsu_foreground,
    perlin_mask,
    perlin_mask_on_part,
)
from .textures import TextureBank

log = logging.getLogger(__name__)

#: The model statistic that is the unit of severity, and fallbacks in order.
RADIUS_STATS = ("loo_patch_nn_p50", "loo_patch_nn_p90")


@dataclass(frozen=True)
class GlassOptions:
    """Options of ``generate_glass`` (the CLI's flags)."""

    severities: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    count: int = 64
    seed: int = 0
    epochs: int = 10
    variant: Variant = "manifold"
    pool_images: int = 16
    group_size: int = 8
    batch_size: int = 8
    textures: str | None = None
    foreground: bool = False
    beta: float | None = None
    hidden: int = 1024
    device: str = "auto"
    #: place anomalies on the model's part mask when it has one (False: anywhere, as before)
    part_mask: bool = True
    gas: GasConfig = field(default_factory=GasConfig)

    def __post_init__(self) -> None:
        if not self.severities or any(not (s > 0 and math.isfinite(s)) for s in self.severities):
            raise ConfigError(f"--severities must be positive numbers, got {self.severities}")
        if self.count < 1 or self.pool_images < 1 or self.group_size < 1 or self.batch_size < 1:
            raise ConfigError(
                f"count {self.count}, pool {self.pool_images}, group {self.group_size} and "
                f"batch {self.batch_size} must all be >= 1"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r} is not auto, cpu or cuda")


@dataclass(frozen=True)
class GlassOutput:
    """What ``generate_glass`` wrote: the score sets and the paths of the other files."""

    feature_sets: tuple[ScoreSet, ...]
    image_set: ScoreSet
    out: Path
    contact_sheet: Path
    summary: dict[str, object]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def radius_unit(stats: dict[str, float], where: str) -> tuple[float, str]:
    """The severity unit r0 from the model's fit statistics, and the statistic's name."""
    for key in RADIUS_STATS:
        v = stats.get(key)
        if v is not None and math.isfinite(v) and v > 0:
            return float(v), key
    raise ArtifactError(f"{where}: manifest patchcore.stats has none of {RADIUS_STATS}")


def square_side(spec: Preprocessing, what: str) -> int:
    """The side of a square model input; ConfigError naming ``what`` for a non-square one.

    GLASS's and diffusion's masks, textures and pastes are drawn on a square canvas, so a
    model fitted with ``--aspect keep`` (``input_hw``) would silently get synthetic NG of
    another geometry: refuse it instead.
    """
    h, w = spec.hw
    if h != w:
        raise ConfigError(
            f"{what} needs a model with a square input; this one takes {h} x {w} "
            "(fit --aspect keep); fit it square (--image-size N) to generate NG for it"
        )
    return h


def _load_images(samples: Sequence[TrainImage], size: int, resample: str) -> list[np.ndarray]:
    return [resize_rgb(load_rgb(t.sample.path), size, resample) for t in samples]


@torch.no_grad()
def _embed(
    module: torch.nn.Module,
    images: Sequence[np.ndarray],
    spec: Preprocessing,
    device: torch.device,
    batch: int,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """uint8 RGB images at model size -> features [N, h, w, D] on ``device``."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch), desc=desc, disable=not progress, mininterval=1.0):
        x = torch.from_numpy(np.stack([normalize(im, spec) for im in images[i : i + batch]]))
        out.append(module.embed(x.to(device)))  # type: ignore[operator]
    return torch.cat(out)


def _groups(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@dataclass
class _Run:
    """Everything the steps of one GLASS run share (internal)."""

    loaded: LoadedModel
    options: GlassOptions
    out: Path
    device: torch.device
    rng: np.random.Generator
    tgen: torch.Generator
    r0: float
    r0_name: str
    items: list[TrainImage]
    scorer: HeldOutScorer
    held_rgb: list[np.ndarray]
    pool_rgb: list[np.ndarray]
    feats_held: torch.Tensor
    feats_pool: torch.Tensor
    progress: bool
    #: the model's part mask bool [h, w] when anomalies go on the part only, else None
    part: np.ndarray | None = None

    @property
    def part_pixels(self) -> np.ndarray | None:
        """The part mask at image size, bool [S, S] (None: anywhere)."""
        if self.part is None:
            return None
        return cells_to_pixels(self.part, (self.size, self.size))

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.loaded.manifest.patchcore.feature_map_size
        return int(h), int(w)

    @property
    def size(self) -> int:
        return square_side(self.loaded.manifest.preprocessing, "ngcal generate glass")

    def fit_indices(self, grp: list[int]) -> list[int]:
        return [self.items[j].fit_index for j in grp]

    def embed(self, images: Sequence[np.ndarray], desc: str = "") -> torch.Tensor:
        return _embed(
            self.loaded.module,
            images,
            self.loaded.manifest.preprocessing,
            self.device,
            self.options.batch_size,
            desc,
            self.progress and bool(desc),
        )


def _prepare(
    model_dir: str | Path, data_dir: str | Path, out: Path, options: GlassOptions, progress: bool
) -> _Run:
    """Load and verify the model, pick held-out and pool images, embed them."""
    from ngcal.patchcore.io import load_model

    device = resolve_device(options.device)
    loaded = load_model(model_dir)
    loaded.module.to(device).eval()
    man = loaded.manifest
    root = Path(loaded.root)
    r0, r0_name = radius_unit(dict(man.patchcore.stats), str(root / "manifest.json"))
    rng = np.random.default_rng(options.seed)
    index = training_index(root, Path(data_dir), man.patchcore.num_train_images)
    order = rng.permutation(len(index))
    n_held = min(options.count, len(index) - 1)
    held = [index[int(i)] for i in order[:n_held]]
    pool = [index[int(i)] for i in order[n_held : n_held + options.pool_images]]
    if not held or not pool:
        raise ConfigError(f"{data_dir}: too few train images for a held-out set and a pool")
    spec = man.preprocessing
    side = square_side(spec, "ngcal generate glass")
    run = _Run(
        loaded=loaded,
        options=options,
        out=out,
        device=device,
        rng=rng,
        tgen=torch.Generator().manual_seed(options.seed),
        r0=r0,
        r0_name=r0_name,
        items=[held[j % len(held)] for j in range(options.count)],
        scorer=HeldOutScorer(loaded.module, bank_sources(root, loaded.module.memory_bank.shape[0])),
        held_rgb=_load_images(held, side, spec.resample),
        pool_rgb=_load_images(pool, side, spec.resample),
        feats_held=torch.empty(0),
        feats_pool=torch.empty(0),
        progress=progress,
    )
    module = loaded.module
    if options.part_mask and module.has_foreground:
        grid = run.grid
        run.part = module.foreground.detach().cpu().numpy().reshape(grid) > 0.5
    run.feats_held = run.embed(run.held_rgb, "embed held-out")
    run.feats_pool = run.embed(run.pool_rgb, "embed pool")
    return run


def _las_step(run: _Run) -> tuple[list[LasSample], np.ndarray, torch.Tensor, torch.Tensor]:
    """LAS images of the held-out images, scored held-out; written with masks and a sheet.

    Returns (samples, scores float64 [count], patch features [count*h*w, D], labels [...]).
    """
    from tqdm import tqdm

    opts, n_held = run.options, len(run.held_rgb)
    textures = TextureBank(size=run.size, own_images=run.pool_rgb, folder=opts.textures)
    part = run.part_pixels
    las: list[LasSample] = []
    for j in tqdm(range(opts.count), desc="LAS images", disable=not run.progress, mininterval=1.0):
        base = run.held_rgb[j % n_held]
        fg = otsu_foreground(base[..., 0]) if opts.foreground else None
        las.append(
            synthesize(base, textures, run.grid, run.rng, foreground=fg, beta=opts.beta, part=part)
        )
    scores = np.zeros(opts.count)
    feats = []
    for grp in _groups(list(range(opts.count)), opts.group_size):
        f = run.embed([las[j].image for j in grp])
        _, sc = run.scorer.head(f, run.fit_indices(grp))
        scores[grp] = sc.double().cpu().numpy()
        feats.append(f)
    las_dir = run.out / "las"
    (las_dir / "images").mkdir(parents=True, exist_ok=True)
    (las_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for j, x in enumerate(las):
        name = f"{j:04d}"
        save_png(str(las_dir / "images" / f"{name}.png"), x.image)
        save_png(str(las_dir / "masks" / f"{name}_mask.png"), x.mask)
        rows.append(
            {
                "image": f"images/{name}.png",
                "mask": f"masks/{name}_mask.png",
                "source": run.items[j].sample.item_id,
                "beta": x.beta,
                "mode": x.mode,
                "texture": x.texture,
                "mask_fraction": float(x.mask.mean()),
                "score": float(scores[j]),
                "redraws": x.redraws,
            }
        )
    atomic_write_json(las_dir / "index.json", {"schema": "ngcal.las_index/1", "items": rows})
    sheet = contact_sheet(
        [
            (las[j].image, las[j].mask, f"{j:04d} b={las[j].beta:.2f} s={scores[j]:.2f}")
            for j in range(min(24, len(las)))
        ],
        part=part,
    )
    save_png(str(run.out / "contact_sheet.png"), sheet)
    dim = run.feats_pool.shape[-1]
    labels = np.stack([x.cells for x in las]).reshape(-1).astype(np.float32)
    return las, scores, torch.cat(feats).reshape(-1, dim), torch.from_numpy(labels).to(run.device)


def _gas_regions(run: _Run) -> tuple[list[AnomalyMask], int, int]:
    """One Perlin region per item (on the part when the model has a mask): (masks,
    redraws, regions taken below the minimum after every try)."""
    shape = (run.size, run.size)
    part = run.part_pixels
    if part is None:
        return [perlin_mask(shape, run.grid, run.rng) for _ in range(run.options.count)], 0, 0
    regions = [
        perlin_mask_on_part(shape, run.grid, run.rng, part) for _ in range(run.options.count)
    ]
    return (
        [r.mask for r in regions],
        sum(r.redraws for r in regions),
        sum(r.short for r in regions),
    )


def _gas_step(
    run: _Run, bands: list[Band], centre_map: torch.Tensor, disc: Discriminator
) -> tuple[list[np.ndarray], list[AnomalyMask], int, int]:
    """GAS features under one Perlin region per item (same for every severity), scored.

    Returns (scores per severity, regions, redraws, short regions)."""
    from tqdm import tqdm

    opts = run.options
    masks, redraws, short = _gas_regions(run)
    per_severity = []
    for s, band in zip(opts.severities, bands, strict=True):
        scores = np.zeros(opts.count)
        groups = _groups(list(range(opts.count)), opts.group_size)
        for grp in tqdm(
            groups, desc=f"GAS severity {s:g}", disable=not run.progress, mininterval=1.0
        ):
            f = torch.stack([run.feats_held[j % len(run.held_rgb)] for j in grp])
            cells = torch.from_numpy(np.stack([masks[j].cells for j in grp])).to(run.device)
            f = implant(f, cells, disc, band, centre_map, config=opts.gas, generator=run.tgen)
            _, sc = run.scorer.head(f, run.fit_indices(grp))
            scores[grp] = sc.double().cpu().numpy()
        per_severity.append(scores)
    return per_severity, masks, redraws, short


def _part_summary(
    run: _Run, las: Sequence[LasSample], gas_redraws: int, gas_short: int
) -> dict[str, object]:
    """What ``glass_run.json`` records about placing anomalies on the model's part mask."""
    has = bool(run.loaded.module.has_foreground)
    if run.part is None:
        why = "the model has no part mask" if not has else "part_mask=False (anywhere)"
        return {"used": False, "model_has_mask": has, "why": why}
    return {
        "used": True,
        "model_has_mask": True,
        "coverage": float(run.part.mean()),
        "max_tries": PART_TRIES,
        "las_redraws": int(sum(x.redraws for x in las)),
        "las_short": int(sum(x.short for x in las)),
        "gas_redraws": int(gas_redraws),
        "gas_short": int(gas_short),
        "regions": run.options.count,
    }


def generate_glass(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    options: GlassOptions = GlassOptions(),
    *,
    progress: bool = True,
) -> GlassOutput:
    """Run GLASS on a fitted model directory and a category folder; write every output."""
    out = Path(out_dir)
    run = _prepare(model_dir, data_dir, out, options, progress)
    dim = run.feats_pool.shape[-1]
    centre_map = run.feats_pool.mean(0)  # [h, w, D], per patch position as in GLASS
    pool_rows = run.feats_pool.reshape(-1, dim)
    pool_centre = centre_map.expand_as(run.feats_pool).reshape(-1, dim)
    centre_radius = float(torch.quantile((pool_rows - pool_centre).norm(dim=1).cpu(), 0.75))
    bands = [
        severity_band(s, run.r0, variant=options.variant, centre_radius=centre_radius)
        for s in options.severities
    ]
    las, las_scores, las_feats, las_labels = _las_step(run)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        disc = train_discriminator(
            pool_rows,
            bands,
            centre=pool_centre,
            las_feats=las_feats,
            las_labels=las_labels,
            train=TrainConfig(epochs=options.epochs, hidden=options.hidden),
            gas_config=options.gas,
            generator=run.tgen,
            progress=progress,
        )
    per_severity, masks, gas_redraws, gas_short = _gas_step(run, bands, centre_map, disc)

    sha = run.loaded.sha256
    common_meta = {
        "r0": run.r0,
        "r0_stat": run.r0_name,
        "variant": options.variant,
        "seed": options.seed,
        "epochs": options.epochs,
        "centre_radius": centre_radius,
        "holdout": "train/good images scored without the memory bank rows they contributed",
        "gas": asdict(options.gas),
        "part_mask": run.part is not None,
    }
    ids = tuple(f"{run.items[j].sample.item_id}#{j}" for j in range(options.count))
    feature_sets = []
    for s, band, scores in zip(options.severities, bands, per_severity, strict=True):
        ss = ScoreSet(
            source="glass_feature",
            scores=scores,
            item_ids=ids,
            severity=float(s),
            groups=tuple(m.mode for m in masks),
            model_sha256=sha,
            meta={
                **common_meta,
                "band": [band.lo, band.hi],
                "mask_fraction": [float(m.cells.mean()) for m in masks],
            },
        )
        save_scoreset(out / "scores" / f"glass_feature_s{s:g}.json", ss)
        feature_sets.append(ss)
    image_set = ScoreSet(
        source="glass_image",
        scores=las_scores,
        item_ids=tuple(f"{run.items[j].sample.item_id}#las{j}" for j in range(options.count)),
        groups=tuple(x.texture for x in las),
        model_sha256=sha,
        meta={**common_meta, "beta": [x.beta for x in las], "las_index": "las/index.json"},
    )
    save_scoreset(out / "scores" / "glass_image.json", image_set)
    summary: dict[str, object] = {
        "schema": "ngcal.glass_run/1",
        "model": str(run.loaded.root),
        "model_sha256": sha,
        "data": str(data_dir),
        "device": str(run.device),
        "r0": run.r0,
        "r0_stat": run.r0_name,
        "options": asdict(options),
        "feature_median": {
            f"{s:g}": float(np.median(x.scores))
            for s, x in zip(options.severities, feature_sets, strict=True)
        },
        "image_median": float(np.median(las_scores)),
        "part_mask": _part_summary(run, las, gas_redraws, gas_short),
    }
    atomic_write_json(out / "glass_run.json", summary)
    return GlassOutput(tuple(feature_sets), image_set, out, out / "contact_sheet.png", summary)
