"""Held-out scoring: score a training image as if the model had never seen it.

Synthetic NG must be built on normal images the memory bank was not fitted on, else the
bank rows that image contributed make its own (synthetic) patches look normal. ngcal's
model directory records, for every bank row, the training image it came from
(``memory_bank_source.npy``). A *leave-group-out* PatchCore is the fitted module with the
rows of a small group of images removed (its reweighting neighbours recomputed on the
remaining bank): the model one would have fitted without them, up to the coreset choice.
Images the model was not fitted on at all (a holdout) need no removal.

Which training index an image has is read from the model's ``scores/normal_loo.json``
(item ids in fit order) when it lists every training image, else from the sorted
``train/good`` listing that ``ngcal fit`` uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ngcal.core.dataset import Sample, load_category
from ngcal.core.errors import ArtifactError, DataError
from ngcal.core.files import load_npy
from ngcal.core.scoresets import load_scoreset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainImage:
    """A good training image and its index in the fit (-1 when it was not fitted on)."""

    sample: Sample
    fit_index: int


def training_index(model_root: Path, data: Path, num_train_images: int) -> list[TrainImage]:
    """Every ``train/good`` image of ``data`` with its fit index (see the module docstring)."""
    cat = load_category(data)
    if not cat.train:
        raise DataError(f"{data}: no train/good images")
    loo_path = model_root / "scores" / "normal_loo.json"
    by_id: dict[str, int] = {}
    if loo_path.is_file():
        loo = load_scoreset(loo_path)
        if len(loo.item_ids) == num_train_images:
            by_id = {iid: i for i, iid in enumerate(loo.item_ids)}
    if by_id:
        out = [TrainImage(s, by_id.get(s.item_id, -1)) for s in cat.train]
        if not any(t.fit_index >= 0 for t in out):
            raise ArtifactError(
                f"{loo_path}: none of its item ids matches an image of {data}/train/good; "
                "is this the model of that category?"
            )
        return out
    if len(cat.train) != num_train_images:
        log.warning(
            "%s: %d train images but the model was fitted on %d and lists no ids; "
            "assuming the first %d in sorted order",
            data,
            len(cat.train),
            num_train_images,
            num_train_images,
        )
    return [TrainImage(s, i if i < num_train_images else -1) for i, s in enumerate(cat.train)]


def bank_sources(model_root: Path, bank_rows: int) -> np.ndarray:
    """int64 [M]: training image index of each bank row (``memory_bank_source.npy``)."""
    path = model_root / "memory_bank_source.npy"
    src = load_npy(path).astype(np.int64).reshape(-1)
    if src.size != bank_rows:
        raise ArtifactError(f"{path}: {src.size} entries but the memory bank has {bank_rows} rows")
    return src


def without_rows(module: torch.nn.Module, keep: torch.Tensor) -> torch.nn.Module:
    """A PatchCore sharing ``module``'s embedder, with only the bank rows where ``keep``."""
    from ngcal.patchcore.model import PatchCore

    if not isinstance(module, PatchCore):
        raise ArtifactError(f"expected a PatchCore module, got {type(module).__name__}")
    bank = module.memory_bank[keep.to(module.memory_bank.device)]
    if bank.shape[0] < 1:
        raise ArtifactError("leave-group-out would remove every memory bank row")
    return module.with_bank(bank)


class HeldOutScorer:
    """``head`` of leave-group-out PatchCores, cached per group of training indices.

    ``sources`` int64 [M] is the fit index of each bank row. ``head(feats, fit_indices)``
    scores features [N, h, w, D] whose images have those fit indices (-1 = not fitted on),
    removing the rows of all of them at once (call it per group).
    """

    def __init__(self, module: torch.nn.Module, sources: np.ndarray) -> None:
        self.module = module
        self.sources = torch.as_tensor(sources, dtype=torch.long)
        self._cache: dict[tuple[int, ...], torch.nn.Module] = {}
        self.max_cached = 64

    def model_for(self, fit_indices: list[int]) -> torch.nn.Module:
        """The PatchCore without the rows of ``fit_indices`` (the full one when all are -1)."""
        key = tuple(sorted({i for i in fit_indices if i >= 0}))
        if not key:
            return self.module
        if key not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.clear()
            drop = torch.isin(self.sources, torch.tensor(key, dtype=torch.long))
            self._cache[key] = without_rows(self.module, ~drop)
        return self._cache[key]

    @torch.no_grad()
    def head(
        self, feats: torch.Tensor, fit_indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_map [N, S, S], image_score [N]) with those images' bank rows removed."""
        model = self.model_for(fit_indices)
        out: tuple[torch.Tensor, torch.Tensor] = model.head(feats)  # type: ignore[operator]
        return out
