"""The HTML report: self-contained, with every plot and the synthetic-vs-real gap."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

from ngcal.calibration.estimate import calibrate
from ngcal.calibration.report import gap_rows, write_report
from ngcal.core.scoresets import ScoreSet


def test_report_embeds_pngs_and_gap(
    tmp_path: Path, simulated: Callable[..., list[ScoreSet]]
) -> None:
    """With real NG: five embedded PNGs (trade-off, hist, ROC, rates, gap) that decode, a gap
    table, the plain sentence and what each stated rate rests on."""
    sets = simulated(n_real=4)
    t = calibrate(sets, mode="cost", n_boot=10)
    out = tmp_path / "r.html"
    write_report(out, sets, t)
    text = out.read_text()
    pngs = text.split('src="data:image/png;base64,')[1:]
    assert len(pngs) == 5
    assert "At this threshold expect about" in text and "Trade-off" in text
    assert "leave-one-out" in text and "guarantee" in text
    for p in pngs:
        assert base64.b64decode(p.split('"')[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Synthetic vs real NG" in text and f"{t.value:.6g}" in text
    rows = gap_rows(sets)
    assert [r["component"] for r in rows] == ["glass_feature@1", "glass_feature@2"]
    # real NG ~ N(2.5, 1) is closer to severity 1 ~ N(2, 1) than to severity 2 ~ N(5, 1)
    assert rows[0]["wasserstein"] < rows[1]["wasserstein"]


def test_report_without_real_ng_has_no_gap_section(
    tmp_path: Path, simulated: Callable[..., list[ScoreSet]]
) -> None:
    """Without real NG the gap section is absent (nothing to compare)."""
    sets = simulated()
    t = calibrate(sets, mode="target_fpr")
    write_report(tmp_path / "r.html", sets, t)
    text = (tmp_path / "r.html").read_text()
    assert "Synthetic vs real NG" not in text and text.count("data:image/png") == 4
