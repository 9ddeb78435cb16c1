"""export_bundle and `ngcal export`: parity with torch, hashes, thresholds, TensorRT path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ngcal.core.bundle import open_bundle
from ngcal.core.dataset import load_category
from ngcal.core.errors import ArtifactError, BackendError
from ngcal.core.runtime import open_scorer
from ngcal.core.thresholds import ThresholdFile, save_thresholds

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngcal.export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("b") / "bundle"
    export_bundle(tiny_model, out)
    return out


def test_ort_scores_real_images_like_torch(
    bundle: Path, tiny_model: Path, demo_category: Path
) -> None:
    """ORT on the bundle and torch on the model dir score the same test images alike."""
    from ngcal.core.images import load_and_preprocess
    from ngcal.patchcore.io import load_model, score_paths

    paths = [s.path for s in load_category(demo_category).test]
    ref = score_paths(load_model(tiny_model), paths, batch_size=4)
    b = open_bundle(bundle)
    scorer = open_scorer(b, backend="ort-cpu", threads=1)
    batch = np.stack([load_and_preprocess(p, b.manifest.preprocessing) for p in paths])
    got = scorer.score(batch)
    diff = np.abs(got.image_scores.astype(np.float64) - ref.scores)
    scale = max(1.0, float(np.abs(ref.scores).max()))
    assert diff.max() <= 1e-4 * scale, (diff.max(), scale)
    assert ref.maps is not None and got.anomaly_maps is not None
    assert np.abs(got.anomaly_maps - ref.maps).max() <= 1e-4 * float(np.abs(ref.maps).max())
    # different images really get different scores (the check can fail)
    assert np.ptp(got.image_scores) > 100 * diff.max()


def test_manifest_records_parity_and_every_file(bundle: Path, tiny_model: Path) -> None:
    """The manifest lists model.onnx and the score sets with sha256, and the parity figure."""
    from ngcal.core.manifest import manifest_sha256

    b = open_bundle(bundle)
    m = b.manifest
    assert set(m.files) == {"model.onnx", "scores/normal_loo.json"}
    assert m.model_sha256 == manifest_sha256(tiny_model)
    assert m.parity_max_abs_diff is not None
    assert 0.0 <= m.parity_max_abs_diff <= float(m.extra["parity_tolerance"])
    assert m.onnx_opset == 17 and m.precision == "fp32"
    sets = b.scoresets()
    assert [s.source for s in sets] == ["normal_loo"]
    assert sets[0].model_sha256 == m.model_sha256  # bound to the model in the bundle
    assert oct((bundle / "manifest.json").stat().st_mode & 0o777) == oct(0o644)


def test_tampered_export_is_refused(bundle: Path, tmp_path: Path) -> None:
    """A flipped byte in an exported model.onnx -> ArtifactError naming the file."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="'model.onnx'"):
        open_bundle(copy)


def test_thresholds_ship_bound_to_the_model(tiny_model: Path, tmp_path: Path) -> None:
    """--thresholds is copied unhashed with the model's sha256; another model's is refused."""
    from ngcal.export.bundle_writer import export_bundle

    t = tmp_path / "t.json"
    save_thresholds(t, ThresholdFile(value=1.5, mode="fixed", method="fixed"))
    b = open_bundle(export_bundle(tiny_model, tmp_path / "b", thresholds=t).bundle)
    assert b.thresholds is not None and b.thresholds.value == 1.5
    assert b.thresholds.model_sha256 == b.model_sha256
    assert "thresholds.json" not in b.manifest.files
    save_thresholds(
        t, ThresholdFile(value=1.5, mode="fixed", method="fixed", model_sha256="f" * 64)
    )
    with pytest.raises(ArtifactError, match="thresholds belong to model"):
        export_bundle(tiny_model, tmp_path / "b2", thresholds=t)
    assert not (tmp_path / "b2").exists()


def test_parity_over_bound_writes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    """An impossible bound fails the export; the previous bundle at --out stays as it was."""
    from ngcal.export.bundle_writer import export_bundle

    out = tmp_path / "b"
    first = export_bundle(tiny_model, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError, match="differs from torch"):
        export_bundle(tiny_model, out, parity_rtol=1e-15)
    assert (out / "manifest.json").read_bytes() == before
    assert open_bundle(out).manifest.parity_max_abs_diff == first.parity.max_abs_diff
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folders left


def test_cli_tensorrt_without_tensorrt_says_so(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`ngcal export --format tensorrt` without TensorRT exits 2, says why, writes nothing."""
    import sys

    from ngcal.cli.main import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "b"
    rc = main(["export", "--model", str(tiny_model), "--out", str(out), "--format", "tensorrt"])
    assert rc == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_cli_onnx_prints_summary(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], demo_category: Path
) -> None:
    """`ngcal export` prints one JSON line with the parity figure and real images in the check."""
    from ngcal.cli.main import main

    out = tmp_path / "b"
    rc = main(
        [
            "export",
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--parity-data",
            str(demo_category / "test"),
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["bundle"] == str(out) and summary["opset"] == 17
    assert summary["parity_max_abs_diff"] <= summary["parity_tolerance"]
    assert open_bundle(out).manifest.extra["parity_inputs"] == "8"


class _OrtAsEngine:
    """A fake TensorRT toolkit whose 'engine' is the ONNX itself run by onnxruntime."""

    tensorrt_version = "10.0.0-fake"

    def __init__(self) -> None:
        self.onnx: Path | None = None
        self.built = 0

    def gpu_name(self) -> str:
        return "Fake GPU"

    def build_engine(self, onnx_path: Path, **kw: object) -> bytes:
        self.built += 1
        self.onnx = onnx_path
        return onnx_path.read_bytes()

    def load_engine(self, data: bytes, *, max_batch: int) -> object:
        import onnxruntime as ort

        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

        class Runner:
            def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
                a, s = sess.run(["anomaly_map", "image_score"], {"image": batch})
                return {"anomaly_map": a, "image_score": s}

            def close(self) -> None:
                pass

        return Runner()


def test_tensorrt_format_builds_and_checks_an_engine(tiny_model: Path, tmp_path: Path) -> None:
    """--format tensorrt builds into <bundle>/engines (unhashed) and checks the engine's parity."""
    from ngcal.export.bundle_writer import export_bundle

    tk = _OrtAsEngine()
    rep = export_bundle(
        tiny_model, tmp_path / "b", formats=["onnx", "tensorrt"], precision="fp16", toolkit=tk
    )
    assert tk.built == 1
    assert rep.engine == tmp_path / "b" / "engines" / "model.fake-gpu.fp16.engine"
    assert rep.engine.is_file() and rep.engine_parity is not None and rep.engine_parity.ok
    b = open_bundle(rep.bundle)  # engines do not break verification
    assert b.manifest.precision == "fp16"
    assert not any(k.startswith("engines/") for k in b.manifest.files)


def test_unknown_format_and_missing_gpu(tiny_model: Path, tmp_path: Path) -> None:
    """Bad --format is a ConfigError; a toolkit that cannot start stops the export early."""
    from ngcal.core.errors import ConfigError
    from ngcal.export.bundle_writer import export_bundle

    with pytest.raises(ConfigError, match="format"):
        export_bundle(tiny_model, tmp_path / "b", formats=["openvino"])

    import ngcal.core.trt_backend as tb

    def no_gpu() -> object:
        raise BackendError("no NVIDIA driver")

    orig = tb.load_toolkit
    tb.load_toolkit = no_gpu  # type: ignore[assignment]
    try:
        with pytest.raises(BackendError, match="no NVIDIA driver"):
            export_bundle(tiny_model, tmp_path / "b", formats=["tensorrt"])
    finally:
        tb.load_toolkit = orig
    assert not (tmp_path / "b").exists()
