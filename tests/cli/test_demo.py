"""`ngcal demo`, README's first command: the whole loop, build to recalibration, for real."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.mqtt]


def _need_mosquitto() -> None:
    if shutil.which("mosquitto") or os.access("/usr/sbin/mosquitto", os.X_OK):
        return
    if os.environ.get("NGCAL_CI"):
        pytest.fail("mosquitto not installed (CI installs it: see .ci/run)", pytrace=False)
    pytest.skip("mosquitto not installed (apt-get install mosquitto)")


def test_demo_builds_serves_confirms_and_recalibrates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One `ngcal demo` run: a verified bundle with its threshold, every dropped image's
    verdict over MQTT, accepted confirmations, a recalibration event, a clean daemon stop."""
    _need_mosquitto()
    from ngcal.cli.main import main
    from ngcal.core.bundle import open_bundle
    from ngcal.core.thresholds import load_thresholds

    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--image-size", "64", "--train-images", "16"])
    text = capsys.readouterr().out
    assert rc == 0, text
    bundle = open_bundle(out / "build" / "bundle")
    assert bundle.thresholds is not None
    thresholds = load_thresholds(out / "build" / "thresholds.json")
    assert bundle.thresholds.value == thresholds.value
    # the build evaluated the bundle itself, at the threshold it carries
    report = json.loads((out / "build" / "evaluation.json").read_text())
    assert report["kind"] == "bundle"
    assert report["threshold"] == pytest.approx(thresholds.value)
    assert report["mode"] == thresholds.mode
    assert report["image_auroc"] >= 0.9  # the demo defects are plainly visible
    n_test = sum(1 for f in (out / "data" / "test").rglob("*.png"))
    assert report["n_test"] == n_test > 0 and report["errors"] == []
    assert "<title>ngcal calibration: demo part" in (out / "build" / "report.html").read_text()
    rows = [line for line in text.splitlines() if line.startswith("  part")]
    assert len(rows) == 19  # 10 good, 6 defective, 3 faint defects: every verdict arrived
    assert text.count("ack accepted") >= 4  # confirmations of NG and of a good part
    assert "[demo] recalibration" in text and "guard rails (" in text
    assert "of good parts" in text and "%" in text  # rates in words and percentages
    assert "daemon exited with code 0" in text
    assert (out / "line" / "state" / "state.db").is_file()


def test_demo_without_mosquitto_says_how_to_install_it_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No broker binary: exit 2 with one line naming the install command; nothing written."""
    from ngcal.cli import demo_line
    from ngcal.cli.main import main

    monkeypatch.setattr(demo_line.shutil, "which", lambda _name: None)
    monkeypatch.setattr(demo_line.os, "access", lambda _path, _mode: False)
    rc = main(["demo", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "apt-get install mosquitto" in err[0]
    assert not (tmp_path / "demo").exists()
