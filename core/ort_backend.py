"""onnxruntime scorer: CPU, CUDA and TensorRT execution providers, probed at start-up.

A provider that is listed is not a provider that works: a CPU-only wheel lists nothing, but
a GPU wheel without matching CUDA/cuDNN libraries lists CUDA and then silently falls back
to CPU when the session is created. So ``OrtScorer`` (1) checks the provider is available,
(2) checks the created session really kept it, and (3) runs a probe inference on a batch
of zeros, checking output names, shapes and finiteness; any failure is a BackendError that
says which provider failed and why.

Session options tuned for single-image latency on a small CPU: all graph optimisations,
``threads`` intra-op threads, one inter-op thread, sequential execution, the CPU memory
arena and memory patterns on (repeated shapes reuse their buffers), and no spinning when
more than one intra-op thread is used (the device also runs the daemon).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import BackendError, DataError
from .manifest import Preprocessing
from .scorer import ScoreResult, probe, score_in_chunks

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "image_score")

OrtBackend = Literal["ort-cpu", "ort-cuda", "ort-tensorrt"]

_PROVIDER = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(
            "onnxruntime is not installed; install the edge extra (pip install 'ngcal[edge]')"
        ) from e
    return ort


def provider_chain(
    backend: str,
    *,
    image_size: int | tuple[int, int],
    max_batch: int,
    precision: str,
    cache_dir: Path | None,
    workspace_bytes: int = 1 << 30,
) -> list[tuple[str, dict[str, Any]]]:
    """The ordered (provider, options) list for ``backend``; CPU always last as a fallback
    for nodes the accelerator cannot take (the probe still demands the accelerator itself).
    """
    if backend not in _PROVIDER:
        raise BackendError(f"unknown onnxruntime backend {backend!r}; use one of {list(_PROVIDER)}")
    chain: list[tuple[str, dict[str, Any]]] = []
    if backend == "ort-tensorrt":
        if cache_dir is None:
            raise BackendError("ort-tensorrt needs a cache_dir for its engine and timing caches")
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        chain.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(cache_dir),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(cache_dir),
                    "trt_fp16_enable": "True" if precision == "fp16" else "False",
                    "trt_max_workspace_size": str(workspace_bytes),
                    "trt_profile_min_shapes": f"{INPUT_NAME}:1x3x{h}x{w}",
                    "trt_profile_opt_shapes": f"{INPUT_NAME}:1x3x{h}x{w}",
                    "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch}x3x{h}x{w}",
                },
            )
        )
    if backend in ("ort-cuda", "ort-tensorrt"):
        chain.append(("CUDAExecutionProvider", {"device_id": "0"}))
    chain.append(("CPUExecutionProvider", {}))
    return chain


class OrtScorer:
    """A ``Scorer`` over an onnxruntime InferenceSession; complete after ``__init__``."""

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        preprocessing: Preprocessing,
        *,
        backend: OrtBackend = "ort-cpu",
        threads: int = 1,
        max_batch: int = 32,
        precision: str = "fp32",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        ort = _import_ort()
        self._pre = preprocessing
        self._max_batch = int(max_batch)
        self._backend = backend
        wanted = _PROVIDER.get(backend)
        if wanted is None:
            raise BackendError(
                f"unknown onnxruntime backend {backend!r}; use one of {list(_PROVIDER)}"
            )
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendError(
                f"{backend}: onnxruntime {ort.__version__} does not offer {wanted} "
                f"(available: {', '.join(available)}); install the matching onnxruntime wheel"
            )
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        chain = provider_chain(
            backend,
            image_size=preprocessing.hw,
            max_batch=self._max_batch,
            precision=precision,
            cache_dir=cache,
        )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = True
        opts.enable_mem_pattern = True
        opts.log_severity_level = 3
        if threads > 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._sess = ort.InferenceSession(
                os.fspath(onnx_path),
                sess_options=opts,
                providers=[p for p, _ in chain],
                provider_options=[o for _, o in chain],
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{backend}: cannot create a session for {onnx_path}: {e}") from e
        used = self._sess.get_providers()
        if wanted not in used:
            raise BackendError(
                f"{backend}: onnxruntime listed {wanted} but the session fell back to "
                f"{', '.join(used)} (missing CUDA/cuDNN/TensorRT libraries or no GPU?)"
            )
        self._check_io(onnx_path)
        self._name = f"onnxruntime:{wanted}"
        probe(self._name, self._run, preprocessing.hw)
        log.info("%s ready (%d thread(s), max batch %d)", self._name, threads, self._max_batch)

    def _check_io(self, onnx_path: str | os.PathLike[str]) -> None:
        inputs = [i.name for i in self._sess.get_inputs()]
        outputs = [o.name for o in self._sess.get_outputs()]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(outputs):
            raise BackendError(
                f"{onnx_path}: graph has inputs {inputs} and outputs {outputs}; expected input "
                f"{INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}"
            )

    @property
    def name(self) -> str:
        """``onnxruntime:<provider>``."""
        return self._name

    @property
    def preprocessing(self) -> Preprocessing:
        """The bundle's preprocessing."""
        return self._pre

    @property
    def max_batch(self) -> int:
        """Largest batch scored in one run (larger batches are split)."""
        return self._max_batch

    def _run(self, batch: np.ndarray) -> ScoreResult:
        amap, score = self._sess.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return ScoreResult(
            image_scores=np.asarray(score, dtype=np.float32).reshape(-1),
            anomaly_maps=np.asarray(amap, dtype=np.float32),
        )

    def score(self, batch: np.ndarray) -> ScoreResult:
        """Score float32 [N, 3, S, S] -> image scores [N] and anomaly maps [N, S, S]."""
        batch = check_batch(batch, self._pre.hw)
        return score_in_chunks(batch, self._max_batch, self._run)

    def close(self) -> None:
        """Drop the session (onnxruntime frees it with the last reference)."""
        self._sess = None


def check_batch(batch: np.ndarray, image_size: int | tuple[int, int]) -> np.ndarray:
    """Validate a preprocessed batch: float32 [N, 3, H, W] (``image_size`` = (H, W), or S
    for a square S x S), N >= 1; C-contiguous copy if needed."""
    arr = np.asarray(batch)
    if arr.ndim == 3:
        arr = arr[None]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if arr.ndim != 4 or arr.shape[1:] != (3, h, w) or arr.shape[0] < 1:
        raise DataError(f"batch has shape {tuple(arr.shape)}; expected (N, 3, {h}, {w})")
    if arr.dtype != np.float32:
        raise DataError(f"batch has dtype {arr.dtype}; expected float32 (see ngcal.core.images)")
    return np.ascontiguousarray(arr)
