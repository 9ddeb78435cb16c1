"""``ngcal calibrate`` end to end on a model directory with score-set files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ngcal.cli.main import main
from ngcal.core.files import sha256_file
from ngcal.core.manifest import (
    BackboneSpec,
    ModelManifest,
    PatchCoreSpec,
    Preprocessing,
    write_manifest,
)
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.core.thresholds import load_thresholds


def _model_dir(root: Path, sets: list[ScoreSet]) -> Path:
    (root / "scores").mkdir(parents=True)
    for s in sets:
        save_scoreset(root / "scores" / f"{s.source}_{s.severity}.json", s)
    m = ModelManifest(
        backbone=BackboneSpec(name="toy", layers=(1,), weights="none", weights_sha256="0" * 64),
        preprocessing=Preprocessing(image_size=64),
        patchcore=PatchCoreSpec(
            feature_dim=4,
            raw_feature_dim=4,
            feature_map_size=(8, 8),
            coreset_ratio=0.1,
            coreset_size=10,
            num_train_images=10,
            image_score="max",
        ),
    )
    write_manifest(root, m)
    return root


def test_calibrate_writes_thresholds_and_report(
    tmp_path: Path, simulated: Callable[..., list[ScoreSet]]
) -> None:
    """Model scores + --real-ng folder -> thresholds.json naming the model's manifest sha256."""
    sets = simulated(n_real=3)
    model = _model_dir(tmp_path / "model", [s for s in sets if s.source != "real_ng"])
    real = tmp_path / "real"
    real.mkdir()
    save_scoreset(real / "real.json", next(s for s in sets if s.source == "real_ng"))
    out, rep = tmp_path / "thresholds.json", tmp_path / "report.html"
    rc = main(
        [
            "calibrate",
            "--model",
            str(model),
            "--real-ng",
            str(real),
            "--mode",
            "cost",
            "--cost-ratio",
            "100",
            "--out",
            str(out),
            "--report",
            str(rep),
        ]
    )
    assert rc == 0
    t = load_thresholds(out)
    assert t.model_sha256 == sha256_file(model / "manifest.json")
    assert t.evidence["real_ng"] == 3 and t.mode == "cost"
    assert t.operating_point is not None and t.operating_point.cost_ratio == 100
    assert rep.read_text().count("data:image/png") == 5


def test_calibrate_rejects_bad_prevalence(
    tmp_path: Path, simulated: Callable[..., list[ScoreSet]], capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid --prevalence exits 2 with a message naming the option."""
    model = _model_dir(tmp_path / "model", simulated())
    rc = main(
        ["calibrate", "--model", str(model), "--prevalence", "2", "--out", str(tmp_path / "t.json")]
    )
    assert rc == 2 and "--prevalence" in capsys.readouterr().err


def test_calibrate_states_the_trade_off_and_warns_on_many_misses(
    tmp_path: Path, simulated: Callable[..., list[ScoreSet]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The plain sentence is printed; a miss rate above 20% warns and names --cost-ratio,
    and a higher cost ratio moves the threshold so that the warning goes away."""
    sets = simulated(real_mu=1.0)
    model = _model_dir(tmp_path / "model", sets)
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(model), "--cost-ratio", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "At this threshold expect about" in text and "guarantee" in text
    assert "warning:" in text and "--cost-ratio" in text
    assert (tmp_path / "t.scores").is_dir()
    assert (
        main(["calibrate", "--model", str(model), "--cost-ratio", "1000", "--out", str(out)]) == 0
    )
    assert "warning:" not in capsys.readouterr().out


def test_calibrate_says_when_the_synthetic_ceiling_capped_the_threshold(
    tmp_path: Path, make_set: Callable[..., ScoreSet], capsys: pytest.CaptureFixture[str]
) -> None:
    """Synthetic NG far above the good parts: the cost optimum is capped at the good parts'
    99th percentile (decision 0303) and the printed output says so, with both values."""
    import numpy as np

    rng = np.random.default_rng(1)
    sets = [
        make_set("normal_loo", rng.normal(0.0, 1.0, 1000)),
        make_set("glass_feature", rng.normal(8.0, 0.5, 200), 1.0),
        make_set("glass_feature", rng.normal(9.0, 0.5, 200), 2.0),
    ]
    model = _model_dir(tmp_path / "model", sets)
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(model), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    t = load_thresholds(out)
    assert t.method == "min_expected_cost_synthetic_ceiling"
    assert "capped at the good parts' 99th percentile" in text
    assert f"{t.value:.6g}" in text and f"{float(t.notes['cost_optimum'] or 0):.6g}" in text


def test_calibrate_takes_an_audit_figure(
    tmp_path: Path, make_set: Callable[..., ScoreSet], capsys: pytest.CaptureFixture[str]
) -> None:
    """--audit anchors the NG evidence (decision 0304): a line that misses far more than its
    confirmations say gets a lower threshold; a malformed figure exits 2 naming --audit."""
    import numpy as np

    rng = np.random.default_rng(2)
    good = rng.normal(10.0, 1.0, 1000)
    real = rng.normal(12.0, 1.0, 400)
    confirmed = np.r_[real[real >= 12.3], real[real < 12.3][:15]]  # few escapes found
    sets = [make_set("normal_loo", good), make_set("real_ng", confirmed)]
    model = _model_dir(tmp_path / "model", sets)
    plain, anchored = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["calibrate", "--model", str(model), "--out", str(plain)]) == 0
    spec = "threshold=12.3,passed=5000,caught=100,checked=1000,escaped=30"
    assert main(["calibrate", "--model", str(model), "--audit", spec, "--out", str(anchored)]) == 0
    assert "docs/decisions/0304" in capsys.readouterr().out
    a, b = load_thresholds(plain), load_thresholds(anchored)
    assert b.notes["audit_anchor"] == "reweighted" and b.value < a.value
    assert "audit_anchor" not in a.notes
    bad = main(["calibrate", "--model", str(model), "--audit", "passed=3", "--out", str(plain)])
    assert bad == 2 and "--audit" in capsys.readouterr().err
