"""Fusion of synthetic and confirmed real NG into one weighted NG sample.

The rule: the line's true NG score distribution ``F`` gets a Dirichlet-process prior
centred on the synthetic distribution ``G`` with concentration ``n0`` (Ferguson 1973).
After observing ``k`` confirmed real NG scores, the posterior mean of ``F`` is::

    E[F | real] = n0 / (n0 + k) * G  +  k / (n0 + k) * F_real        (empirical F_real)

so the synthetic evidence counts as ``n0`` pseudo-observations: it decides alone when no
real NG exists, weighs as much as the real defects when ``k = n0``, and fades as ``1/k``.
``n0`` states how many real defects we believe the synthetic evidence is worth; it is a
prior, not a fitted value (default 2: synthetic NG resembles real NG only roughly).

Severity matching chooses *which* synthetic distribution ``G`` is: the synthetic sets
(one per source and severity) are components of a mixture, and their weights are the MAP
estimate, by EM, of a mixture of kernel density estimates fitted to the real NG scores,
with a symmetric Dirichlet(1 + a) prior on the weights (Dempster, Laird & Rubin 1977).
With no real NG the weights stay uniform; each real defect pulls weight towards the
severities whose scores look like it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from ngcal.core.errors import ConfigError
from ngcal.core.scoresets import NORMAL_SOURCES, SYNTHETIC_SOURCES, ScoreSet

from .ng import NgSample, groups_of, silverman_bandwidth

log = logging.getLogger(__name__)

DEFAULT_PRIOR_PSEUDO_COUNT = 2.0
DEFAULT_SEVERITY_PRIOR = 1.0
#: a normal source needs this many scores to count on its own in the worst-source FPR
MIN_SOURCE_SIZE = 30
NORMAL_RULES = ("max", "pooled")
#: NG groups smaller than this are kernel-smoothed (larger ones are fine-grained already)
SMOOTH_BELOW = 200


def synthetic_weight(n_real: int, prior_pseudo_count: float = DEFAULT_PRIOR_PSEUDO_COUNT) -> float:
    """Weight of synthetic NG after ``n_real`` confirmed NG: n0 / (n0 + n_real)."""
    if prior_pseudo_count < 0 or n_real < 0:
        raise ConfigError(
            f"prior_pseudo_count={prior_pseudo_count!r} and n_real={n_real!r} must be >= 0"
        )
    if prior_pseudo_count == 0 and n_real == 0:
        return 1.0
    return prior_pseudo_count / (prior_pseudo_count + n_real)


def component_name(s: ScoreSet) -> str:
    """A readable key for one synthetic component: ``source`` or ``source@severity``."""
    return s.source if s.severity is None else f"{s.source}@{s.severity:g}"


def _kde_logpdf(sample: np.ndarray, at: np.ndarray, floor_bw: float) -> np.ndarray:
    """Gaussian KDE log-density of ``sample`` at ``at`` (Silverman bandwidth, floored)."""
    n = sample.size
    bw = max(silverman_bandwidth(sample), floor_bw)
    z = (at[:, None] - sample[None, :]) / bw
    return np.asarray(logsumexp(-0.5 * z**2, axis=1) - math.log(n * bw * math.sqrt(2 * math.pi)))


def severity_weights(
    synthetic: Sequence[np.ndarray],
    real_ng: np.ndarray,
    *,
    prior: float = DEFAULT_SEVERITY_PRIOR,
    iterations: int = 200,
) -> np.ndarray:
    """MAP mixture weights [J] of the synthetic components given the real NG scores.

    Uniform when ``real_ng`` is empty. ``prior`` is the Dirichlet pseudo-count added to
    each component (so no component is ever dropped entirely on a few defects).
    """
    j = len(synthetic)
    if j == 0:
        return np.zeros(0)
    pi = np.full(j, 1.0 / j)
    real = np.asarray(real_ng, dtype=np.float64).reshape(-1)
    if real.size == 0 or j == 1:
        return pi
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s in synthetic])
    floor_bw = max(float(np.std(np.r_[pooled, real])) * 0.05, 1e-12)
    logp = np.stack(
        [
            _kde_logpdf(np.asarray(s, dtype=np.float64).reshape(-1), real, floor_bw)
            for s in synthetic
        ],
        axis=1,
    )  # [k, J]
    for _ in range(iterations):
        lr = logp + np.log(pi)[None, :]
        resp = np.exp(lr - logsumexp(lr, axis=1, keepdims=True))
        new = (resp.sum(axis=0) + prior) / (real.size + j * prior)
        if np.max(np.abs(new - pi)) < 1e-10:
            pi = new
            break
        pi = new
    return np.asarray(pi)


@dataclass(frozen=True)
class FusedEvidence:
    """Normal scores (pooled, and the groups whose worst FPR counts), the fused NG sample.

    ``normal_groups`` is the pooled normal sample plus, under the ``max`` rule, each
    normal source with at least MIN_SOURCE_SIZE scores on its own.
    """

    normal: np.ndarray
    normal_groups: tuple[np.ndarray, ...]
    ng: NgSample
    n_real_ng: int
    n_synthetic: int
    synthetic_weight: float
    components: dict[str, float]
    counts: dict[str, int]
    #: one name per normal group: the pooled sources joined by '+', then each source
    normal_names: tuple[str, ...] = ()


def fuse(
    scoresets: Sequence[ScoreSet],
    *,
    prior_pseudo_count: float = DEFAULT_PRIOR_PSEUDO_COUNT,
    severity_prior: float = DEFAULT_SEVERITY_PRIOR,
    severities: Sequence[float] | None = None,
    normal_rule: str = "max",
    smooth: bool = True,
) -> FusedEvidence:
    """Pool normal sources and fuse synthetic with real NG by the rule above.

    ``severities``, when given, keeps only synthetic sets at those severities (sets
    without a severity are kept). Real NG items each weigh ``(1 - w_syn) / k``.
    ``normal_rule`` ``max`` lets each large normal source bound the FPR on its own (robust
    to drift between training images and the line); ``pooled`` uses all normal scores as one.
    ``smooth`` kernel-smooths NG groups of fewer than SMOOTH_BELOW scores.
    """
    if normal_rule not in NORMAL_RULES:
        raise ConfigError(f"normal_rule={normal_rule!r} is not one of {NORMAL_RULES}")
    counts: dict[str, int] = {}
    for s in scoresets:
        counts[s.source] = counts.get(s.source, 0) + len(s)
    normal_parts = [s.scores for s in scoresets if s.source in NORMAL_SOURCES and len(s)]
    normal = np.concatenate(normal_parts) if normal_parts else np.zeros(0)
    by_source: dict[str, list[np.ndarray]] = {}
    for s in scoresets:
        if s.source in NORMAL_SOURCES and len(s):
            by_source.setdefault(s.source, []).append(s.scores)
    groups = [normal] if normal.size else []
    names = ["+".join(sorted(by_source))] if normal.size else []
    if normal_rule == "max" and len(by_source) > 1:
        for name, parts in by_source.items():
            x = np.concatenate(parts)
            if x.size >= MIN_SOURCE_SIZE:
                groups.append(x)
                names.append(name)
    real_parts = [s.scores for s in scoresets if s.source == "real_ng" and len(s)]
    real = np.concatenate(real_parts) if real_parts else np.zeros(0)
    syn = [s for s in scoresets if s.source in SYNTHETIC_SOURCES and len(s)]
    if severities is not None:
        keep = {float(v) for v in severities}
        syn = [s for s in syn if s.severity is None or float(s.severity) in keep]
    w_syn = synthetic_weight(real.size, prior_pseudo_count) if syn else 0.0
    pi = severity_weights([s.scores for s in syn], real, prior=severity_prior)
    components: dict[str, float] = {}
    for s, p in zip(syn, pi, strict=True):
        name = component_name(s)
        components[name] = components.get(name, 0.0) + float(p) * w_syn
    arrays = [s.scores for s in syn] + ([real] if real.size else [])
    weights = [float(p) * w_syn for p in pi] + ([1.0 - w_syn] if real.size else [])
    # Kernel smoothing of small NG groups; a couple of real defects borrow the normal
    # scores' spread as their prior scale (defects vary at least as much as good parts).
    prior_sd = float(np.std(normal)) if normal.size > 1 else 0.0
    bandwidths = [
        silverman_bandwidth(a, fallback_sd=prior_sd) if smooth and a.size < SMOOTH_BELOW else 0.0
        for a in arrays
    ]
    ng = groups_of(arrays, weights, bandwidths)
    log.debug("fused NG: %d real, %d synthetic sets, w_syn=%.3f", real.size, len(syn), w_syn)
    return FusedEvidence(
        normal=normal,
        normal_groups=tuple(groups),
        ng=ng,
        n_real_ng=int(real.size),
        n_synthetic=int(sum(len(s) for s in syn)),
        synthetic_weight=w_syn,
        components=components,
        counts=counts,
        normal_names=tuple(names),
    )


def weakest_required(scoresets: Sequence[ScoreSet], required_severity: float) -> float | None:
    """The lowest synthetic severity at or above ``required_severity`` (None if none)."""
    sev = sorted(
        {
            float(s.severity)
            for s in scoresets
            if s.source in SYNTHETIC_SOURCES
            and s.severity is not None
            and float(s.severity) >= required_severity
        }
    )
    return sev[0] if sev else None
