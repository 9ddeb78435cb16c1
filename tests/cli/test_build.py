"""``ngcal build``: every step into one build folder, resumable by input hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.torch

FAST = """fit: {image_size: 64, cv_folds: 2}
glass: {epochs: 1, count: 8, pool_images: 4, hidden: 64}
calibrate: {title: "ngcal calibration: demo part"}
"""


@pytest.fixture(scope="module")
def demo_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngcal.generation.demo_data import make_demo_category

    root = tmp_path_factory.mktemp("build") / "part"
    return make_demo_category(root, n_train=12, n_test_good=6, n_test_per_defect=2, size=96)


def test_build_writes_a_verified_bundle_and_reuses_finished_steps(
    demo_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first build runs every step and ends with a summary; a second one reuses every step;
    a changed calibration option reruns calibrate and what follows it, never fit."""
    from ngcal.cli.main import main
    from ngcal.core.bundle import open_bundle
    from ngcal.core.thresholds import load_thresholds

    out = tmp_path / "b"
    cfg = tmp_path / "build.yaml"
    cfg.write_text(FAST)
    argv = ["build", "--data", str(demo_category), "--out", str(out), "--config", str(cfg)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    bundle = open_bundle(out / "bundle")  # verifies every hash
    assert bundle.thresholds is not None
    assert bundle.thresholds.value == load_thresholds(out / "thresholds.json").value
    sources = {s.source for s in bundle.scoresets()}
    assert any(s.startswith("glass") for s in sources), sources  # evidence ships
    record = json.loads((out / "build.json").read_text())
    assert list(record["steps"]) == ["fit", "glass", "calibrate", "export", "evaluate"]
    assert "image AUROC" in text and "of good parts" in text and "%" in text
    assert "<title>ngcal calibration: demo part" in (out / "report.html").read_text()
    assert json.loads((out / "evaluation.json").read_text())["image_auroc"] is not None
    # build fits as ``ngcal fit --auto`` does: the rule (and part mask) chosen with evidence
    settings = {c.setting for c in bundle.manifest.patchcore.choices}
    assert "image_score" in settings, settings

    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("reused (inputs unchanged)") == 5

    onnx = out / "bundle" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # a corrupt output is not reused
    assert main(argv) == 0
    fixed = capsys.readouterr().out
    assert "export: done" in fixed and "calibrate: reused" in fixed
    open_bundle(out / "bundle")

    cfg.write_text(
        FAST
        + "\n".join(["", "calibrate: {mode: target_fpr}"]).replace(
            'calibrate: {title: "ngcal calibration: demo part"}\n', ""
        )
    )
    assert main(argv) == 0
    third = capsys.readouterr().out
    assert "fit: reused" in third and "glass: reused" in third
    assert "calibrate: done" in third and "export: done" in third
    assert load_thresholds(out / "bundle" / "thresholds.json").mode == "target_fpr"


def test_build_names_a_missing_data_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--data that does not exist is an error that says so, before any work."""
    from ngcal.cli.main import main

    rc = main(["build", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_build_needs_train_good_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain folder of images is refused up front, naming the layout it needs."""
    from ngcal.cli.main import main

    (tmp_path / "plain").mkdir()
    rc = main(["build", "--data", str(tmp_path / "plain"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "train/good" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_diffusion_step_only_when_asked_or_given_real_ng(tmp_path: Path) -> None:
    """No --diffusion and no --ng: no diffusion step; --ng: a diffusion step that learns from
    those NG, before calibrate (when the generator and its extra are installed)."""
    import argparse

    from ngcal.cli.build import Build, _has_generator, load_build_config

    def names(**kw: object) -> list[str]:
        ns = argparse.Namespace(
            data=tmp_path, out=tmp_path / "b", ng=None, diffusion=False, force=False
        )
        for k, v in kw.items():
            setattr(ns, k, v)
        return [s.name for s in Build(ns, load_build_config(None)).steps()]

    assert "diffusion" not in names()
    if not _has_generator("diffusion"):
        pytest.skip("diffusion generator or its extra not installed")
    ng = tmp_path / "ng"
    ng.mkdir()
    Image.new("L", (8, 8)).save(ng / "a.png")
    # NG images without masks: calibrate still takes them, diffusion has nothing to learn
    assert "diffusion" not in names(ng=ng)
    assert "diffusion" in names(ng=ng, diffusion=True)
    Image.new("L", (8, 8), 255).save(ng / "a_mask.png")
    with_ng = names(ng=ng)
    assert with_ng.index("diffusion") == with_ng.index("calibrate") - 1
    assert "diffusion" in names(diffusion=True)
