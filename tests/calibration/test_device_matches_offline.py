"""The evidence travels with the bundle: a device recalibration equals the offline command.

``ngcal calibrate`` (synthetic NG only) -> export's score-set copying into a bundle ->
the daemon's policy on ``bundle.scoresets()`` plus k confirmed NG gives the same threshold
as ``ngcal calibrate --real-ng`` offline on the same evidence.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ngcal.calibration.policy import PolicyConfig, PolicyState, recalibrate
from ngcal.cli.main import main
from ngcal.core.bundle import open_bundle
from ngcal.core.errors import ArtifactError
from ngcal.core.scoresets import ScoreSet, evidence_dir, load_scoreset, save_scoreset
from ngcal.core.thresholds import load_thresholds
from ngcal.export.bundle_writer import _copy_scoresets
from ngcal.export.toy_bundle import write_toy_bundle


def _synthetic(folder: Path, make_set: Callable[..., ScoreSet]) -> list[ScoreSet]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    sets = [make_set("glass_feature", rng.gamma(6.0, 0.08, 80), sev) for sev in (0.5, 1.0, 2.0)]
    for i, s in enumerate(sets):
        save_scoreset(folder / f"g{i}.json", s)
    return sets


@pytest.mark.parametrize("k", [1, 3, 5])
def test_device_recalibration_equals_offline_real_ng(
    tmp_path: Path, make_set: Callable[..., ScoreSet], k: int
) -> None:
    """Same evidence, same operating point: the policy's proposal is the offline threshold."""
    model = write_toy_bundle(tmp_path / "model", image_size=32, normal_scores=120)
    sha = open_bundle(model).model_sha256
    _synthetic(tmp_path / "glass", make_set)
    t0 = tmp_path / "t0" / "thresholds.json"
    assert main(["calibrate", "--model", str(model), "--scores", str(tmp_path / "glass"),
                 "--out", str(t0)]) == 0  # fmt: skip
    thr0 = load_thresholds(t0)
    assert {r.source for r in thr0.scoresets} == {"normal_loo", "glass_feature"}
    # export's copying: the model's own sets plus every set the thresholds name
    bundle = tmp_path / "bundle"
    shutil.copytree(model, bundle)
    copied = _copy_scoresets(model, bundle, sha, thr0, t0)
    assert sum(1 for c in copied if "glass_feature" in c) == 3
    b = open_bundle(bundle)
    assert sorted(s.content_sha256 for s in b.scoresets()) == sorted(
        r.sha256 for r in thr0.scoresets
    )
    # k confirmed defects, scored on the line
    rng = np.random.default_rng(k)
    real = make_set("real_ng", rng.gamma(5.0, 0.08, k))
    decision = recalibrate(
        PolicyState.initial(thr0),
        [*b.scoresets(), real],
        PolicyConfig(min_real_ng=1, n_boot=0),
        actor="test",
    )
    assert decision.proposed is not None
    (tmp_path / "real").mkdir()
    save_scoreset(tmp_path / "real" / "r.json", real)
    t1 = tmp_path / "t1.json"
    assert main(["calibrate", "--model", str(model), "--scores", str(tmp_path / "glass"),
                 "--real-ng", str(tmp_path / "real"), "--out", str(t1)]) == 0  # fmt: skip
    offline = load_thresholds(t1)
    assert decision.proposed.value == offline.value
    assert decision.proposed.evidence == offline.evidence
    assert decision.proposed.evidence["glass_feature"] == 240  # the synthetic NG travelled


def test_export_refuses_missing_or_altered_evidence(
    tmp_path: Path, make_set: Callable[..., ScoreSet]
) -> None:
    """A set the thresholds name that is gone, or whose content changed, stops the copy."""
    model = write_toy_bundle(tmp_path / "model", image_size=32, normal_scores=120)
    sha = open_bundle(model).model_sha256
    _synthetic(tmp_path / "glass", make_set)
    t0 = tmp_path / "thresholds.json"
    assert main(["calibrate", "--model", str(model), "--scores", str(tmp_path / "glass"),
                 "--out", str(t0)]) == 0  # fmt: skip
    thr0 = load_thresholds(t0)
    ev = evidence_dir(t0)
    victim = next(ev.glob("glass_feature@1-*.json"))
    s = load_scoreset(victim)
    save_scoreset(victim, make_set("glass_feature", s.scores + 0.01, 1.0))
    with pytest.raises(ArtifactError, match="content differs"):
        _copy_scoresets(model, tmp_path / "b1", sha, thr0, t0)
    victim.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        _copy_scoresets(model, tmp_path / "b2", sha, thr0, t0)
