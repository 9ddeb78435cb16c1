"""Thresholds from normal (OK) scores only: conformal order statistic, tail fit, percentile.

Convention (as everywhere in ngcal): a part is NG when ``score >= threshold``, so the
false-reject rate (FPR) of a threshold ``t`` is ``P(X >= t)`` for a normal score ``X``.

The conformal bound is the classical distribution-free tolerance limit (Wilks 1941;
Vovk et al. 2005, "Algorithmic Learning in a Random World", ch. 2; Bates et al. 2021,
"Distribution-free, risk-controlling prediction sets"): with ``n`` exchangeable normal
scores sorted ascending ``x_(1) <= ... <= x_(n)``, the coverage ``F(x_(k))`` of the k-th
order statistic follows ``Beta(k, n - k + 1)`` for a continuous ``F``, so a threshold just
above ``x_(k)`` has ``P(FPR > a) = P(Binomial(n, 1 - a) >= k)``. We take the smallest
``k`` whose probability is at most ``1 - confidence``. Ties only make the bound safer
because the threshold is placed strictly above ``x_(k)``.

For targets the sample cannot support (``k > n``), the tail beyond a high quantile is
fitted by a generalised Pareto distribution (Pickands 1975; the peaks-over-threshold
method, Coles 2001, ch. 4; fitted by probability-weighted moments, Hosking & Wallis 1987)
and the bound is the ``confidence`` quantile of a bootstrap of the fitted quantile: a
model-based estimate, not a finite-sample guarantee, and marked so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ngcal.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: fewest normal scores for any estimate; fewer is refused rather than guessed
MIN_NORMAL = 10


@dataclass(frozen=True)
class NormalThreshold:
    """A threshold from normal scores and what is known about its false-reject rate.

    ``fpr_bound`` holds with probability ``confidence`` when ``guaranteed`` (finite-sample,
    distribution-free); otherwise it is a model-based estimate. ``fpr_low``/``fpr_high`` is a
    central ``level`` interval of the true FPR, ``fpr_mean`` its expectation.
    """

    value: float
    method: str
    target_fpr: float
    confidence: float
    guaranteed: bool
    fpr_bound: float
    fpr_mean: float
    fpr_low: float
    fpr_high: float
    n: int
    k: int | None = None


def _check(scores: np.ndarray, target_fpr: float, confidence: float) -> np.ndarray:
    x = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if x.size < MIN_NORMAL:
        raise DataError(f"only {x.size} normal scores; at least {MIN_NORMAL} are needed")
    if not np.all(np.isfinite(x)):
        raise DataError("normal scores contain non-finite values")
    if not 0.0 < target_fpr < 1.0:
        raise ConfigError(f"target_fpr={target_fpr!r} must be in (0, 1)")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence={confidence!r} must be in (0, 1)")
    return x


def violation_probability(n: int, k: int, target_fpr: float) -> float:
    """P(true FPR > target) for a threshold just above the k-th of n order statistics."""
    if k > n:
        return 0.0
    # P(U_(k) < 1 - a) = P(Binomial(n, 1 - a) >= k)
    return float(stats.binom.sf(k - 1, n, 1.0 - target_fpr))


def conformal_rank(n: int, target_fpr: float, confidence: float) -> int | None:
    """Smallest k in 1..n with P(FPR > target) <= 1 - confidence; None when none exists."""
    delta = 1.0 - confidence
    # The violation probability decreases in k; binary search over 1..n.
    if violation_probability(n, n, target_fpr) > delta:
        return None
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if violation_probability(n, mid, target_fpr) <= delta:
            hi = mid
        else:
            lo = mid + 1
    return lo


def min_normal_for(target_fpr: float, confidence: float) -> int:
    """Fewest normal scores for which the conformal bound exists: (1-a)^n <= 1-confidence."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr)))


def fpr_interval_above_rank(n: int, k: int, level: float) -> tuple[float, float, float]:
    """(mean, low, high) of the true FPR of a threshold just above x_(k): Beta(n-k+1, k)."""
    a, b = n - k + 1, k
    tail = (1.0 - level) / 2.0
    return (
        a / (a + b),
        float(stats.beta.ppf(tail, a, b)),
        float(stats.beta.ppf(1.0 - tail, a, b)),
    )


def just_above(x: float) -> float:
    """The smallest float strictly greater than ``x`` (so ``x`` itself scores OK)."""
    return float(np.nextafter(x, np.inf))


def conformal_threshold(
    scores: np.ndarray, *, target_fpr: float, confidence: float = 0.95, level: float = 0.95
) -> NormalThreshold:
    """Distribution-free threshold with P(FPR > target_fpr) <= 1 - confidence.

    Falls back to :func:`tail_threshold` when ``n`` is too small for the target
    (``n < min_normal_for(target_fpr, confidence)``).
    """
    x = _check(scores, target_fpr, confidence)
    n = x.size
    k = conformal_rank(n, target_fpr, confidence)
    if k is None:
        log.info(
            "n=%d normal scores cannot bound FPR %.4g at %.2f (needs %d); fitting the tail",
            n,
            target_fpr,
            confidence,
            min_normal_for(target_fpr, confidence),
        )
        return tail_threshold(x, target_fpr=target_fpr, confidence=confidence, level=level)
    mean, low, high = fpr_interval_above_rank(n, k, level)
    bound = float(stats.beta.ppf(confidence, n - k + 1, k))
    return NormalThreshold(
        value=just_above(float(x[k - 1])),
        method="conformal_order_statistic",
        target_fpr=target_fpr,
        confidence=confidence,
        guaranteed=True,
        fpr_bound=bound,
        fpr_mean=mean,
        fpr_low=low,
        fpr_high=high,
        n=n,
        k=k,
    )


def gpd_pwm(exceedances: np.ndarray) -> tuple[float, float]:
    """(shape c, scale) of a GPD by probability-weighted moments (Hosking & Wallis 1987).

    Closed form, so bootstrapping it is cheap; ``c`` follows scipy's ``genpareto`` sign
    (c > 0 heavy tail). Reliable for c < 0.5, which covers anomaly-score tails.
    """
    y = np.sort(np.asarray(exceedances, dtype=np.float64))
    n = y.size
    p = (np.arange(1, n + 1) - 0.35) / n
    a0 = float(y.mean())
    a1 = float(np.mean((1.0 - p) * y))
    den = a0 - 2.0 * a1
    if den <= 0 or a0 <= 0:
        raise DataError(
            f"degenerate exceedances for a GPD fit (n={n}, mean={a0:.6g}, a0-2a1={den:.6g})"
        )
    k = a0 / den - 2.0  # Hosking-Wallis shape; scipy's c = -k
    return -k, 2.0 * a0 * a1 / den


def _gpd_quantile(exceed: np.ndarray, u: float, p_u: float, target: float) -> float:
    """Score whose survival is ``target`` under a GPD fitted to exceedances over ``u``."""
    c, scale = gpd_pwm(exceed)
    # P(X > u + y) = p_u * GPD.sf(y); solve p_u * sf(y) = target.
    return u + float(stats.genpareto.isf(target / p_u, c, loc=0.0, scale=scale))


def tail_threshold(
    scores: np.ndarray,
    *,
    target_fpr: float,
    confidence: float = 0.95,
    level: float = 0.95,
    tail_fraction: float = 0.1,
    n_boot: int = 200,
    seed: int = 0,
) -> NormalThreshold:
    """Peaks-over-threshold estimate of the (1 - target_fpr) quantile, bootstrapped upward.

    The exceedances over the empirical ``1 - tail_fraction`` quantile (at least 10 points)
    are fitted by a GPD; the returned value is the ``confidence`` quantile of ``n_boot``
    bootstrap refits, so the estimate errs towards fewer false rejects. Not a guarantee.
    """
    x = _check(scores, target_fpr, confidence)
    n = x.size
    m = max(10, int(round(tail_fraction * n)))
    m = min(m, n - 1)
    u = float(x[n - m - 1])
    p_u = m / n
    if target_fpr >= p_u:
        # The target lies inside the sample: plain empirical quantile.
        return percentile_threshold(x, q=1.0 - target_fpr, target_fpr=target_fpr)
    with np.errstate(all="ignore"):
        point = _gpd_quantile(x[n - m :] - u, u, p_u, target_fpr)
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(n_boot):
            xb = np.sort(rng.choice(x, size=n, replace=True))
            ub = float(xb[n - m - 1])
            try:
                boots.append(_gpd_quantile(xb[n - m :] - ub, ub, p_u, target_fpr))
            except (DataError, ValueError, RuntimeError):  # degenerate resample
                continue
    finite = np.asarray([b for b in boots if math.isfinite(b)])
    upper = float(np.quantile(finite, confidence)) if finite.size else point
    value = max(upper, point, just_above(float(x[-1])))
    return NormalThreshold(
        value=value,
        method="gpd_tail",
        target_fpr=target_fpr,
        confidence=confidence,
        guaranteed=False,
        fpr_bound=target_fpr,
        fpr_mean=target_fpr,
        fpr_low=0.0,
        fpr_high=float(stats.beta.ppf(1.0 - (1.0 - level) / 2.0, 1, n + 1)),
        n=n,
    )


def percentile_threshold(
    scores: np.ndarray, *, q: float = 0.99, target_fpr: float | None = None, level: float = 0.95
) -> NormalThreshold:
    """The common baseline: the ``q`` quantile of the normal scores, with no guarantee.

    Its realised FPR is about ``1 - q`` on the calibration sample and has no stated
    confidence; the interval is the Beta interval of the order statistic it lands on.
    """
    x = _check(scores, 1.0 - q if target_fpr is None else target_fpr, 0.5)
    n = x.size
    value = float(np.quantile(x, q, method="higher"))
    k = int(np.searchsorted(x, value, side="left"))  # scores strictly below value
    k = max(k, 1)
    mean, low, high = fpr_interval_above_rank(n, k, level)
    return NormalThreshold(
        value=value,
        method=f"percentile_{q * 100:g}",
        target_fpr=1.0 - q if target_fpr is None else target_fpr,
        confidence=0.5,
        guaranteed=False,
        fpr_bound=1.0 - q,
        fpr_mean=mean,
        fpr_low=low,
        fpr_high=high,
        n=n,
        k=k,
    )


def empirical_fpr(scores: np.ndarray, threshold: float) -> float:
    """Fraction of ``scores`` at or above ``threshold`` (the sample false-reject rate)."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    return float(np.mean(x >= threshold)) if x.size else float("nan")
