"""Non-square inputs: the aspect-keeping size, and one fixed non-square graph per bundle
whose onnxruntime scores and maps match the torch model's on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ngcal.cli.main import main
from ngcal.core.manifest import ModelManifest, read_manifest
from ngcal.patchcore.geometry import keep_aspect_hw, median_aspect

pytestmark = pytest.mark.torch


def test_keep_aspect_rounds_sides_to_multiples_of_32() -> None:
    """The long side is the requested size; the short side follows the ratio; both /32."""
    assert keep_aspect_hw(256, 1.0) == (256, 256)
    assert keep_aspect_hw(256, 1.16) == (256, 224)
    assert keep_aspect_hw(320, 0.4) == (128, 320)
    assert keep_aspect_hw(256, 20.0) == (256, 32)


def test_median_aspect_reads_headers(tmp_path: Path) -> None:
    """Median height/width over the images."""
    from PIL import Image

    for i, (w, h) in enumerate([(100, 200), (100, 150), (300, 100)]):
        Image.new("L", (w, h)).save(tmp_path / f"{i}.png")
    assert median_aspect(sorted(tmp_path.glob("*.png"))) == pytest.approx(1.5)


def test_non_square_bundle_matches_torch(small_category: Path, tmp_path: Path) -> None:
    """fit --aspect keep writes input_hw; the exported graph takes that size and its image
    scores and maps equal the torch model's on the test images (parity)."""
    from ngcal.core.runtime import open_scorer, score_files
    from ngcal.export.bundle_writer import export_bundle
    from ngcal.patchcore.io import load_model, score_paths

    model, bundle = tmp_path / "model", tmp_path / "bundle"
    args = ["fit", "--data", str(small_category), "--out", str(model), "--image-size", "128"]
    assert main([*args, "--aspect", "keep", "--cv-folds", "0", "--quiet"]) == 0
    m = read_manifest(model)
    assert isinstance(m, ModelManifest)
    hw = m.preprocessing.hw
    assert m.preprocessing.input_hw == hw and hw[0] != hw[1]
    assert hw == keep_aspect_hw(
        128, median_aspect(sorted((small_category / "train").rglob("*.png")))
    )
    export_bundle(model, bundle)
    paths = sorted((small_category / "test").rglob("*.png"))
    ref = score_paths(load_model(model), paths, batch_size=2)
    assert ref.maps is not None and ref.maps.shape == (len(paths), *hw)
    scorer = open_scorer(bundle, backend="ort-cpu", threads=1)
    try:
        got = score_files(scorer, paths, batch_size=2, with_maps=True)
    finally:
        scorer.close()
    assert got.maps is not None and got.maps.shape == ref.maps.shape
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4)
    np.testing.assert_allclose(got.maps, ref.maps, rtol=1e-3, atol=1e-3 * float(ref.maps.max()))
