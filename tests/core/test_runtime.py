"""open_scorer: the onnxruntime backend on a real session, its probe, and torch-free imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ngcal.core import ort_backend
from ngcal.core.bundle import open_bundle
from ngcal.core.errors import BackendError, ConfigError, DataError
from ngcal.core.runtime import open_scorer
from ngcal.core.scorer import Scorer
from ngcal.export.toy_bundle import toy_score, write_toy_bundle  # noqa: E402


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_toy_bundle(tmp_path / "toy", image_size=32)


def test_ort_cpu_scores_match_the_graph_rule(toy: Path) -> None:
    """Scores and maps from a real ORT session equal the toy rule computed in numpy."""
    s = open_scorer(toy, backend="ort-cpu", threads=1, max_batch=4)
    assert isinstance(s, Scorer)
    assert s.name == "onnxruntime:CPUExecutionProvider"
    x = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    r = s.score(x)  # 10 > max_batch: split into 4 + 4 + 2
    np.testing.assert_allclose(r.image_scores, toy_score(x), rtol=1e-6)
    assert r.anomaly_maps is not None and r.anomaly_maps.shape == (10, 32, 32)
    np.testing.assert_allclose(r.anomaly_maps, (x**2).mean(axis=1), rtol=1e-6)
    s.close()


def test_bad_batches_are_refused(toy: Path) -> None:
    """Wrong size or dtype is a DataError naming the shape/dtype, not an ORT crash."""
    s = open_scorer(open_bundle(toy))
    with pytest.raises(DataError, match=r"\(2, 3, 16, 16\)"):
        s.score(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="float64"):
        s.score(np.zeros((1, 3, 32, 32), np.float64))


def test_unknown_backend_and_options(toy: Path) -> None:
    """Unknown backend names and nonsense options are ConfigErrors."""
    with pytest.raises(ConfigError, match="onnx-gpu"):
        open_scorer(toy, backend="onnx-gpu")
    with pytest.raises(ConfigError, match="threads"):
        open_scorer(toy, threads=0)


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-tensorrt"])
def test_unavailable_provider_is_a_clear_backend_error(toy: Path, backend: str) -> None:
    """On a CPU-only wheel, asking for CUDA/TensorRT names the provider and what is available."""
    import onnxruntime as ort

    wanted = ort_backend._PROVIDER[backend]
    if wanted in ort.get_available_providers():
        pytest.skip(f"{wanted} is available here; the GPU check covers it")
    with pytest.raises(BackendError, match=rf"{wanted}.*available: .*CPUExecutionProvider"):
        open_scorer(toy, backend=backend)


class _FakeSession:
    """An InferenceSession stand-in: silently fell back to CPU, or returns junk."""

    def __init__(self, providers: list[str], score: float) -> None:
        self._providers, self._score = providers, score

    def get_providers(self) -> list[str]:
        return self._providers

    def get_inputs(self) -> list[Any]:
        return [type("I", (), {"name": "image"})()]

    def get_outputs(self) -> list[Any]:
        return [type("O", (), {"name": n})() for n in ("anomaly_map", "image_score")]

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n, s = feeds["image"].shape[0], feeds["image"].shape[-1]
        return [np.zeros((n, s, s), np.float32), np.full((n,), self._score, np.float32)]


def _patch_ort(
    monkeypatch: pytest.MonkeyPatch, session: _FakeSession, available: list[str]
) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: session)


def test_listed_provider_that_falls_back_is_refused(
    toy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel that lists CUDA but whose session ends up on CPU only is a BackendError."""
    _patch_ort(
        monkeypatch,
        _FakeSession(["CPUExecutionProvider"], 0.0),
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with pytest.raises(BackendError, match="fell back to CPUExecutionProvider"):
        open_scorer(toy, backend="ort-cuda")


def test_probe_rejects_non_finite_output(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start-up probe inference catches a provider that computes garbage (NaN)."""
    _patch_ort(
        monkeypatch,
        _FakeSession(["CUDAExecutionProvider", "CPUExecutionProvider"], float("nan")),
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with pytest.raises(BackendError, match="probe inference"):
        open_scorer(toy, backend="ort-cuda")


def test_tensorrt_provider_options_carry_the_engine_cache(tmp_path: Path) -> None:
    """The ORT TensorRT EP is configured with engine + timing caches, FP16 and the profile."""
    chain = ort_backend.provider_chain(
        "ort-tensorrt", image_size=64, max_batch=8, precision="fp16", cache_dir=tmp_path
    )
    names = [p for p, _ in chain]
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = chain[0][1]
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_fp16_enable"] == "True"
    assert opts["trt_profile_max_shapes"] == "image:8x3x64x64"
    with pytest.raises(BackendError, match="cache_dir"):
        ort_backend.provider_chain(
            "ort-tensorrt", image_size=64, max_batch=8, precision="fp32", cache_dir=None
        )


def test_scorer_runs_without_torch(toy: Path) -> None:
    """Opening a bundle and scoring works with torch unimportable, and never loads it."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from ngcal.core.bundle import open_bundle\n"
        "from ngcal.core.runtime import open_scorer\n"
        "import ngcal.core.trt_backend, ngcal.core.tensorrt_api\n"
        f"s = open_scorer(open_bundle({str(toy)!r}))\n"
        "r = s.score(np.ones((2, 3, 32, 32), np.float32))\n"
        "assert r.image_scores.tolist() == [1.0, 1.0], r.image_scores\n"
        "assert sys.modules.get('torch') is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_score_files_scores_readable_and_reports_unreadable(toy: Path, tmp_path: Path) -> None:
    """score_files decodes with core.images, scores in batches, and NaNs broken files."""
    from PIL import Image

    from ngcal.core.images import load_and_preprocess
    from ngcal.core.runtime import score_files

    s = open_scorer(toy, max_batch=2)
    paths = []
    for i in range(3):
        arr = np.full((40, 50), 60 * i, np.uint8)
        Image.fromarray(arr, mode="L").save(p := tmp_path / f"{i}.png")
        paths.append(p)
    (bad := tmp_path / "bad.png").write_bytes(b"not a png")
    paths.insert(1, bad)
    out = score_files(s, paths, batch_size=3, with_maps=True)
    assert out.errors == [(str(bad), "not_an_image")]
    assert np.isnan(out.scores[1]) and np.isfinite(out.scores[[0, 2, 3]]).all()
    spec = s.preprocessing
    want = toy_score(np.stack([load_and_preprocess(p, spec) for p in paths if p != bad]))
    np.testing.assert_allclose(out.scores[[0, 2, 3]], want, rtol=1e-6)
    assert out.maps is not None and out.maps.shape == (4, 32, 32)
