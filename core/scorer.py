"""The scoring seam: one ``Scorer`` protocol that every runtime implements (torch-free).

A scorer takes preprocessed float32 batches [N, 3, H, W] (see ``ngcal.core.images``) and
returns image scores [N] and, where the runtime produces them, anomaly maps [N, H, W].
Backends (onnxruntime, TensorRT) live in their own modules and import their runtime
lazily; the daemon and benchmarks depend only on this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import BackendError
from .manifest import Preprocessing


@dataclass(frozen=True)
class ScoreResult:
    """Outputs for one batch: ``image_scores`` float32 [N]; ``anomaly_maps`` [N, S, S] or None."""

    image_scores: np.ndarray
    anomaly_maps: np.ndarray | None = None


@runtime_checkable
class Scorer(Protocol):
    """A loaded model that scores preprocessed batches."""

    @property
    def name(self) -> str:
        """Runtime and device, e.g. ``onnxruntime:CPUExecutionProvider``."""
        ...

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the model expects (from its manifest)."""
        ...

    @property
    def max_batch(self) -> int:
        """Largest batch ``score`` accepts in one call."""
        ...

    def score(self, batch: np.ndarray) -> ScoreResult:
        """Score float32 [N, 3, S, S]; N <= ``max_batch``."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


def score_in_chunks(
    batch: np.ndarray, max_batch: int, run: Callable[[np.ndarray], ScoreResult]
) -> ScoreResult:
    """Score ``batch`` [N, ...] with ``run`` in slices of at most ``max_batch`` and join them.

    Anomaly maps are joined when every slice has them, else the result has none.
    """
    if len(batch) <= max_batch:
        return run(batch)
    parts = [run(batch[i : i + max_batch]) for i in range(0, len(batch), max_batch)]
    maps = [p.anomaly_maps for p in parts if p.anomaly_maps is not None]
    return ScoreResult(
        image_scores=np.concatenate([p.image_scores for p in parts]),
        anomaly_maps=np.concatenate(maps) if len(maps) == len(parts) else None,
    )


def probe(
    name: str, run: Callable[[np.ndarray], ScoreResult], image_size: int | tuple[int, int]
) -> None:
    """Start-up check of a backend: ``run`` one batch of zeros and demand one finite image
    score and, where maps come back, one map of the input size; BackendError naming
    ``name`` otherwise (a runtime that lists a device is not one that works on it).
    ``image_size``: the side of a square input, or its (height, width)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    try:
        res = run(np.zeros((1, 3, h, w), dtype=np.float32))
    except BackendError:
        raise
    except Exception as e:  # runtimes raise their own untyped errors
        raise BackendError(f"{name}: probe inference failed: {e}") from e
    if res.image_scores.shape != (1,) or not np.all(np.isfinite(res.image_scores)):
        raise BackendError(
            f"{name}: probe inference gave image_score {res.image_scores!r}; "
            "expected one finite value"
        )
    if res.anomaly_maps is not None and res.anomaly_maps.shape != (1, h, w):
        raise BackendError(
            f"{name}: probe anomaly_map has shape {res.anomaly_maps.shape}, expected (1, {h}, {w})"
        )
