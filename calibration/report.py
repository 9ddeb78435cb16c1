"""HTML calibration report: why the threshold is where it is, with embedded PNG plots.

Sections: the threshold, the plain sentence and what each stated rate rests on; the
trade-off curve (good parts rejected against defects passed, per NG source, the chosen
point with its intervals); score histograms per source with the threshold line; ROC
curves of normal vs synthetic NG and vs real NG; the expected FPR and miss rate with
their intervals; and, when real NG exists, the synthetic-vs-real gap (empirical CDFs,
Kolmogorov-Smirnov and Wasserstein distances, AUROC of each NG source).

Matplotlib is imported inside the functions (object API with the Agg canvas, no pyplot
and no global backend change), so importing this module costs nothing on the edge.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ngcal.core.errors import ConfigError
from ngcal.core.files import atomic_write_bytes
from ngcal.core.metrics import auroc, roc_curve
from ngcal.core.scoresets import NORMAL_SOURCES, SYNTHETIC_SOURCES, ScoreSet
from ngcal.core.thresholds import Interval, ThresholdFile

from .fusion import component_name
from .statements import sentence

#: sources with fewer scores than this are drawn as ticks (a rug) instead of a histogram
RUG_BELOW = 20

_COLORS = {
    "normal_loo": "#2b8a3e",
    "normal_holdout": "#69db7c",
    "real_ok": "#087f5b",
    "glass_feature": "#e8590c",
    "glass_image": "#f59f00",
    "diffusion": "#ae3ec9",
    "real_ng": "#c92a2a",
}


def _figure(width: float = 7.0, height: float = 3.6) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ConfigError(
            "the HTML report needs matplotlib (pip install 'ngcal[offline]'); "
            "thresholds can be calibrated without it"
        ) from e

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _by_source(scoresets: Sequence[ScoreSet]) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for s in scoresets:
        out.setdefault(s.source, []).append(s.scores)
    return {k: np.concatenate(v) for k, v in out.items() if sum(a.size for a in v)}


def histogram_png(scoresets: Sequence[ScoreSet], threshold: float) -> str:
    """Score histograms per source (density, shared bins; small sets as ticks), threshold line."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    groups = _by_source(scoresets)
    allx = np.concatenate(list(groups.values()) + [np.array([threshold])])
    bins = np.linspace(float(allx.min()), float(allx.max()), 60)
    for src, x in groups.items():
        label = f"{src} (n={x.size})"
        if x.size < RUG_BELOW:  # a few confirmed parts: one tick each, not a spiky density
            ax.plot(x, np.zeros(x.size), "|", ms=30, mew=2, label=label, color=_COLORS.get(src))
            continue
        ax.hist(x, bins=bins, density=True, alpha=0.45, label=label, color=_COLORS.get(src))
    ax.axvline(threshold, color="black", lw=2, ls="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("image score")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _png(fig)


def roc_png(scoresets: Sequence[ScoreSet], threshold: float) -> str:
    """ROC of pooled normal scores against each NG source, the threshold marked on each."""
    groups = _by_source(scoresets)
    normal = np.concatenate([x for s, x in groups.items() if s in NORMAL_SOURCES] or [np.zeros(0)])
    fig = _figure(5.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for src, x in groups.items():
        if src in NORMAL_SOURCES or normal.size == 0:
            continue
        y = np.r_[np.zeros(normal.size), np.ones(x.size)]
        s = np.r_[normal, x]
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{src} AUROC {auroc(y, s):.3f}", color=_COLORS.get(src))
        ax.plot(
            [np.mean(normal >= threshold)], [np.mean(x >= threshold)], "o", color=_COLORS.get(src)
        )
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
    ax.set_xlabel("false-reject rate (normal)")
    ax.set_ylabel("detection rate (NG)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def rates_png(t: ThresholdFile) -> str:
    """The threshold's expected FPR and miss rate as points with their intervals."""
    fig = _figure(5.0, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, (_name, iv) in enumerate((("FPR", t.expected_fpr), ("miss rate", t.expected_fnr))):
        if iv is None or iv.value is None:
            continue
        lo = iv.value - (iv.low if iv.low is not None else iv.value)
        hi = (iv.high if iv.high is not None else iv.value) - iv.value
        ax.errorbar([iv.value], [i], xerr=[[lo], [hi]], fmt="o", capsize=4)
        ax.annotate(
            f"{iv.value:.3g} [{iv.low or 0:.3g}, {iv.high or 0:.3g}]",
            (iv.value, i),
            textcoords="offset points",
            xytext=(0, 8),
            fontsize=8,
        )
    if t.target_fpr is not None:
        ax.axvline(t.target_fpr, color="grey", ls=":", label=f"target FPR {t.target_fpr:g}")
        ax.legend(fontsize=8)
    ax.set_yticks([0, 1], ["FPR", "miss rate"])
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("rate")
    return _png(fig)


def tradeoff_png(scoresets: Sequence[ScoreSet], t: ThresholdFile) -> str:
    """The whole trade-off: good parts rejected against defects passed, per NG source.

    One curve per NG evidence source over every threshold (normal scores pooled), the
    chosen threshold marked on each, with the stated FPR bound (horizontal bar) and each
    source's stated miss-rate interval (vertical bar).
    """
    groups = _by_source(scoresets)
    normal = np.concatenate([x for k, x in groups.items() if k in NORMAL_SOURCES] or [np.zeros(0)])
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    if normal.size:
        floor = 0.5 / normal.size
        by = t.miss_rate_by_source
        for src, y in groups.items():
            if src in NORMAL_SOURCES:
                continue
            grid = np.unique(np.r_[normal, y])
            fpr = np.asarray([np.mean(normal >= g) for g in grid])
            miss = np.asarray([np.mean(y < g) for g in grid])
            color = _COLORS.get(src)
            ax.step(
                np.maximum(fpr, floor), miss, where="post", label=f"{src} (n={y.size})", color=color
            )
            fx = max(float(np.mean(normal >= t.value)), floor)
            fy = float(np.mean(y < t.value))
            iv = by.get("real_ng" if src == "real_ng" else "synthetic")
            yerr = None
            if iv is not None and iv.low is not None and iv.high is not None:
                yerr = [[max(fy - iv.low, 0.0)], [max(iv.high - fy, 0.0)]]
            ax.errorbar([fx], [fy], yerr=yerr, fmt="o", color=color, capsize=4)
        f = t.expected_fpr
        if f is not None and f.value is not None and f.high is not None:
            ax.errorbar(
                [max(f.value, floor)],
                [-0.03],
                xerr=[[0.0], [max(f.high - max(f.value, floor), 0.0)]],
                fmt="v",
                color="black",
                capsize=4,
                label=f"chosen: FPR bound {f.high:.2%} ({f.kind or 'interval'})",
            )
        ax.set_xscale("log")
    ax.set_xlabel("good parts rejected (FPR, log scale)")
    ax.set_ylabel("defects passed (miss rate)")
    ax.set_ylim(-0.06, 1.02)
    ax.legend(fontsize=7)
    return _png(fig)


def gap_rows(scoresets: Sequence[ScoreSet]) -> list[dict[str, float | str]]:
    """Per synthetic component: KS statistic and Wasserstein distance to the real NG scores."""
    real = [s.scores for s in scoresets if s.source == "real_ng" and len(s)]
    if not real:
        return []
    r = np.concatenate(real)
    rows: list[dict[str, float | str]] = []
    for s in scoresets:
        if s.source in SYNTHETIC_SOURCES and len(s):
            rows.append(
                {
                    "component": component_name(s),
                    "n": float(len(s)),
                    "ks": float(stats.ks_2samp(s.scores, r).statistic),
                    "wasserstein": float(stats.wasserstein_distance(s.scores, r)),
                    "median_shift": float(np.median(s.scores) - np.median(r)),
                }
            )
    return rows


def gap_png(scoresets: Sequence[ScoreSet]) -> str:
    """Empirical CDFs of the real NG and of each synthetic component."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for s in scoresets:
        if (s.source in SYNTHETIC_SOURCES or s.source == "real_ng") and len(s):
            x = np.sort(s.scores)
            lw = 2.5 if s.source == "real_ng" else 1.0
            ax.step(
                x,
                np.arange(1, x.size + 1) / x.size,
                where="post",
                lw=lw,
                label=component_name(s),
                color=_COLORS.get(s.source) if lw > 2 else None,
            )
    ax.set_xlabel("image score")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=7)
    return _png(fig)


def _iv(iv: Interval | None) -> str:
    if iv is None or iv.value is None:
        return "n/a"
    return f"{iv.value:.4g} [{iv.low or 0:.4g}, {iv.high or 0:.4g}] at {iv.level:g}"


def _why(t: ThresholdFile) -> str:
    op = t.operating_point
    if t.mode == "target_fpr":
        return (
            f"Normal scores only: the threshold sits just above the order statistic that "
            f"keeps the false-reject rate below {t.target_fpr:g} with probability "
            f"{t.confidence:g} (distribution-free, method {t.method})."
        )
    if t.mode == "cost" and op is not None:
        return (
            f"Least expected cost per part when a miss costs {op.cost_ratio:g} false "
            f"rejects and {op.prevalence:.2%} of parts are defective."
        )
    if t.mode == "f1" and op is not None:
        return f"Highest F1 at a defect prevalence of {op.prevalence:.2%}."
    return (
        f"Highest threshold whose estimated miss rate is at most {t.notes.get('miss_rate_target')}."
    )


def render_html(scoresets: Sequence[ScoreSet], t: ThresholdFile, *, title: str) -> str:
    """The report as one self-contained HTML string."""
    e = html.escape
    img = '<img alt="{}" src="data:image/png;base64,{}">'.format
    evid = "".join(f"<tr><td>{e(k)}</td><td>{v}</td></tr>" for k, v in t.evidence.items())
    notes = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in t.notes.items())
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
        "td{padding:2px 8px;border-bottom:1px solid #ddd}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p><b>Threshold {t.value:.6g}</b> (version {t.version}, mode {e(t.mode)}, "
        f"method {e(t.method)}). {e(_why(t))}</p>",
        f"<p>{e(sentence(t))}</p>",
        f"<p>Expected FPR: {e(_iv(t.expected_fpr))}<br>Expected miss rate: "
        f"{e(_iv(t.expected_fnr))}</p>",
        "<table><tr><th>rate</th><th>kind</th><th>rests on</th></tr>",
        *(
            f"<tr><td>{e(name)}: {e(_iv(iv))}</td><td>{e(str(iv.kind))}</td>"
            f"<td>{e(str(iv.basis))}</td></tr>"
            for name, iv in (
                ("false rejects", t.expected_fpr),
                *((f"misses ({k})", v) for k, v in t.miss_rate_by_source.items()),
            )
            if iv is not None
        ),
        "</table>",
        "<h2>Trade-off</h2>",
        img("trade-off", tradeoff_png(scoresets, t)),
        f"<p>Model sha256: <code>{e(t.model_sha256 or 'unknown')}</code>; created "
        f"{e(t.created_at)} by {e(t.created_by)}</p>",
        "<h2>Score distributions</h2>",
        img("histograms", histogram_png(scoresets, t.value)),
        "<h2>ROC</h2>",
        img("roc", roc_png(scoresets, t.value)),
        "<h2>Expected rates</h2>",
        img("rates", rates_png(t)),
    ]
    rows = gap_rows(scoresets)
    if rows:
        parts += [
            "<h2>Synthetic vs real NG</h2>",
            img("gap", gap_png(scoresets)),
            "<table><tr><th>component</th><th>n</th><th>KS</th><th>Wasserstein</th>"
            "<th>median shift</th></tr>",
        ]
        parts += [
            f"<tr><td>{e(str(r['component']))}</td><td>{r['n']:.0f}</td>"
            f"<td>{r['ks']:.3f}</td><td>{r['wasserstein']:.4g}</td>"
            f"<td>{r['median_shift']:+.4g}</td></tr>"
            for r in rows
        ]
        parts.append("</table>")
    parts += [
        "<h2>Evidence</h2><table>",
        evid,
        "</table>",
        "<h2>Notes</h2><table>",
        notes,
        "</table></body></html>",
    ]
    return "\n".join(parts)


def write_report(
    path: str | Path,
    scoresets: Sequence[ScoreSet],
    t: ThresholdFile,
    *,
    title: str = "ngcal calibration report",
) -> None:
    """Write the HTML report atomically to ``path``."""
    atomic_write_bytes(path, render_html(scoresets, t, title=title).encode("utf-8"))
