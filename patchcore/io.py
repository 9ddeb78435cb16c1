"""Model directories: write, load (hash-verified) and score image files with a fitted PatchCore.

Files of a model directory (see ``ngcal.core.manifest``) written here::

    backbone.safetensors     the truncated timm features_only state dict (self-contained:
                             loading needs neither the weights package nor a hub)
    memory_bank.npy          float32 [M, D]
    memory_bank_source.npy   int32 [M], training image index of each row
    projection.npy           float32 [C, D] (only when a projection is used)
    foreground.npy           float32 [h, w] part mask over the patch grid (only when the fit
                             kept one; ``PatchCoreSpec.foreground`` names it)
    scores/normal_loo.json, scores/normal_holdout.json

Score sets inside a model dir carry an empty ``model_sha256``: they are hashed by the
manifest, which cannot in turn be named inside them; the manifest binds them.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ngcal.core.errors import ArtifactError, ImageError
from ngcal.core.files import atomic_write_bytes, load_npy, save_npy
from ngcal.core.images import load_and_preprocess
from ngcal.core.manifest import ModelManifest, Preprocessing, manifest_sha256, read_manifest

from .model import PatchCore, PatchEmbedder

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.safetensors"
BANK_FILE = "memory_bank.npy"
SOURCE_FILE = "memory_bank_source.npy"
PROJECTION_FILE = "projection.npy"
FOREGROUND_FILE = "foreground.npy"


@dataclass(frozen=True)
class LoadedModel:
    """A verified model directory: ``module`` (PatchCore, eval), manifest, root, manifest sha256."""

    module: PatchCore
    manifest: ModelManifest
    root: Path
    sha256: str

    @property
    def preprocessing(self) -> Preprocessing:
        """How to turn an image into this model's input."""
        return self.manifest.preprocessing


@dataclass(frozen=True)
class ScoredImages:
    """Scores aligned with the input paths: ``scores`` float64 [N] (NaN where unreadable),
    ``maps`` float32 [N, H, W] or None, ``errors`` list of (path, reason) for unreadable files.
    """

    scores: np.ndarray
    maps: np.ndarray | None
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: True where the image was scored."""
        ok: np.ndarray = np.isfinite(self.scores)
        return ok


def build_backbone(
    name: str, layers: tuple[int, ...], state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """A timm features_only model with ``state`` loaded strictly (eval, no grads)."""
    from .backbones import create_features_model

    model = create_features_model(name, layers)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"{BACKBONE_FILE}: does not fit timm {name} layers {layers} ({e})"
        ) from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_backbone(root: Path, backbone: torch.nn.Module) -> None:
    """Write the backbone state dict as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    atomic_write_bytes(root / BACKBONE_FILE, save(state))


def load_model(model_dir: str | os.PathLike[str], *, device: str = "cpu") -> LoadedModel:
    """Open a model directory, verify every file's sha256, rebuild the PatchCore module."""
    root = Path(model_dir)
    manifest = read_manifest(root, verify=True)
    if not isinstance(manifest, ModelManifest):
        raise ArtifactError(f"{root}: is a bundle, not a model directory (use ngcal.core.bundle)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(root / BACKBONE_FILE), device="cpu")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{root / BACKBONE_FILE}: unreadable ({e})") from e
    spec = manifest.patchcore
    backbone = build_backbone(manifest.backbone.name, tuple(manifest.backbone.layers), state)
    projection = None
    if (root / PROJECTION_FILE).is_file() and PROJECTION_FILE in manifest.files:
        projection = torch.from_numpy(load_npy(root / PROJECTION_FILE).astype(np.float32))
    bank = torch.from_numpy(load_npy(root / BANK_FILE).astype(np.float32))
    if bank.ndim != 2 or bank.shape[1] != spec.feature_dim:
        raise ArtifactError(
            f"{root / BANK_FILE}: shape {tuple(bank.shape)}, manifest says D={spec.feature_dim}"
        )
    embedder = PatchEmbedder(backbone, neighbourhood=spec.neighbourhood, projection=projection)
    foreground = load_foreground(root, spec.foreground, tuple(spec.feature_map_size))
    module = PatchCore(
        embedder,
        bank,
        image_size=manifest.preprocessing.image_size,
        image_hw=manifest.preprocessing.hw,
        image_score=spec.image_score,
        topk=spec.image_score_k,
        reweight_neighbors=spec.reweight_neighbors,
        smoothing_sigma=spec.smoothing_sigma,
        foreground=foreground,
    )
    module.eval().to(device)
    return LoadedModel(module=module, manifest=manifest, root=root, sha256=manifest_sha256(root))


def load_foreground(root: Path, name: str | None, grid: tuple[int, ...]) -> torch.Tensor | None:
    """The part mask float32 [h, w] the manifest names (None when it names none);
    ArtifactError when its shape is not the patch grid or its values are not 0/1."""
    if name is None:
        return None
    mask = load_npy(root / name).astype(np.float32)
    if mask.shape != grid:
        raise ArtifactError(f"{root / name}: shape {mask.shape}, the patch grid is {grid}")
    if not np.isin(mask, (0.0, 1.0)).all() or not mask.any():
        raise ArtifactError(f"{root / name}: a part mask holds 0/1 with at least one 1")
    return torch.from_numpy(mask)


def load_batch(
    paths: Sequence[str | os.PathLike[str]], spec: Preprocessing
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Decode and preprocess images: (float32 [n_ok, 3, H, W], indices of ok paths, errors)."""
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    errors: list[tuple[str, str]] = []
    for i, p in enumerate(paths):
        try:
            arrays.append(load_and_preprocess(p, spec))
            ok.append(i)
        except ImageError as e:
            log.warning("skipping unreadable image %s: %s", e.path, e.reason)
            errors.append((str(p), e.reason))
    h, w = spec.hw
    batch = np.stack(arrays) if arrays else np.zeros((0, 3, h, w), np.float32)
    return batch, ok, errors


def score_paths(
    loaded: LoadedModel,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 4,
    progress: bool = False,
    with_maps: bool = True,
) -> ScoredImages:
    """Score image files; unreadable ones get NaN and an entry in ``errors`` (never raise)."""
    n = len(paths)
    h, w = loaded.preprocessing.hw
    scores = np.full(n, np.nan, dtype=np.float64)
    maps = np.full((n, h, w), np.nan, dtype=np.float32) if with_maps else None
    errors: list[tuple[str, str]] = []
    device = next(loaded.module.buffers()).device
    bar = _bar(n, progress, "score")
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            chunk = paths[start : start + batch_size]
            batch, ok, errs = load_batch(chunk, loaded.preprocessing)
            errors.extend(errs)
            if ok:
                amap, score = loaded.module(torch.from_numpy(batch).to(device))
                idx = np.asarray(ok) + start
                scores[idx] = score.double().cpu().numpy()
                if maps is not None:
                    maps[idx] = amap.float().cpu().numpy()
            bar.update(len(chunk))
    bar.close()
    return ScoredImages(scores=scores, maps=maps, errors=errors)


def save_arrays(
    root: Path,
    bank: np.ndarray,
    source: np.ndarray,
    projection: np.ndarray | None,
    foreground: np.ndarray | None = None,
) -> None:
    """Write the memory bank, its source indices, the optional projection and part mask."""
    save_npy(root / BANK_FILE, bank.astype(np.float32))
    save_npy(root / SOURCE_FILE, source.astype(np.int32))
    if projection is not None:
        save_npy(root / PROJECTION_FILE, projection.astype(np.float32))
    if foreground is not None:
        save_npy(root / FOREGROUND_FILE, foreground.astype(np.float32))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished ``tmp`` folder to ``dest``, replacing an existing one atomically-ish."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool, desc: str) -> _NullBar:
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    bar: _NullBar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, mininterval=1.0)
    return bar
