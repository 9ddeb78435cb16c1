"""benchmarks/threshold_quality.py on cached simulated scores: keys and sanity of figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ngcal.core.files import atomic_write_json, sha256_file
from ngcal.core.scoresets import ScoreSet, save_scoreset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "threshold_quality.py"
KEYS = {
    "fpr_bound_hold_rate", "f1_gap_median", "cost_regret_median", "miss_rate_median",
    "baseline_p99_f1_gap_median", "baseline_p99_cost_regret_median",
    "baseline_synthetic_val_f1_gap_median", "baseline_synthetic_val_cost_regret_median",
    "miss_interval_coverage", "fpr_interval_coverage",
}  # fmt: skip


def _ids(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


def test_benchmark_prints_the_issue_keys(tmp_path: Path) -> None:
    """With cached test/Perlin scores (no torch), every k block has the issue's keys."""
    rng = np.random.default_rng(0)
    model, cache = tmp_path / "model", tmp_path / "cache"
    (model / "scores").mkdir(parents=True)
    (model / "manifest.json").write_text('{"fake": true}\n')
    save_scoreset(
        model / "scores" / "normal_loo.json",
        ScoreSet(source="normal_loo", scores=rng.normal(0, 1, 400), item_ids=_ids("n", 400)),
    )
    save_scoreset(
        model / "scores" / "glass.json",
        ScoreSet(
            source="glass_feature", scores=rng.normal(3, 1, 200), item_ids=_ids("g", 200),
            severity=1.0,
        ),
    )  # fmt: skip
    sha = sha256_file(model / "manifest.json")[:12]
    labels = [0] * 120 + [1] * 80
    scores = np.r_[rng.normal(0, 1, 120), rng.normal(2.5, 1, 80)]
    ids = [f"t{i}" for i in range(200)]
    atomic_write_json(
        cache / f"test_scores_{sha}.json",
        {"ids": ids, "labels": labels, "defects": ["x"] * 200, "scores": scores.tolist()},
    )
    perlin = {"ids": ids[:120], "scores": rng.normal(3, 1.5, 120).tolist()}
    atomic_write_json(cache / f"perlin_{sha}.json", perlin)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path), "--model", str(model),
         "--cache", str(cache), "--repeats", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in ("k0", "k1", "k2", "k5"):
        assert set(out[k]) >= KEYS, KEYS - set(out[k])
        assert 0.0 <= out[k]["fpr_bound_hold_rate"] <= 1.0
        assert out[k]["cost_regret_median"] >= 0.0 and out[k]["f1_gap_median"] >= 0.0
    assert out["protocol"]["repeats"] == 3
    for k in ("k0", "k1", "k2", "k5"):
        assert 0.0 <= out[k]["miss_interval_coverage"] <= 1.0
    # the policy and the offline command agree on the same evidence
    assert out["device_recalibration_matches_offline"] is True
