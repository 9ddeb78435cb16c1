"""A line simulated where the truth is known, through the daemon's ThresholdKeeper + Store.

Good parts score N(0, 1), defects N(3, 1) at prevalence 2%; the bundle ships 300 normal
and 100 synthetic NG scores (N(3.5, 1): synthetic defects look easier than real ones).
Each part is decided with the keeper's current threshold and recorded as a verdict; a
simulated operator confirms every NG verdict (false alarms as OK) and half of the missed
defects found downstream; the keeper recalibrates every ``every`` parts. The expected cost
of a threshold is known in closed form, so the test checks that recalibration with the
verdict stream ends no worse than it started, while confirmed OKs pooled on their own
(``stream_window: 0``, a selected sample taken as a fair one) push the threshold up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from daemon_kit import TINY_MODEL_SHA, confirm_line_part, make_tiny_bundle, record_line_part
from scipy import stats

from ngcal.calibration.estimate import CalibrationOptions, Provenance, calibrate
from ngcal.core.bundle import open_bundle
from ngcal.core.manifest import read_manifest, write_manifest
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.core.thresholds import save_thresholds
from ngcal.daemon.config import RecalibrationConfig
from ngcal.daemon.messages import Topics
from ngcal.daemon.recalibration import ThresholdKeeper
from ngcal.daemon.store import Store

SHA = TINY_MODEL_SHA
PREVALENCE, COST_RATIO, DEFECT_MEAN = 0.02, 10.0, 3.0


def true_cost(t: float) -> float:
    """Expected cost per part (false reject = 1) at threshold ``t`` on the simulated line."""
    fpr = float(stats.norm.sf(t))
    miss = float(stats.norm.cdf(t - DEFECT_MEAN))
    return (1 - PREVALENCE) * fpr + PREVALENCE * COST_RATIO * miss


def simulated_line(
    tmp: Path, *, window: int, seed: int, n: int, every: int
) -> tuple[list[float], int]:
    """Thresholds after each recalibration (first: the bundle's) and confirmed OK count."""
    rng = np.random.default_rng(seed)
    b = make_tiny_bundle(tmp / "bundle", threshold=1.0)
    normal = ScoreSet(
        source="normal_loo",
        scores=rng.normal(0, 1, 300),
        item_ids=tuple(f"g{i}" for i in range(300)),
        model_sha256=SHA,
    )
    glass = ScoreSet(
        source="glass_image",
        scores=rng.normal(3.5, 1, 100),
        item_ids=tuple(f"s{i}" for i in range(100)),
        model_sha256=SHA,
    )
    save_scoreset(b / "scores" / "normal_loo.json", normal)
    save_scoreset(b / "scores" / "glass_image.json", glass)
    write_manifest(b, read_manifest(b, verify=False), ["model.onnx", "scores/normal_loo.json"])
    first = calibrate([normal, glass], CalibrationOptions(), provenance=Provenance(SHA))
    save_thresholds(b / "thresholds.json", first)
    store = Store(tmp / "state")
    cfg = RecalibrationConfig(stream_window=window, min_real_ng=3)
    keeper = ThresholdKeeper(store, tmp / "state", open_bundle(b), cfg, Topics("n", "d"))
    thresholds, confirmed_ok = [keeper.current.value], 0
    for i in range(n):
        defect = bool(rng.random() < PREVALENCE)
        score = float(rng.normal(DEFECT_MEAN, 1) if defect else rng.normal(0, 1))
        t = keeper.current
        label, _ = record_line_part(store, i, score, t)
        truth = "NG" if defect else "OK"
        found = label == "NG" or (defect and rng.random() < 0.5)
        if found:
            confirm_line_part(store, i, truth, score)
            confirmed_ok += truth == "OK"
        if (i + 1) % every == 0:
            keeper.recalibrate(actor="simulated operator")
            thresholds.append(keeper.current.value)
    store.close()
    return thresholds, confirmed_ok


def test_the_stream_keeps_recalibration_at_the_starting_cost(tmp_path):
    """1500 parts, a recalibration every 250: with the stream the final threshold costs no
    more than the first (within 3%), though dozens of false alarms were confirmed."""
    ths, n_ok = simulated_line(tmp_path, window=5000, seed=0, n=1500, every=250)
    assert n_ok >= 15
    assert true_cost(ths[-1]) <= 1.03 * true_cost(ths[0]), ths


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_confirmed_false_alarms_alone_push_the_threshold_up_the_stream_does_not(tmp_path, seed):
    """3000 parts, a recalibration every 100: without the stream the confirmed OKs (all
    above the threshold of the moment) drive the threshold up and the cost far above its
    start; with it the final cost stays within 3% of the start."""
    off, _ = simulated_line(tmp_path / "off", window=0, seed=seed, n=3000, every=100)
    on, _ = simulated_line(tmp_path / "on", window=5000, seed=seed, n=3000, every=100)
    assert true_cost(on[-1]) <= 1.03 * true_cost(on[0]), on
    assert true_cost(off[-1]) > 1.2 * true_cost(off[0]), off
    assert off[-1] > on[-1]
