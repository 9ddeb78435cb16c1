"""What a threshold's stated rates rest on, and how far each can be trusted.

Three statements, each an :class:`~ngcal.core.thresholds.Interval` with ``kind`` and ``basis``:

- **False rejects (FPR), from normal evidence: a guarantee.** With ``m`` of ``n`` normal
  scores at or above the threshold, the threshold lies above the ``(n - m)``-th order
  statistic, whose true FPR is ``Beta(m + 1, n - m)`` distributed (Wilks 1941). The
  threshold was chosen after seeing the scores, so ``m`` is data-dependent: the bound is
  made simultaneous over every ``m`` by a weighted union bound (rank ``m`` gets the share
  ``6 / (pi^2 (m + 1)^2)`` of ``1 - level``), and then holds with probability ``level``
  whichever threshold was picked, for new good parts exchangeable with the evidence. The
  worst normal source decides.
- **Misses from synthetic NG: an estimate.** Nobody knows which synthetic source or
  severity real defects resemble, so the statement is the spread over every component
  (each one's own Jeffreys interval included): wide, and marked as a guess.
- **Misses from k confirmed real NG: an interval on k.** The threshold was chosen with
  those k, so counting how many of them it misses is optimistic. Each defect is instead
  judged by the threshold recomputed without it (leave-one-out, the jackknife form of
  conformal validation; Vovk et al. 2005, ch. 2): ``j`` of ``k`` missed gives the
  Clopper-Pearson interval (Clopper & Pearson 1934) of the miss rate.

- **Misses from audit sampling: an interval on the line itself.** A random share of OK
  verdicts checked by a person estimates the escape rate without selection
  (:func:`audit_miss_rate`); the daemon passes it in as ``by_source["audit"]``.

:func:`headline` picks what ``expected_fnr`` states (the audit, else real NG once there is
any, else the synthetic spread); :func:`sentence` says it in one plain line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from ngcal.core.scoresets import SYNTHETIC_SOURCES, ScoreSet
from ngcal.core.thresholds import Interval, ThresholdFile

from . import ng

#: refit(score sets) -> the threshold the same rule picks on them (for leave-one-out)
Refit = Callable[[Sequence[ScoreSet]], float]
#: above this many real NG the leave-one-out refits are skipped (selection bias ~ 1/k)
MAX_LOO = 60
#: an expected miss rate above this makes ``ngcal calibrate`` warn
WARN_MISS_RATE = 0.20


def clopper_pearson(x: int, n: int, level: float) -> tuple[float, float]:
    """Two-sided exact binomial interval for ``x`` successes in ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    a = (1.0 - level) / 2.0
    low = 0.0 if x <= 0 else float(stats.beta.ppf(a, x, n - x + 1))
    high = 1.0 if x >= n else float(stats.beta.ppf(1.0 - a, x + 1, n - x))
    return low, high


def fpr_guarantee(
    groups: Sequence[np.ndarray], names: Sequence[str], threshold: float, level: float
) -> Interval:
    """The worst normal group's FPR with its one-sided order-statistic bound at ``level``."""
    best: tuple[float, int, int, str] | None = None
    for x, name in zip(groups, names, strict=True):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if not x.size:
            continue
        n, m = int(x.size), int(np.sum(x >= threshold))
        delta = (1.0 - level) * 6.0 / (np.pi**2 * (m + 1) ** 2)
        high = 1.0 if m >= n else float(stats.beta.ppf(1.0 - delta, m + 1, n - m))
        if best is None or high > best[0]:
            best = (high, m, n, name)
    if best is None:
        return Interval(value=None, level=level, kind="guarantee", basis="no normal evidence")
    high, m, n, name = best
    low = 0.0 if m == 0 else float(stats.beta.ppf(1.0 - level, m, n - m + 1))
    return Interval(
        value=m / n,
        low=low,
        high=high,
        level=level,
        kind="guarantee",
        basis=f"{m} of {n} normal scores ({name}) at or above the threshold",
        n=float(n),
    )


def synthetic_spread(
    scoresets: Sequence[ScoreSet], threshold: float, level: float
) -> Interval | None:
    """Miss rate on synthetic NG: mean over components, range over their intervals."""
    comps: dict[str, list[np.ndarray]] = {}
    for s in scoresets:
        if s.source in SYNTHETIC_SOURCES and len(s):
            key = s.source if s.severity is None else f"{s.source}@{s.severity:g}"
            comps.setdefault(key, []).append(s.scores)
    if not comps:
        return None
    miss, lows, highs, n = [], [], [], 0
    for parts in comps.values():
        y = np.concatenate(parts)
        r = float(np.mean(y < threshold))
        lo, hi = ng.jeffreys_interval(r, float(y.size), level)
        miss.append(r)
        lows.append(lo)
        highs.append(hi)
        n += int(y.size)
    return Interval(
        value=float(np.mean(miss)),
        low=float(min(lows)),
        high=float(max(highs)),
        level=level,
        kind="estimate",
        basis=f"synthetic look-alikes, spread over {len(comps)} sources/severities "
        f"({min(miss):.0%} to {max(miss):.0%} missed); real defects may differ",
        n=float(n),
    )


def real_loo(
    scoresets: Sequence[ScoreSet], threshold: float, refit: Refit, level: float
) -> Interval | None:
    """Miss rate from confirmed real NG, each judged by the threshold refitted without it."""
    real_sets = [s for s in scoresets if s.source == "real_ng" and len(s)]
    if not real_sets:
        return None
    rest = [s for s in scoresets if not (s.source == "real_ng" and len(s))]
    y = np.concatenate([s.scores for s in real_sets])
    ids = tuple(i for s in real_sets for i in s.item_ids)
    k = int(y.size)
    if k > MAX_LOO:
        missed, how = int(np.sum(y < threshold)), "in-sample"
    else:
        missed = 0
        for i in range(k):
            keep = np.arange(k) != i
            others = [ScoreSet("real_ng", y[keep], tuple(np.asarray(ids)[keep]))] if k > 1 else []
            missed += int(y[i] < refit([*rest, *others]))
        how = "leave-one-out"
    low, high = clopper_pearson(missed, k, level)
    return Interval(
        value=missed / k,
        low=low,
        high=high,
        level=level,
        kind="interval",
        basis=f"{missed} of {k} confirmed real defects missed ({how})",
        n=float(k),
    )


def audit_miss_rate(
    *, escaped: int, checked: int, passed: int, caught: int, level: float = 0.95
) -> Interval | None:
    """The line's miss rate from random audits of passed parts (unbiased, an interval).

    ``checked`` OK verdicts drawn at random and checked by a person, ``escaped`` of them
    defective: the escape rate ``r`` per passed part has a Clopper-Pearson interval. With
    ``passed`` OK verdicts and ``caught`` confirmed NG verdicts in the same period, the
    miss rate is ``r P / (r P + caught)``, increasing in ``r``, so its interval is the
    image of ``r``'s. Escapes found downstream are a selected sample and never enter it.
    None before the first audit check.
    """
    if checked <= 0:
        return None
    lo, hi = clopper_pearson(escaped, checked, level)

    def miss(r: float) -> float:
        den = r * passed + caught
        return r * passed / den if den > 0 else 0.0

    return Interval(
        value=miss(escaped / checked),
        low=miss(lo),
        high=miss(hi),
        level=level,
        kind="interval",
        basis=f"{escaped} of {checked} audited passed parts defective; {caught} caught, "
        f"{passed} passed",
        n=float(checked),
    )


def miss_statements(
    scoresets: Sequence[ScoreSet], threshold: float, refit: Refit, level: float
) -> dict[str, Interval]:
    """``{"synthetic": ..., "real_ng": ...}`` for the evidence present."""
    out: dict[str, Interval] = {}
    syn = synthetic_spread(scoresets, threshold, level)
    if syn is not None:
        out["synthetic"] = syn
    real = real_loo(scoresets, threshold, refit, level)
    if real is not None:
        out["real_ng"] = real
    return out


def headline(by_source: dict[str, Interval], fused: Interval) -> Interval:
    """What ``expected_fnr`` states: the audit's interval, else real NG's, else synthetic's.

    The point value stays the fused estimate (clipped into the interval), the interval is
    the one its ``kind`` promises.
    """
    pick = by_source.get("audit") or by_source.get("real_ng") or by_source.get("synthetic")
    if pick is None or fused.value is None:
        return fused
    lo, hi = pick.low or 0.0, 1.0 if pick.high is None else pick.high
    return pick.model_copy(update={"value": float(min(max(fused.value, lo), hi))})


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def sentence(t: ThresholdFile) -> str:
    """One plain sentence: defects passed and good parts rejected, what each rests on."""
    fnr, fpr = t.expected_fnr, t.expected_fpr
    parts = []
    if fnr is not None and fnr.value is not None:
        trust = {
            "estimate": "a guess from synthetic look-alikes",
            "interval": f"a {fnr.level:.0%} interval from "
            + ("random audits" if "audited" in (fnr.basis or "") else "confirmed real defects"),
        }.get(fnr.kind or "", "an estimate")
        parts.append(
            f"about {_pct(fnr.value)} of defects to pass ({_pct(fnr.low)} to "
            f"{_pct(fnr.high)}, {trust})"
        )
    if fpr is not None and fpr.value is not None:
        trust = (
            f"at most {_pct(fpr.high)} with {fpr.level:.0%} confidence, a guarantee for parts "
            "like the normal evidence"
            if fpr.kind == "guarantee"
            else f"{_pct(fpr.low)} to {_pct(fpr.high)}"
        )
        parts.append(f"{_pct(fpr.value)} of good parts to be rejected ({trust})")
    basis = ", ".join(f"{v} {k}" for k, v in t.evidence.items())
    return f"At this threshold expect {' and '.join(parts)}; based on {basis}."
