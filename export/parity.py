"""Parity of an exported runtime with the torch model it came from.

Inputs: a fixed, seeded set of preprocessed batches (zeros, noise at the normalised
scale, a smooth gradient) plus, when given, real images preprocessed exactly as the edge
does (``ngcal.core.images``). The figure is the max absolute difference of image scores;
the bound is relative to the largest torch score, because scores are distances in
feature units whose scale depends on the backbone:

    max |runtime - torch| <= rtol * max(1, max |torch|)

fp32 onnxruntime lands near 1e-6 relative; FP16 TensorRT engines near 1e-3.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ngcal.core.errors import ArtifactError
from ngcal.core.images import load_and_preprocess
from ngcal.core.manifest import Preprocessing
from ngcal.core.scorer import Scorer

#: Default relative bounds by precision.
RTOL = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass(frozen=True)
class Parity:
    """Outcome of one parity check: scores of both sides (float64 [N]) and the bound."""

    reference: np.ndarray
    runtime: np.ndarray
    max_abs_diff: float
    tolerance: float
    map_max_abs_diff: float | None

    @property
    def ok(self) -> bool:
        """True when the difference is within the tolerance."""
        return self.max_abs_diff <= self.tolerance


def parity_inputs(
    spec: Preprocessing, images: Sequence[str | os.PathLike[str]] = (), *, seed: int = 0
) -> np.ndarray:
    """float32 [N, 3, S, S]: zeros, two noise images, a gradient, then ``images`` (max 4)."""
    h, w = spec.hw
    rng = np.random.default_rng(seed)
    ry = np.linspace(-1.0, 1.0, h, dtype=np.float32)
    rx = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    synth = [
        np.zeros((3, h, w), np.float32),
        rng.normal(0.0, 0.5, (3, h, w)).astype(np.float32),
        rng.uniform(-1.0, 1.0, (3, h, w)).astype(np.float32),
        np.broadcast_to(ry[None, :, None] * rx[None, None, :], (3, h, w)).astype(np.float32),
    ]
    real = [load_and_preprocess(p, spec) for p in list(images)[:4]]
    return np.stack(synth + real).astype(np.float32)


def torch_scores(module: object, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference (image scores float64 [N], maps float32 [N,S,S]) from a torch module."""
    import torch

    with torch.inference_mode():
        amap, score = module(torch.from_numpy(batch))  # type: ignore[operator]
    return score.double().numpy(), amap.float().numpy()


def check_parity(
    scorer: Scorer,
    reference: tuple[np.ndarray, np.ndarray],
    batch: np.ndarray,
    *,
    rtol: float,
) -> Parity:
    """Score ``batch`` with ``scorer`` and compare with the torch ``reference``."""
    ref_scores, ref_maps = reference
    res = scorer.score(batch)
    got = res.image_scores.astype(np.float64)
    if got.shape != ref_scores.shape or not np.all(np.isfinite(got)):
        raise ArtifactError(f"{scorer.name}: parity scores {got!r} vs reference {ref_scores!r}")
    diff = float(np.max(np.abs(got - ref_scores)))
    map_diff = None
    if res.anomaly_maps is not None:
        map_diff = float(np.max(np.abs(res.anomaly_maps.astype(np.float64) - ref_maps)))
    tol = rtol * max(1.0, float(np.max(np.abs(ref_scores))))
    return Parity(ref_scores, got, diff, tol, map_diff)
