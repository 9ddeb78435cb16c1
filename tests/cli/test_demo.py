"""`ngcal demo`, README's first command, end to end on a small procedural category."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch


def test_demo_runs_every_step_and_the_bundle_applies_its_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fit -> generate glass -> calibrate -> export -> evaluate all succeed; the bundle carries
    the calibrated threshold, and evaluating it reports that threshold's quality."""
    from ngcal.cli.main import main
    from ngcal.core.bundle import open_bundle
    from ngcal.core.thresholds import load_thresholds

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--image-size", "64", "--train-images", "16"])
    assert rc == 0
    for rel in (
        "model/manifest.json",
        "glass/contact_sheet.png",
        "thresholds.json",
        "report.html",
        "bundle/manifest.json",
        "bundle/model.onnx",
    ):
        assert (out / rel).is_file(), rel
    thresholds = load_thresholds(out / "thresholds.json")
    bundle = open_bundle(out / "bundle")
    assert bundle.thresholds is not None and bundle.thresholds.value == thresholds.value
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kind"] == "bundle"
    assert report["threshold"] == pytest.approx(thresholds.value)
    assert report["mode"] == thresholds.mode
    assert report["image_auroc"] >= 0.9  # the demo defects are plainly visible
    assert report["n_test"] == 60 and report["errors"] == []
