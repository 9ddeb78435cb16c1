"""TensorRT engine cache and scorer without a GPU: a fake toolkit at the TrtToolkit seam."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ngcal.core import trt_backend
from ngcal.core.bundle import open_bundle
from ngcal.core.errors import BackendError
from ngcal.core.runtime import open_scorer
from ngcal.core.trt_backend import EngineKey, engine_paths, ensure_engine, open_trt_scorer
from ngcal.export.toy_bundle import toy_score, write_toy_bundle  # noqa: E402


class FakeRunner:
    """Runs the toy rule in numpy, as the engine built from the toy ONNX would."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"anomaly_map": (batch**2).mean(axis=1), "image_score": toy_score(batch)}

    def close(self) -> None:
        self.closed = True


class FakeToolkit:
    """Records builds; the 'engine' bytes encode the key fields so tests can read them."""

    def __init__(self, version: str = "10.13.0", gpu: str = "NVIDIA H200") -> None:
        self.tensorrt_version = version
        self.gpu = gpu
        self.builds: list[dict[str, object]] = []

    def gpu_name(self) -> str:
        return self.gpu

    def build_engine(self, onnx_path: Path, **kw: object) -> bytes:
        self.builds.append(dict(kw))
        timing = kw["timing_cache"]
        assert isinstance(timing, Path)
        timing.write_bytes(b"timing")
        return f"engine:{self.gpu}:{self.tensorrt_version}:{kw['precision']}".encode()

    def load_engine(self, data: bytes, *, max_batch: int) -> FakeRunner:
        return FakeRunner(data)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_toy_bundle(tmp_path / "toy", image_size=32)


def _ensure(tk: FakeToolkit, bundle: Path, cache: Path, precision: str = "fp16") -> bool:
    b = open_bundle(bundle)
    sha = b.manifest.files["model.onnx"].sha256
    _, _, built = ensure_engine(
        tk, b.onnx_path, sha, cache, precision=precision, image_size=32, max_batch=8
    )
    return built


def test_engine_is_built_once_then_reused(toy: Path, tmp_path: Path) -> None:
    """First start builds and caches; the second start with the same key reuses the engine."""
    tk = FakeToolkit()
    cache = tmp_path / "cache"
    assert _ensure(tk, toy, cache) is True
    assert _ensure(tk, toy, cache) is False
    assert len(tk.builds) == 1
    b = tk.builds[0]
    assert b["precision"] == "fp16" and b["max_batch"] == 8 and b["image_size"] == 32
    assert b["workspace_bytes"] == trt_backend.DEFAULT_WORKSPACE_BYTES
    names = sorted(p.name for p in cache.iterdir())
    assert names == [
        "model.nvidia-h200.fp16.engine",
        "model.nvidia-h200.fp16.json",
        "timing.nvidia-h200.trt10.13.0.cache",
    ]
    meta = json.loads((cache / "model.nvidia-h200.fp16.json").read_text())
    assert meta["key"]["gpu_name"] == "NVIDIA H200"
    assert meta["key"]["onnx_sha256"] == open_bundle(toy).manifest.files["model.onnx"].sha256


@pytest.mark.parametrize(
    "change",
    ["tensorrt_version", "gpu_same_slug", "precision", "onnx", "corrupt_engine", "no_sidecar"],
)
def test_key_mismatch_rebuilds(toy: Path, tmp_path: Path, change: str) -> None:
    """Any change of ONNX, TensorRT version, GPU, precision, or a damaged cache rebuilds."""
    cache = tmp_path / "cache"
    tk = FakeToolkit()
    assert _ensure(tk, toy, cache)
    precision = "fp16"
    bundle = toy
    if change == "tensorrt_version":
        tk = FakeToolkit(version="10.14.1")
    elif change == "gpu_same_slug":
        tk = FakeToolkit(gpu="NVIDIA-H200")  # same file name, different device name
    elif change == "precision":
        precision = "fp32"
    elif change == "onnx":
        bundle = write_toy_bundle(tmp_path / "other", image_size=32, model_sha256="a" * 64)
        import onnx as onnx_pkg

        onnx = bundle / "model.onnx"
        proto = onnx_pkg.load_from_string(onnx.read_bytes())
        proto.producer_version = "another export"
        onnx.write_bytes(proto.SerializeToString())  # other bytes: another export
        from ngcal.core.manifest import BundleManifest, read_manifest, write_manifest

        m = read_manifest(bundle, verify=False)
        assert isinstance(m, BundleManifest)
        write_manifest(bundle, m)
    elif change == "corrupt_engine":
        engine = cache / "model.nvidia-h200.fp16.engine"
        engine.write_bytes(b"x" + engine.read_bytes()[1:])
    elif change == "no_sidecar":
        (cache / "model.nvidia-h200.fp16.json").unlink()
    n = len(tk.builds)
    assert _ensure(tk, bundle, cache, precision) is True
    assert len(tk.builds) == n + 1
    assert _ensure(tk, bundle, cache, precision) is False  # and the rebuilt one is reused


def test_key_digest_is_stable_and_sensitive() -> None:
    """Equal keys hash equal; each field changes the digest."""
    base = EngineKey("a" * 64, "10.13.0", "NVIDIA H200", "fp16", 8, 256)
    assert base.digest() == EngineKey("a" * 64, "10.13.0", "NVIDIA H200", "fp16", 8, 256).digest()
    variants = [
        EngineKey("b" * 64, "10.13.0", "NVIDIA H200", "fp16", 8, 256),
        EngineKey("a" * 64, "10.13.1", "NVIDIA H200", "fp16", 8, 256),
        EngineKey("a" * 64, "10.13.0", "NVIDIA L4", "fp16", 8, 256),
        EngineKey("a" * 64, "10.13.0", "NVIDIA H200", "fp32", 8, 256),
        EngineKey("a" * 64, "10.13.0", "NVIDIA H200", "fp16", 16, 256),
    ]
    assert len({v.digest() for v in variants} | {base.digest()}) == 6
    eng, side, timing = engine_paths(Path("c"), base)
    assert eng.name == "model.nvidia-h200.fp16.engine" and side.suffix == ".json"
    assert "trt10.13.0" in timing.name


def test_trt_scorer_scores_through_the_engine_runner(toy: Path, tmp_path: Path) -> None:
    """The scorer probes at start-up, splits big batches, and closes its runner."""
    tk = FakeToolkit()
    s = open_trt_scorer(
        open_bundle(toy), cache_dir=tmp_path / "c", precision="fp32", max_batch=4, toolkit=tk
    )
    assert s.name == "tensorrt:NVIDIA H200:fp32"
    x = np.random.default_rng(1).normal(size=(9, 3, 32, 32)).astype(np.float32)
    r = s.score(x)
    np.testing.assert_allclose(r.image_scores, toy_score(x), rtol=1e-6)
    assert r.anomaly_maps is not None and r.anomaly_maps.shape == (9, 32, 32)
    s.close()


def test_missing_tensorrt_is_a_clear_error(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the tensorrt package, open_scorer(backend='tensorrt') says so and suggests ORT."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendError, match="TensorRT is not installed.*ort-cpu"):
        open_scorer(toy, backend="tensorrt")


def test_missing_gpu_is_a_clear_error(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tensorrt importable but no NVIDIA driver, the error names the driver and GPU."""
    import types

    from ngcal.core import tensorrt_api

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(tensorrt_api.ctypes.util, "find_library", lambda name: None)
    real_cdll = tensorrt_api.ctypes.CDLL

    def no_driver(name: str, *a: object, **k: object) -> object:
        if "cuda" in str(name):
            raise OSError(f"{name}: cannot open shared object file")
        return real_cdll(name, *a, **k)

    monkeypatch.setattr(tensorrt_api.ctypes, "CDLL", no_driver)
    with pytest.raises(BackendError, match="no NVIDIA driver.*needs a GPU"):
        open_scorer(toy, backend="tensorrt")


def test_failed_probe_is_a_backend_error(toy: Path, tmp_path: Path) -> None:
    """An engine that returns NaN at the start-up probe is refused."""

    class NanRunner(FakeRunner):
        def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            out = super().run(batch)
            out["image_score"] = np.full(len(batch), np.nan, np.float32)
            return out

    tk = FakeToolkit()
    tk.load_engine = lambda data, max_batch: NanRunner(data)  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="probe"):
        open_trt_scorer(
            open_bundle(toy), cache_dir=tmp_path / "c", precision="fp32", max_batch=4, toolkit=tk
        )
