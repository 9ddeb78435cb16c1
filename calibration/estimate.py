"""One entry point: score sets in, a ``ThresholdFile`` with expected rates and evidence out.

Modes (the product takes the operating point as input; no fixed rule suits every line):

- ``target_fpr``: normal evidence only, conformal bound P(FPR > target) <= 1 - confidence
  (:mod:`ngcal.calibration.normal`); NG evidence, when present, only reports the miss rate.
- ``f1``: F1-optimal at the operating point's prevalence.
- ``cost`` (the default): least expected cost per part at the operating point (a miss
  costs ``cost_ratio`` false rejects at defect ``prevalence``). It is the default because it
  is the only mode whose objective is the factory's own trade-off; F1 silently assumes
  the test split's NG share and a target FPR ignores what misses cost. While the NG
  evidence is mostly synthetic, the threshold is at most the normal scores' 99th
  percentile (:func:`synthetic_ceiling`).
- ``miss_rate``: miss rate at most ``miss_rate`` at the weakest synthetic severity that must
  be caught (``required_severity``), or on the fused NG evidence when none is named.

NG evidence is the fused mixture of synthetic and real NG (:mod:`ngcal.calibration.fusion`).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from ngcal.core.errors import ConfigError, DataError
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import Interval, OperatingPoint, ScoreSetRef, ThresholdFile

from . import audit, fusion, ng, normal, statements
from .audit import AuditAnchor

MODES: tuple[str, ...] = ("target_fpr", "f1", "cost", "miss_rate")
DEFAULT_MODE = "cost"


def _model_sha(scoresets: Sequence[ScoreSet], given: str | None) -> str:
    if given is not None:
        return given
    shas = {s.model_sha256 for s in scoresets if s.model_sha256}
    if len(shas) > 1:
        raise DataError(f"score sets come from {len(shas)} different models: {sorted(shas)}")
    return next(iter(shas), "")


def _note(v: float | int | str | None) -> float | int | str | None:
    """A JSON-safe note value: numpy floats to float, NaN/inf to None."""
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v


def scoreset_refs(scoresets: Sequence[ScoreSet]) -> tuple[ScoreSetRef, ...]:
    """What ``thresholds.json`` records of each score set it rests on (content digests)."""
    return tuple(
        ScoreSetRef(
            name=s.file_name,
            source=s.source,
            severity=s.severity,
            count=len(s),
            sha256=s.content_sha256,
        )
        for s in scoresets
    )


def rate_intervals(
    ev: fusion.FusedEvidence, threshold: float, *, level: float = 0.95
) -> tuple[Interval, Interval]:
    """Expected FPR and miss rate of ``threshold`` on the evidence, with Jeffreys intervals.

    The FPR is the worst normal group's and its interval uses that group's size; the
    miss-rate interval uses the
    Kish effective size of the weighted NG sample (real and synthetic mixed).
    """
    if ev.normal.size:
        per = [normal.empirical_fpr(x, threshold) for x in ev.normal_groups]
        worst = int(np.argmax(per))
        f = per[worst]
        lo, hi = ng.jeffreys_interval(f, float(ev.normal_groups[worst].size), level)
        fpr = Interval(value=f, low=lo, high=hi, level=level)
    else:
        fpr = Interval(value=None, level=level)
    if ev.ng.scores:
        m = ng.weighted_fnr(ev.ng, threshold)
        lo, hi = ng.jeffreys_interval(m, ev.ng.n_effective, level)
        fnr = Interval(value=m, low=lo, high=hi, level=level)
    else:
        fnr = Interval(value=None, level=level)
    return fpr, fnr


def expected_rates(
    scoresets: Sequence[ScoreSet],
    threshold: float,
    *,
    prior_pseudo_count: float = fusion.DEFAULT_PRIOR_PSEUDO_COUNT,
    normal_rule: str = "max",
    level: float = 0.95,
) -> tuple[Interval, Interval]:
    """Expected (FPR, miss rate) of an arbitrary threshold on fused evidence."""
    ev = fusion.fuse(scoresets, prior_pseudo_count=prior_pseudo_count, normal_rule=normal_rule)
    return rate_intervals(ev, threshold, level=level)


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`calibrate` chooses a threshold (keyword-only, validated at construction).

    ``target_fpr``/``confidence`` serve mode ``target_fpr``; ``operating_point`` the modes
    ``f1`` and ``cost``; ``miss_rate``/``required_severity`` mode ``miss_rate``. The rest
    shape the evidence (``prior_pseudo_count``, ``normal_rule``, ``audit``) and the bootstrap.
    """

    mode: str = DEFAULT_MODE
    target_fpr: float = 0.01
    confidence: float = 0.95
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    miss_rate: float = 0.05
    required_severity: float | None = None
    prior_pseudo_count: float = fusion.DEFAULT_PRIOR_PSEUDO_COUNT
    normal_rule: str = "max"
    n_boot: int = 200
    level: float = 0.95
    seed: int = 0
    #: the audited miss rate at the threshold in force; the NG evidence is reweighted to
    #: agree with it (:func:`ngcal.calibration.audit.anchor`, decision 0304)
    audit: AuditAnchor | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")


@dataclass(frozen=True)
class Provenance:
    """Who wrote a threshold version and where it sits in the history."""

    model_sha256: str | None = None
    created_by: str = "ngcal calibrate"
    version: int = 1
    parent_version: int | None = None
    now: str | None = None


Notes = dict[str, float | int | str | None]
#: one mode: (fused evidence, the score sets, options) -> (threshold, method, notes)
ModeRule = Callable[
    [fusion.FusedEvidence, Sequence[ScoreSet], CalibrationOptions], tuple[float, str, Notes]
]


def _target_fpr(
    ev: fusion.FusedEvidence, _sets: Sequence[ScoreSet], o: CalibrationOptions
) -> tuple[float, str, Notes]:
    # One threshold per normal group; the highest bounds every group's FPR at once.
    per = [
        normal.conformal_threshold(
            x, target_fpr=o.target_fpr, confidence=o.confidence, level=o.level
        )
        for x in ev.normal_groups
    ]
    nt = max(per, key=lambda r: r.value)
    return (
        nt.value,
        nt.method,
        {
            "normal_groups": len(per),
            "normal_group_n": nt.n,
            "guaranteed": int(nt.guaranteed),
            "fpr_bound": nt.fpr_bound,
            "order_statistic_k": nt.k,
            "fpr_true_mean": nt.fpr_mean,
            "fpr_true_low": nt.fpr_low,
            "fpr_true_high": nt.fpr_high,
        },
    )


def _boot(o: CalibrationOptions) -> dict[str, Any]:
    return {"n_boot": o.n_boot, "level": o.level, "seed": o.seed}


def _f1(
    ev: fusion.FusedEvidence, _sets: Sequence[ScoreSet], o: CalibrationOptions
) -> tuple[float, str, Notes]:
    op = o.operating_point
    t = ng.f1_threshold(ev.normal_groups, ev.ng, prevalence=op.prevalence, **_boot(o))
    notes: Notes = {
        "f1_estimate": t.objective,
        "threshold_low": t.value_low,
        "threshold_high": t.value_high,
    }
    return t.value, t.method, notes


#: while the NG evidence is mostly synthetic, the cost threshold is at most this quantile
#: of the pooled normal scores (the normal 99th percentile rule; decision 0303)
SYNTHETIC_CEILING_QUANTILE = 0.99
#: ... mostly synthetic: the synthetic share of the fused NG evidence is at least this
#: (with the fusion prior n0, up to n0 confirmed real NG)
SYNTHETIC_CEILING_WEIGHT = 0.5


def synthetic_ceiling(ev: fusion.FusedEvidence) -> float | None:
    """The highest threshold the cost rule may choose on ``ev``, or None when unbounded.

    Bounded while synthetic NG is at least SYNTHETIC_CEILING_WEIGHT of the fused NG
    evidence: the pooled normal scores' SYNTHETIC_CEILING_QUANTILE. Lowering a threshold
    to it costs at most about 1% of good parts in false rejects, a premium the normal
    evidence measures; synthetic look-alikes have made real defects look easier to catch
    than they were (magnetic tile, issue 15's other products), and then a threshold above
    it misses more than the premium is worth (decision 0303).
    """
    if ev.synthetic_weight < SYNTHETIC_CEILING_WEIGHT or not ev.n_synthetic:
        return None
    if not ev.normal.size:
        return None
    return float(np.quantile(ev.normal, SYNTHETIC_CEILING_QUANTILE))


def _cost(
    ev: fusion.FusedEvidence, _sets: Sequence[ScoreSet], o: CalibrationOptions
) -> tuple[float, str, Notes]:
    op = o.operating_point
    t = ng.cost_threshold(
        ev.normal_groups, ev.ng, prevalence=op.prevalence, cost_ratio=op.cost_ratio, **_boot(o)
    )
    notes: Notes = {
        "cost_estimate": t.objective,
        "threshold_low": t.value_low,
        "threshold_high": t.value_high,
    }
    ceiling = synthetic_ceiling(ev)
    if ceiling is None or t.value <= ceiling:
        return t.value, t.method, notes
    notes.update(cost_optimum=t.value, synthetic_ceiling=ceiling)
    return ceiling, "min_expected_cost_synthetic_ceiling", notes


def _miss_rate(
    ev: fusion.FusedEvidence, sets: Sequence[ScoreSet], o: CalibrationOptions
) -> tuple[float, str, Notes]:
    sev = None
    if o.required_severity is not None:
        sev = fusion.weakest_required(sets, o.required_severity)
        if sev is None:
            raise DataError(f"no synthetic score set at severity >= {o.required_severity}")
    sub = (
        ev
        if sev is None
        else fusion.fuse(
            sets,
            prior_pseudo_count=o.prior_pseudo_count,
            severities=[sev],
            normal_rule=o.normal_rule,
        )
    )
    t = ng.miss_rate_threshold(ev.normal_groups, sub.ng, miss_rate=o.miss_rate, **_boot(o))
    notes: Notes = {
        "miss_rate_target": o.miss_rate,
        "severity": sev,
        "threshold_low": t.value_low,
        "threshold_high": t.value_high,
    }
    return t.value, t.method, notes


#: mode -> rule; MODES lists the same names
MODE_RULES: dict[str, ModeRule] = {
    "target_fpr": _target_fpr,
    "f1": _f1,
    "cost": _cost,
    "miss_rate": _miss_rate,
}


def stated_rates(
    ev: fusion.FusedEvidence,
    scoresets: Sequence[ScoreSet],
    threshold: float,
    o: CalibrationOptions,
) -> tuple[Interval, Interval, dict[str, Interval]]:
    """(FPR guarantee, headline miss rate, miss rate per NG evidence kind) at ``threshold``.

    See :mod:`ngcal.calibration.statements`; the leave-one-out refits rerun ``o.mode``'s
    rule without the bootstrap.
    """
    quick = replace(o, n_boot=0)

    def refit(sets: Sequence[ScoreSet]) -> float:
        e = fusion.fuse(sets, prior_pseudo_count=o.prior_pseudo_count, normal_rule=o.normal_rule)
        return MODE_RULES[o.mode](e, sets, quick)[0]

    fpr = statements.fpr_guarantee(ev.normal_groups, ev.normal_names, threshold, o.level)
    _, fused = rate_intervals(ev, threshold, level=o.level)
    by_source = statements.miss_statements(scoresets, threshold, refit, o.level)
    return fpr, statements.headline(by_source, fused), by_source


def calibrate(
    scoresets: Sequence[ScoreSet],
    options: CalibrationOptions | None = None,
    *,
    provenance: Provenance | None = None,
    **overrides: Any,
) -> ThresholdFile:
    """Calibrate a threshold from tagged score sets (see the module docstring for modes).

    ``overrides`` replace fields of ``options`` (``calibrate(sets, mode="f1")``); an
    ``operating_point=None`` override keeps the default. Raises ConfigError for a bad
    option and DataError when the evidence cannot support the mode (no normal scores; no
    NG scores for f1/cost/miss_rate).
    """
    if overrides.get("operating_point", 0) is None:
        del overrides["operating_point"]
    unknown = sorted(set(overrides) - {f.name for f in fields(CalibrationOptions)})
    if unknown:
        raise ConfigError(f"calibrate(): unknown option(s) {unknown}")
    o = replace(options or CalibrationOptions(), **overrides)
    prov = provenance or Provenance()
    ev = fusion.fuse(scoresets, prior_pseudo_count=o.prior_pseudo_count, normal_rule=o.normal_rule)
    if ev.normal.size < normal.MIN_NORMAL:
        raise DataError(
            f"{ev.normal.size} normal scores (normal_loo/normal_holdout/real_ok); "
            f"at least {normal.MIN_NORMAL} are needed"
        )
    notes: Notes = {
        "n_real_ng": ev.n_real_ng,
        "n_synthetic_ng": ev.n_synthetic,
        "synthetic_weight": round(ev.synthetic_weight, 6),
        "prior_pseudo_count": o.prior_pseudo_count,
    }
    if o.audit is not None:
        ev, audit_notes = audit.anchor(ev, o.audit)
        notes.update(audit_notes)
    for name, w in ev.components.items():
        notes[f"weight:{name}"] = round(w, 6)
    if o.mode != "target_fpr" and not ev.ng.scores:
        raise DataError(
            f"mode {o.mode!r} needs NG evidence (synthetic glass/diffusion or real_ng score "
            "sets); none was given. Use mode 'target_fpr' or add NG score sets."
        )
    rule = MODE_RULES[o.mode]
    value, method, mode_notes = rule(ev, scoresets, o)
    notes.update(mode_notes)
    fpr, fnr, by_source = stated_rates(ev, scoresets, value, o)
    return ThresholdFile(
        value=float(value),
        version=prov.version,
        mode=o.mode,
        method=method,
        target_fpr=o.target_fpr if o.mode == "target_fpr" else None,
        confidence=o.confidence if o.mode == "target_fpr" else None,
        operating_point=o.operating_point,
        expected_fpr=fpr,
        expected_fnr=fnr,
        evidence=dict(sorted(ev.counts.items())),
        scoresets=scoreset_refs(scoresets),
        miss_rate_by_source=by_source,
        model_sha256=_model_sha(scoresets, prov.model_sha256),
        parent_version=prov.parent_version,
        created_at=prov.now or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        created_by=prov.created_by,
        notes={k: _note(v) for k, v in notes.items()},
    )
