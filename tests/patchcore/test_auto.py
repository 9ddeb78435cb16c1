"""``fit --auto``: the image-score rule chosen from held-out good images and small synthetic
defects only (no test labels), recorded with its evidence; the defect maker itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ngcal.cli.main import main
from ngcal.core.manifest import ModelManifest, read_manifest
from ngcal.core.scoresets import load_scoreset
from ngcal.patchcore.probe_defects import ProbeDefects, ellipse_mask, paste_defects
from ngcal.patchcore.selection import CANDIDATE_RULES

pytestmark = pytest.mark.torch


def test_defects_are_small_seeded_and_local() -> None:
    """Each image changes inside a region of about the drawn area only; same seed, same
    defects; another seed, other defects."""
    x = torch.randn(6, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    cfg = ProbeDefects(area=(0.005, 0.02), seed=3)
    a, b = paste_defects(x, cfg), paste_defects(x, cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, paste_defects(x, ProbeDefects(area=(0.005, 0.02), seed=4)))
    changed = ((a - x).abs().amax(dim=1) > 1e-6).float().mean(dim=(1, 2))
    assert bool((changed > 0).all()) and float(changed.max()) < 0.06


def test_ellipse_mask_has_the_requested_area() -> None:
    """The soft mask's mass is close to the requested share of the image."""
    g = torch.Generator().manual_seed(0)
    areas = [float(ellipse_mask(128, 128, 0.01, g).mean()) for _ in range(20)]
    assert 0.005 < float(np.median(areas)) < 0.015


def test_auto_fit_needs_no_test_split_and_records_its_choice(
    small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With train/good only (the test split replaced by a corrupt file), ``fit --auto``
    rejects a part mask on the full-frame tile surface, chooses a candidate rule, records
    the evidence table in the manifest, prints it, and writes held-out scores by the
    chosen rule."""
    data = tmp_path / "cat"
    (data / "train").mkdir(parents=True)
    (data / "train" / "good").symlink_to(small_category / "train" / "good")
    (data / "test").mkdir()
    (data / "test" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "model"
    args = ["fit", "--data", str(data), "--out", str(out), "--auto", "--image-size", "128"]
    assert main([*args, "--cv-folds", "4", "--coreset-ratio", "0.05", "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    m = read_manifest(out)
    assert isinstance(m, ModelManifest)
    fg, choice = m.patchcore.choices  # the part mask first, then the rule
    # magnetic tile fills the frame: no part/background split, the whole frame is kept
    assert (fg.setting, fg.chosen, m.patchcore.foreground) == ("foreground", "whole_frame", None)
    assert fg.note is not None and fg.candidates == ()
    labels = [c.candidate for c in choice.candidates]
    assert labels == [r.label for r in CANDIDATE_RULES]
    assert choice.chosen in labels and choice.n_ng == choice.n_normal == 16
    assert all(0.0 <= c.separation <= 1.0 for c in choice.candidates)
    chosen = next(r for r in CANDIDATE_RULES if r.label == choice.chosen)
    assert (m.patchcore.image_score, m.patchcore.image_score_k) == (chosen.name, chosen.manifest_k)
    assert summary["image_score"] == chosen.name
    assert "<- chosen" in captured.err and choice.chosen in captured.err
    hold = load_scoreset(out / "scores" / "normal_holdout.json")
    assert hold.meta["image_score"] == choice.chosen and np.isfinite(hold.scores).all()


def test_a_named_rule_is_not_chosen(small_model: Path) -> None:
    """With --image-score/--image-size given, fit records no choice (old behaviour)."""
    m = read_manifest(small_model)
    assert m.patchcore.choices == () and m.patchcore.image_score == "topk_mean"
