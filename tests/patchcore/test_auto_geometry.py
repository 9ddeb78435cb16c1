"""``fit --auto``'s geometry: square, aspect kept or one size up, chosen from held-out good
images and synthetic NG within the latency budget, recorded with the time per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ngcal.cli.main import main
from ngcal.core.manifest import ModelManifest, read_manifest
from ngcal.patchcore.auto_geometry import LATENCY_BUDGET, geometry_candidates
from ngcal.patchcore.geometry import median_aspect
from ngcal.patchcore.selection import choose

pytestmark = pytest.mark.torch


def test_candidates_are_the_default_square_then_distinct_aspects() -> None:
    """A square product gets 256 and 288 squares; others their aspect at about the
    square's pixel count and at 1.27x it (sides multiples of 32)."""
    assert [g.label for g in geometry_candidates(256, 1.0)] == ["256x256", "288x288"]
    assert [g.label for g in geometry_candidates(256, 1.16)] == ["256x256", "288x256", "320x288"]
    long_part = geometry_candidates(256, 0.4)
    assert [g.label for g in long_part] == ["256x256", "160x416", "192x448"]
    pixels = [g.hw[0] * g.hw[1] / 256**2 for g in long_part]
    assert abs(pixels[1] - 1.0) < 0.1 and 1.2 < pixels[2] < 1.4


def test_an_ineligible_candidate_is_reported_but_never_chosen() -> None:
    """The clearly better candidate wins when eligible, and the default stays when it is
    not (over the latency budget), with its evidence still in the table."""
    rng = np.random.default_rng(0)
    normal = {"a": rng.normal(0, 1, 80), "b": rng.normal(0, 1, 80)}
    ng = {"a": rng.normal(0.3, 1, 80), "b": rng.normal(3, 1, 80)}
    assert choose(normal, ng)[1] == "b"
    table, won = choose(normal, ng, eligible=["a"])
    assert won == "a" and [e.candidate for e in table] == ["a", "b"]
    assert table[1].separation > 0.9


def test_choose_geometry_compares_on_the_same_images(small_category: Path) -> None:
    """Each candidate is fitted on the same images and folds and probed with the same
    synthetic defects: the table holds every candidate with its separation and time per
    image, and the choice is within the latency budget."""
    from ngcal.patchcore.auto_geometry import Geometry, choose_geometry
    from ngcal.patchcore.fitting import FitConfig

    paths = sorted((small_category / "train" / "good").iterdir())
    cfg = FitConfig(image_size=64, cv_folds=4, coreset_ratio=0.05, probe_images=8)
    cands = [Geometry((64, 64)), Geometry((64, 96))]
    g, choice = choose_geometry(paths, cfg, cands)
    assert choice is not None and choice.setting == "geometry"
    assert [c.candidate for c in choice.candidates] == ["64x64", "64x96"]
    assert choice.n_normal == 16 and choice.n_ng == 8
    assert all(0 <= c.separation <= 1 and (c.ms_per_image or 0) > 0 for c in choice.candidates)
    base = choice.candidates[0].ms_per_image or 0.0
    chosen = next(c for c in choice.candidates if c.candidate == choice.chosen)
    assert g.label == choice.chosen and (chosen.ms_per_image or 0) <= LATENCY_BUDGET * base


@pytest.mark.slow
def test_auto_chooses_and_records_the_geometry(small_category: Path, tmp_path: Path) -> None:
    """Without --image-size/--aspect, fit compares the geometries on held-out good vs
    synthetic NG, records the table with each candidate's time per image first in the
    manifest, and fits at a chosen size within the latency budget."""
    out = tmp_path / "model"
    args = ["fit", "--data", str(small_category), "--out", str(out), "--quiet"]
    assert main([*args, "--cv-folds", "4", "--coreset-ratio", "0.05"]) == 0
    m = read_manifest(out)
    assert isinstance(m, ModelManifest)
    geo = m.patchcore.choices[0]
    aspect = median_aspect(sorted((small_category / "train" / "good").iterdir()))
    labels = [g.label for g in geometry_candidates(256, aspect)]
    assert geo.setting == "geometry" and [c.candidate for c in geo.candidates] == labels
    assert geo.n_normal == 16 and all((c.ms_per_image or 0) > 0 for c in geo.candidates)
    base = geo.candidates[0].ms_per_image or 0.0
    chosen = next(c for c in geo.candidates if c.candidate == geo.chosen)
    assert chosen.ms_per_image is not None and chosen.ms_per_image <= LATENCY_BUDGET * base
    h, w = m.preprocessing.hw
    assert geo.chosen == f"{h}x{w}"
    assert [c.setting for c in m.patchcore.choices] == ["geometry", "foreground", "image_score"]
