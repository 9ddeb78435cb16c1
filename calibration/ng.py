"""Thresholds that use NG evidence: F1-optimal, cost-optimal, and a target miss rate.

Inputs are normal scores (one array, or one per normal source) and NG scores with weights
that sum to one (the fused mixture of synthetic and real NG, see
:mod:`ngcal.calibration.fusion`). Rates are estimated from the two samples separately, so
the NG share of the calibration data never decides the answer: F1 and cost are evaluated
at a stated ``prevalence``::

    FPR(t) = max_s mean(normal_s >= t)    TPR(t) = sum(w * (ng >= t))

With several normal sources (training leave-one-out, a holdout, confirmed OK parts from
the line) the false-reject rate is the worst source's: if the line's good parts drift
away from the training images, the source that resembles the line decides.
    F1(t)   = 2 p TPR / (p TPR + (1 - p) FPR + p)
    cost(t) = (1 - p) FPR + p c (1 - TPR)     (per part, in units of one false reject)

Each estimator returns the threshold plus a percentile bootstrap interval of the threshold
itself (Efron & Tibshirani 1993, ch. 13): normal and NG scores are resampled within each
weighted group and the selection is rerun.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from scipy import special, stats

from ngcal.core.errors import ConfigError, DataError

Normals: TypeAlias = "np.ndarray | Sequence[np.ndarray]"


def normal_sources(normal: Normals) -> tuple[np.ndarray, ...]:
    """Non-empty sorted float64 arrays, one per normal source (a single array is one source)."""
    arrays = [normal] if isinstance(normal, np.ndarray) else list(normal)
    out = [np.sort(np.asarray(a, dtype=np.float64).reshape(-1)) for a in arrays]
    return tuple(a for a in out if a.size)


def fpr_at(normal: Normals, thresholds: np.ndarray | float) -> np.ndarray:
    """Worst-source false-reject rate at each threshold (NG when score >= t)."""
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    xs = normal_sources(normal)
    if not xs:
        return np.full(t.shape, np.nan)
    rates = [(x.size - np.searchsorted(x, t, side="left")) / x.size for x in xs]
    return np.asarray(np.max(rates, axis=0))


@dataclass(frozen=True)
class NgSample:
    """NG scores in weighted groups: group ``i`` holds ``scores[i]`` sharing ``weights[i]``.

    Within a group every item carries ``weights[i] / len(scores[i])``; group weights sum to 1.
    ``bandwidths[i]`` > 0 smooths group ``i``'s distribution with a Gaussian kernel (the
    kernel estimate of a distribution function, Azzalini 1981), so a handful of real NG
    give a miss-rate curve with tails rather than a staircase; empty means no smoothing.
    """

    scores: tuple[np.ndarray, ...]
    weights: tuple[float, ...]
    bandwidths: tuple[float, ...] = ()

    def tpr(self, thresholds: np.ndarray) -> np.ndarray:
        """Weighted (smoothed) share of NG at or above each threshold, float64 [T]."""
        t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
        out = np.zeros(t.shape)
        bws = self.bandwidths or (0.0,) * len(self.scores)
        for y, w, h in zip(self.scores, self.weights, bws, strict=True):
            y = np.sort(np.asarray(y, dtype=np.float64).reshape(-1))
            if not y.size or w <= 0:
                continue
            if h > 0:
                share = special.ndtr((y[None, :] - t[:, None]) / h).mean(axis=1)
            else:
                share = (y.size - np.searchsorted(y, t, side="left")) / y.size
            out += w * share
        total = sum(self.weights)
        return out / total if total > 0 else out

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores [M], per-item weights [M]) over all groups."""
        xs = [np.asarray(s, dtype=np.float64).reshape(-1) for s in self.scores]
        ws = [np.full(x.size, w / x.size) for x, w in zip(xs, self.weights, strict=True) if x.size]
        xs = [x for x in xs if x.size]
        if not xs:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(xs), np.concatenate(ws)

    def resample(self, rng: np.random.Generator) -> NgSample:
        """A bootstrap resample within each group (group weights unchanged)."""
        return NgSample(
            tuple(rng.choice(s, size=len(s), replace=True) if len(s) else s for s in self.scores),
            self.weights,
            self.bandwidths,
        )

    @property
    def n_effective(self) -> float:
        """Kish effective sample size 1 / sum(w_i^2) of the per-item weights."""
        _, w = self.flat()
        return float(1.0 / np.sum(w**2)) if w.size else 0.0


@dataclass(frozen=True)
class NgThreshold:
    """A threshold from normal + NG evidence with its estimated rates and bootstrap interval."""

    value: float
    method: str
    fpr: float
    fnr: float
    objective: float
    value_low: float
    value_high: float


@dataclass(frozen=True)
class Curves:
    """Rates at every candidate threshold (ascending ``thresholds``; NG when score >= t)."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray


def curves(normal: Normals, ng: NgSample) -> Curves:
    """FPR and weighted (smoothed) TPR at candidate thresholds between distinct scores.

    Candidate ``j`` classifies as NG every score at or above the j-th distinct score; its
    threshold is the midpoint to the next lower distinct score (the first one gets the
    lowest score itself), so both neighbouring samples sit on their correct side with a
    margin. A final candidate just above the top score rejects nothing.
    """
    xs = normal_sources(normal)
    y, w = ng.flat()
    if not xs or y.size == 0:
        n = sum(x.size for x in xs)
        raise DataError(f"need normal and NG scores (got {n} normal, {y.size} NG)")
    u = np.unique(np.concatenate([*xs, y]))
    thr = np.r_[u[0], (u[1:] + u[:-1]) / 2.0, np.nextafter(u[-1], np.inf)]
    return Curves(thr, fpr_at(xs, thr), ng.tpr(thr))


def f1_at(fpr: np.ndarray, tpr: np.ndarray, prevalence: float) -> np.ndarray:
    """F1 at defect prevalence ``prevalence`` from rates (0 where nothing is caught)."""
    p = prevalence
    den = p * tpr + (1.0 - p) * fpr + p
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tpr > 0, 2.0 * p * tpr / den, 0.0)


def cost_at(fpr: np.ndarray, tpr: np.ndarray, prevalence: float, cost_ratio: float) -> np.ndarray:
    """Expected cost per part in false-reject units: (1-p) FPR + p c (1 - TPR)."""
    return (1.0 - prevalence) * fpr + prevalence * cost_ratio * (1.0 - tpr)


def _check_prevalence(prevalence: float) -> None:
    if not 0.0 < prevalence < 1.0:
        raise ConfigError(f"prevalence={prevalence!r} must be in (0, 1)")


def _select(
    normal: Normals, ng: NgSample, score: Callable[[Curves], np.ndarray], maximise: bool
) -> tuple[float, float, float, float]:
    c = curves(normal, ng)
    obj = score(c)
    # Ties: the highest threshold among equals (fewest false rejects).
    i = int(np.flatnonzero(obj == (obj.max() if maximise else obj.min()))[-1])
    return float(c.thresholds[i]), float(c.fpr[i]), float(1.0 - c.tpr[i]), float(obj[i])


def _bootstrap(
    normal: Normals,
    ng: NgSample,
    pick: Callable[[Normals, NgSample], float],
    *,
    n_boot: int,
    level: float,
    seed: int,
) -> tuple[float, float]:
    if n_boot <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    xs = normal_sources(normal)
    vals = [
        pick(tuple(rng.choice(x, size=x.size, replace=True) for x in xs), ng.resample(rng))
        for _ in range(n_boot)
    ]
    tail = (1.0 - level) / 2.0
    return float(np.quantile(vals, tail)), float(np.quantile(vals, 1.0 - tail))


def f1_threshold(
    normal: Normals,
    ng: NgSample,
    *,
    prevalence: float,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> NgThreshold:
    """The threshold maximising F1 at ``prevalence`` (not at the calibration data's NG share)."""
    _check_prevalence(prevalence)

    def pick(xn: Normals, g: NgSample) -> float:
        return _select(xn, g, lambda c: f1_at(c.fpr, c.tpr, prevalence), True)[0]

    t, fpr, fnr, f1 = _select(normal, ng, lambda c: f1_at(c.fpr, c.tpr, prevalence), True)
    lo, hi = _bootstrap(normal, ng, pick, n_boot=n_boot, level=level, seed=seed)
    return NgThreshold(t, "f1_max_weighted", fpr, fnr, f1, lo, hi)


def cost_threshold(
    normal: Normals,
    ng: NgSample,
    *,
    prevalence: float,
    cost_ratio: float,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> NgThreshold:
    """The threshold minimising expected cost per part at the operating point."""
    _check_prevalence(prevalence)
    if not cost_ratio > 0:
        raise ConfigError(f"cost_ratio={cost_ratio!r} must be > 0")

    def obj(c: Curves) -> np.ndarray:
        return cost_at(c.fpr, c.tpr, prevalence, cost_ratio)

    def pick(xn: Normals, g: NgSample) -> float:
        return _select(xn, g, obj, False)[0]

    t, fpr, fnr, cost = _select(normal, ng, obj, False)
    lo, hi = _bootstrap(normal, ng, pick, n_boot=n_boot, level=level, seed=seed)
    return NgThreshold(t, "min_expected_cost", fpr, fnr, cost, lo, hi)


def _miss_pick(normal: Normals, ng: NgSample, miss_rate: float) -> tuple[float, float, float]:
    y, _ = ng.flat()
    if y.size == 0:
        raise DataError("miss-rate mode needs NG scores at the required severity")
    u = np.unique(np.concatenate([y, *normal_sources(normal)]))
    below = 1.0 - ng.tpr(u)  # (smoothed) weight strictly below each candidate
    ok = np.flatnonzero(below <= miss_rate + 1e-12)
    j = int(ok[-1]) if ok.size else 0
    t = float(u[j])
    return t, float(fpr_at(normal, t)[0]), float(below[j])


def miss_rate_threshold(
    normal: Normals,
    ng: NgSample,
    *,
    miss_rate: float,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> NgThreshold:
    """The highest threshold whose estimated miss rate on ``ng`` is at most ``miss_rate``.

    ``ng`` should hold only the weakest severity that must be caught (see
    :func:`ngcal.calibration.fusion.weakest_required`, and ``fuse(..., severities=...)``);
    the threshold is an NG score itself, so that item is caught.
    """
    if not 0.0 <= miss_rate < 1.0:
        raise ConfigError(f"miss_rate={miss_rate!r} must be in [0, 1)")
    t, fpr, fnr = _miss_pick(normal, ng, miss_rate)
    lo, hi = _bootstrap(
        normal,
        ng,
        lambda xn, g: _miss_pick(xn, g, miss_rate)[0],
        n_boot=n_boot,
        level=level,
        seed=seed,
    )
    return NgThreshold(t, "miss_rate_quantile", fpr, fnr, fnr, lo, hi)


def jeffreys_interval(rate: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Jeffreys interval of a binomial rate observed as ``rate`` over ``n`` (may be fractional).

    Brown, Cai & DasGupta 2001; accepts a Kish effective ``n`` for weighted samples.
    """
    if n <= 0 or not np.isfinite(rate):
        return 0.0, 1.0
    x = rate * n
    tail = (1.0 - level) / 2.0
    low = 0.0 if x <= 0 else float(stats.beta.ppf(tail, x + 0.5, n - x + 0.5))
    high = 1.0 if x >= n else float(stats.beta.ppf(1.0 - tail, x + 0.5, n - x + 0.5))
    return low, high


def weighted_fnr(ng: NgSample, threshold: float) -> float:
    """Weighted (smoothed) share of NG scores below ``threshold`` (the estimated miss rate)."""
    return float(1.0 - ng.tpr(np.asarray([threshold]))[0]) if ng.scores else float("nan")


def groups_of(
    arrays: Sequence[np.ndarray],
    weights: Sequence[float],
    bandwidths: Sequence[float] | None = None,
) -> NgSample:
    """Build an :class:`NgSample`, dropping empty groups and renormalising the weights."""
    bws = list(bandwidths) if bandwidths is not None else [0.0] * len(arrays)
    triples = zip(arrays, weights, bws, strict=True)
    keep = [
        (np.asarray(a, dtype=np.float64).reshape(-1), float(w), float(h)) for a, w, h in triples
    ]
    keep = [k for k in keep if k[0].size and k[1] > 0]
    total = sum(k[1] for k in keep)
    if not keep or total <= 0:
        return NgSample((), ())
    return NgSample(
        tuple(k[0] for k in keep), tuple(k[1] / total for k in keep), tuple(k[2] for k in keep)
    )


def silverman_bandwidth(x: np.ndarray, *, fallback_sd: float = 0.0) -> float:
    """Silverman's rule 0.9 min(sd, IQR/1.349) n^-1/5 (Silverman 1986, eq. 3.31).

    Below five points the spread is ``max(sd(x), fallback_sd)``: a couple of real defects
    say little about their own spread, so the caller supplies a prior scale.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return 0.0
    sd = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    if x.size < 5:
        spread = max(sd, fallback_sd)
    else:
        iqr = float(np.subtract(*np.percentile(x, [75, 25])))
        spread = min(sd, iqr / 1.349) if iqr > 0 else sd
    return float(0.9 * spread * x.size ** (-0.2))
