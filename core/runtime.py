"""Open a scorer for a bundle by backend name: the one entry point the edge code calls.

Torch-free. Each backend module imports its runtime (onnxruntime, tensorrt) only when it
is chosen, so ``import ngcal.core.runtime`` costs nothing and a missing runtime surfaces
as a BackendError naming the backend, not as an ImportError at start-up.

Backends:
    ``ort-cpu``       onnxruntime CPUExecutionProvider (the default; any machine)
    ``ort-cuda``      onnxruntime CUDAExecutionProvider
    ``ort-tensorrt``  onnxruntime TensorrtExecutionProvider with its engine and timing cache
    ``tensorrt``      a TensorRT engine built on this device from the bundle's ONNX and
                      cached by (ONNX sha256, TensorRT version, GPU name, precision)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from .bundle import Bundle, open_bundle
from .errors import BackendError, ConfigError, ImageError
from .images import load_and_preprocess
from .scorer import Scorer

log = logging.getLogger(__name__)

BackendName = Literal["ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(BackendName)

#: Default folder (inside the bundle) for engines and TensorRT caches; never hashed.
ENGINE_DIR = "engines"


def engine_cache_dir(bundle: Bundle, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where engines and TensorRT caches go: ``cache_dir`` or ``<bundle>/engines``."""
    return Path(cache_dir) if cache_dir is not None else bundle.root / ENGINE_DIR


def open_scorer(
    bundle: Bundle | str | os.PathLike[str],
    *,
    backend: str = "ort-cpu",
    threads: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    max_batch: int = 8,
    precision: str | None = None,
) -> Scorer:
    """Load ``bundle`` (a Bundle, or a path that is opened and verified) on ``backend``.

    ``threads`` is the intra-op thread count for CPU work; ``max_batch`` the largest batch
    one run takes (the TensorRT profile's maximum); ``precision`` (``fp32``/``fp16``) for
    TensorRT engines defaults to the bundle's. Raises ConfigError for an unknown backend
    and BackendError when the runtime or device is absent or fails its probe inference.
    """
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown scorer backend {backend!r}; use one of {list(BACKENDS)}")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    prec = precision or b.manifest.precision
    if prec not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be fp32 or fp16, got {prec!r}")
    if backend == "tensorrt":
        from .trt_backend import open_trt_scorer

        return open_trt_scorer(
            b, cache_dir=engine_cache_dir(b, cache_dir), precision=prec, max_batch=max_batch
        )
    from .ort_backend import OrtScorer

    cache = None
    if backend == "ort-tensorrt":
        cache = engine_cache_dir(b, cache_dir) / "ort-trt"
    elif backend not in ("ort-cpu", "ort-cuda"):  # pragma: no cover - guarded above
        raise BackendError(f"unhandled backend {backend!r}")
    return OrtScorer(
        b.onnx_path,
        b.manifest.preprocessing,
        backend=backend,  # type: ignore[arg-type]
        threads=threads,
        max_batch=max_batch,
        precision=prec,
        cache_dir=cache,
    )


@dataclass(frozen=True)
class ScoredFiles:
    """Scores aligned with the input paths: ``scores`` float64 [N] (NaN where unreadable),
    ``maps`` float32 [N, S, S] or None, ``errors`` (path, reason) of unreadable files.

    The torch-free twin of ``ngcal.patchcore.io.ScoredImages``.
    """

    scores: np.ndarray
    maps: np.ndarray | None
    errors: list[tuple[str, str]] = field(default_factory=list)


def score_files(
    scorer: Scorer,
    paths: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 8,
    with_maps: bool = False,
) -> ScoredFiles:
    """Decode, preprocess (``ngcal.core.images``) and score image files with ``scorer``.

    Unreadable files get NaN and an entry in ``errors``; this never raises ImageError.
    """
    spec = scorer.preprocessing
    n, (h, w) = len(paths), spec.hw
    scores = np.full(n, np.nan, dtype=np.float64)
    maps = np.full((n, h, w), np.nan, dtype=np.float32) if with_maps else None
    errors: list[tuple[str, str]] = []
    step = max(1, min(batch_size, scorer.max_batch))
    for start in range(0, n, step):
        arrays, idx = [], []
        for i in range(start, min(start + step, n)):
            try:
                arrays.append(load_and_preprocess(paths[i], spec))
                idx.append(i)
            except ImageError as e:
                log.warning("unreadable image %s: %s", e.path, e.reason)
                errors.append((str(paths[i]), e.reason))
        if not arrays:
            continue
        res = scorer.score(np.stack(arrays))
        scores[idx] = res.image_scores.astype(np.float64)
        if maps is not None and res.anomaly_maps is not None:
            maps[idx] = res.anomaly_maps
    return ScoredFiles(scores=scores, maps=maps, errors=errors)
