"""`ngcal export --bank-fraction`: greedy-prefix bank, manifest, parity, what is left out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ngcal.core.bundle import open_bundle
from ngcal.core.errors import ConfigError
from ngcal.core.files import load_npy
from ngcal.core.runtime import open_scorer
from ngcal.core.thresholds import ThresholdFile, save_thresholds

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def half_bundle(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ngcal.cli.main import main

    out = tmp_path_factory.mktemp("half") / "bundle"
    rc = main(["export", "--model", str(tiny_model), "--out", str(out), "--bank-fraction", "0.5"])
    assert rc == 0
    return out


def test_bank_is_stored_in_greedy_order(
    tiny_model: Path, demo_category: Path, tmp_path: Path
) -> None:
    """A fit at half the coreset ratio selects exactly the first rows of the full bank."""
    from ngcal.cli.main import main

    full = load_npy(tiny_model / "memory_bank.npy")
    ratio = json.loads((tiny_model / "manifest.json").read_text())["patchcore"]["coreset_ratio"]
    small = tmp_path / "small"
    argv = ["fit", "--data", str(demo_category), "--out", str(small), "--image-size", "64"]
    rc = main(argv + ["--coreset-ratio", str(ratio / 2), "--cv-folds", "0", "--quiet"])
    assert rc == 0
    prefix = load_npy(small / "memory_bank.npy")
    assert 1 < len(prefix) < len(full)
    np.testing.assert_array_equal(prefix, full[: len(prefix)])


def test_reduced_bundle_manifest_and_parity(
    half_bundle: Path, tiny_model: Path, demo_category: Path
) -> None:
    """The bundle records the prefix size; ORT matches torch with the same prefix bank, and
    every score is at least the full bank's (a subset can only be farther away)."""

    from ngcal.core.dataset import load_category
    from ngcal.core.images import load_and_preprocess
    from ngcal.export.bundle_writer import truncate_bank
    from ngcal.patchcore.io import load_model

    loaded = load_model(tiny_model)
    full_rows = int(loaded.module.memory_bank.shape[0])
    rows = math.ceil(0.5 * full_rows)
    b = open_bundle(half_bundle)
    m = b.manifest
    assert m.patchcore.coreset_size == rows
    assert m.patchcore.coreset_ratio == pytest.approx(
        loaded.manifest.patchcore.coreset_ratio * rows / full_rows
    )
    assert m.extra["bank_fraction"] == "0.5" and m.extra["bank_rows_source"] == str(full_rows)
    assert b.scoresets() == [] and "scores/normal_loo.json" not in m.files
    test = load_category(demo_category).test
    x = np.stack([load_and_preprocess(t.path, m.preprocessing) for t in test])
    got = open_scorer(b, backend="ort-cpu", threads=1).score(x).image_scores.astype(np.float64)
    with torch.inference_mode():
        ref = truncate_bank(loaded.module, rows)(torch.from_numpy(x))[1].double().numpy()
        full = loaded.module(torch.from_numpy(x))[1].double().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert np.all(ref >= full - 1e-4)
    assert np.abs(ref - full).max() > 1e3 * np.abs(got - ref).max()  # the prefix matters


def test_bad_fraction_and_thresholds_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    """F outside (0, 1] and thresholds with a reduced bank are ConfigErrors; nothing written."""
    from ngcal.export.bundle_writer import export_bundle

    for f in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="--bank-fraction"):
            export_bundle(tiny_model, tmp_path / "b", bank_fraction=f)
    t = tmp_path / "t.json"
    save_thresholds(t, ThresholdFile(value=1.0, mode="fixed", method="fixed"))
    with pytest.raises(ConfigError, match="--thresholds with --bank-fraction"):
        export_bundle(tiny_model, tmp_path / "b", bank_fraction=0.5, thresholds=t)
    assert not (tmp_path / "b").exists()


def test_copied_thresholds_refused_on_reduced_bundle(half_bundle: Path, tmp_path: Path) -> None:
    """A thresholds.json copied into a reduced-bank bundle is refused at open, naming the file."""
    import shutil

    from ngcal.core.errors import ArtifactError

    bundle = tmp_path / "bundle"
    shutil.copytree(half_bundle, bundle)
    open_bundle(bundle)  # loads without thresholds
    save_thresholds(bundle / "thresholds.json", ThresholdFile(value=1.0, mode="fixed", method="x"))
    with pytest.raises(ArtifactError, match="thresholds.json.*fraction"):
        open_bundle(bundle)
