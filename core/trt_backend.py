"""TensorRT engine scorer and its engine cache (torch-free; ``tensorrt`` imported lazily).

Engines are not portable: one built by TensorRT X for GPU Y runs only there. So an engine
is built on the device that runs it, from the bundle's ONNX, and cached under a key::

    EngineKey(onnx_sha256, tensorrt_version, gpu_name, precision, max_batch, image_size)

The first four are the architecture's key; the last two define the optimisation profile
and would change the engine too. The cache folder (``<bundle>/engines`` or ``cache_dir``)
holds ``model.<gpu-slug>.<precision>.engine`` beside a ``.json`` sidecar with the key and
the engine's sha256, and a timing cache per GPU and TensorRT version. Loading compares the
sidecar's key with the current one and the engine's sha256 with the sidecar's; any
mismatch (new ONNX, upgraded TensorRT, another GPU, other precision, corrupt file)
rebuilds. Engine and sidecar are written atomically, engine first, so a crash mid-build
leaves a missing or stale sidecar, which also rebuilds.

The seam is ``TrtToolkit``: ``tensorrt_api.RealToolkit`` talks to TensorRT and the CUDA
driver; tests inject a fake to check key logic, rebuilds and errors without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .bundle import Bundle
from .errors import BackendError, NgcalError
from .files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from .manifest import Preprocessing
from .ort_backend import INPUT_NAME, OUTPUT_NAMES, check_batch
from .scorer import ScoreResult, probe, score_in_chunks

log = logging.getLogger(__name__)

KEY_SCHEMA = "ngcal.engine/1"
DEFAULT_WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; equal keys mean the cached engine can be reused."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    max_batch: int
    image_size: int

    def digest(self) -> str:
        """Short stable hash of the key (hex, 16 chars)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def gpu_slug(gpu_name: str) -> str:
    """File-name-safe GPU name: ``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


class EngineRunner(Protocol):
    """A deserialized engine with its execution context and device buffers."""

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [N,3,S,S] (host) -> outputs by name (host arrays)."""
        ...

    def close(self) -> None:
        """Free device memory and the context."""
        ...


class TrtToolkit(Protocol):
    """The narrow interface to TensorRT + CUDA that this module needs."""

    @property
    def tensorrt_version(self) -> str:
        """``tensorrt.__version__``."""
        ...

    def gpu_name(self) -> str:
        """Name of the CUDA device engines are built for and run on."""
        ...

    def build_engine(
        self,
        onnx_path: Path,
        *,
        precision: str,
        image_size: int,
        max_batch: int,
        workspace_bytes: int,
        timing_cache: Path,
    ) -> bytes:
        """Parse the ONNX and build a serialized engine; updates ``timing_cache``."""
        ...

    def load_engine(self, data: bytes, *, max_batch: int) -> EngineRunner:
        """Deserialize an engine and prepare it to run batches up to ``max_batch``."""
        ...


def load_toolkit() -> TrtToolkit:
    """The real toolkit, or BackendError saying what is missing (package, driver, GPU)."""
    from .tensorrt_api import RealToolkit

    return RealToolkit.create()


def engine_paths(cache_dir: Path, key: EngineKey) -> tuple[Path, Path, Path]:
    """(engine, sidecar json, timing cache) paths for ``key`` under ``cache_dir``."""
    stem = f"model.{gpu_slug(key.gpu_name)}.{key.precision}"
    timing = cache_dir / f"timing.{gpu_slug(key.gpu_name)}.trt{key.tensorrt_version}.cache"
    return cache_dir / f"{stem}.engine", cache_dir / f"{stem}.json", timing


def _cached_engine(engine: Path, sidecar: Path, key: EngineKey) -> bytes | None:
    """The cached engine's bytes if its sidecar key and sha256 match ``key``; else None."""
    if not engine.is_file() or not sidecar.is_file():
        return None
    try:
        meta = read_json(sidecar)
    except NgcalError:  # unreadable or corrupt sidecar: rebuild
        return None
    if not isinstance(meta, dict) or meta.get("schema") != KEY_SCHEMA:
        return None
    if meta.get("key") != asdict(key):
        log.info(
            "engine %s: key changed (%s -> %s); rebuilding", engine, meta.get("key"), asdict(key)
        )
        return None
    if meta.get("engine_sha256") != sha256_file(engine):
        log.warning("engine %s: sha256 does not match its sidecar; rebuilding", engine)
        return None
    return engine.read_bytes()


def ensure_engine(
    toolkit: TrtToolkit,
    onnx_path: Path,
    onnx_sha256: str,
    cache_dir: Path,
    *,
    precision: str,
    image_size: int,
    max_batch: int,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> tuple[bytes, EngineKey, bool]:
    """Return (engine bytes, key, built) from the cache, building on a miss or mismatch."""
    key = EngineKey(
        onnx_sha256=onnx_sha256,
        tensorrt_version=toolkit.tensorrt_version,
        gpu_name=toolkit.gpu_name(),
        precision=precision,
        max_batch=max_batch,
        image_size=image_size,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine, sidecar, timing = engine_paths(cache_dir, key)
    cached = _cached_engine(engine, sidecar, key)
    if cached is not None:
        log.info("engine cache hit %s (key %s)", engine, key.digest())
        return cached, key, False
    log.info("building TensorRT engine %s (%s, key %s)", engine, precision, key.digest())
    data = toolkit.build_engine(
        onnx_path,
        precision=precision,
        image_size=image_size,
        max_batch=max_batch,
        workspace_bytes=workspace_bytes,
        timing_cache=timing,
    )
    atomic_write_bytes(engine, data)
    atomic_write_json(
        sidecar,
        {
            "schema": KEY_SCHEMA,
            "key": asdict(key),
            "key_digest": key.digest(),
            "engine_sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    return data, key, True


class TrtScorer:
    """A ``Scorer`` over a TensorRT engine; complete after ``__init__`` (probe included)."""

    def __init__(
        self,
        runner: EngineRunner,
        preprocessing: Preprocessing,
        *,
        key: EngineKey,
        max_batch: int,
    ) -> None:
        self._runner = runner
        self._pre = preprocessing
        self._key = key
        self._max_batch = max_batch
        self._name = f"tensorrt:{key.gpu_name}:{key.precision}"
        probe(self._name, self.score, preprocessing.hw)

    @property
    def name(self) -> str:
        """``tensorrt:<gpu>:<precision>``."""
        return self._name

    @property
    def key(self) -> EngineKey:
        """The engine's cache key."""
        return self._key

    @property
    def preprocessing(self) -> Preprocessing:
        """The bundle's preprocessing."""
        return self._pre

    @property
    def max_batch(self) -> int:
        """The optimisation profile's maximum batch."""
        return self._max_batch

    def score(self, batch: np.ndarray) -> ScoreResult:
        """Score float32 [N,3,S,S]; batches above ``max_batch`` are split."""
        batch = check_batch(batch, self._pre.hw)
        return score_in_chunks(batch, self._max_batch, self._run)

    def _run(self, batch: np.ndarray) -> ScoreResult:
        out = self._runner.run(batch)
        missing = [n for n in OUTPUT_NAMES if n not in out]
        if missing:
            raise BackendError(f"{self._name}: engine did not produce {missing}")
        return ScoreResult(
            image_scores=np.asarray(out["image_score"], np.float32).reshape(-1),
            anomaly_maps=np.asarray(out["anomaly_map"], np.float32),
        )

    def close(self) -> None:
        """Free the engine's device resources."""
        self._runner.close()


def open_trt_scorer(
    bundle: Bundle,
    *,
    cache_dir: Path,
    precision: str,
    max_batch: int,
    toolkit: TrtToolkit | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> TrtScorer:
    """Build or reuse this device's engine for ``bundle`` and wrap it as a Scorer."""
    tk = toolkit if toolkit is not None else load_toolkit()
    onnx_entry = bundle.manifest.files[bundle.manifest.onnx]
    data, key, built = ensure_engine(
        tk,
        bundle.onnx_path,
        onnx_entry.sha256,
        Path(os.fspath(cache_dir)),
        precision=precision,
        image_size=bundle.image_size,
        max_batch=max_batch,
        workspace_bytes=workspace_bytes,
    )
    try:
        runner = tk.load_engine(data, max_batch=max_batch)
    except BackendError:
        raise
    except Exception as e:
        raise BackendError(f"TensorRT cannot load the engine for key {key.digest()}: {e}") from e
    log.info("TensorRT engine %s (%s)", "built" if built else "loaded from cache", key.digest())
    return TrtScorer(runner, bundle.manifest.preprocessing, key=key, max_batch=max_batch)


__all__ = [
    "INPUT_NAME",
    "EngineKey",
    "EngineRunner",
    "TrtScorer",
    "TrtToolkit",
    "engine_paths",
    "ensure_engine",
    "load_toolkit",
    "open_trt_scorer",
]
