"""Recalibration policy for the daemon: guard rails around :func:`calibrate`, as pure functions.

The daemon persists :class:`PolicyState` (``to_json``), applies ``Decision.new_state`` when
``Decision.applied`` and appends ``Decision.audit`` to its audit log. Nothing here touches
files, clocks (unless ``now`` is omitted) or the network.

Guard rails, in the order they are checked by :func:`recalibrate`:

1. minimum evidence: at least ``min_real_ng`` confirmed NG and ``min_real_ok`` confirmed OK;
2. the evidence must belong to the current model (score sets naming another sha256);
3. the proposal is :func:`ngcal.calibration.estimate.calibrate` on the evidence; with an
   ``audit`` anchor (what random audits of passed parts measured at the threshold in
   force) the NG evidence is first reweighted to agree with it
   (:func:`ngcal.calibration.audit.anchor`: confirmations are a selected sample, the
   audit is not; decision 0304);
4. hysteresis: a proposed move smaller than ``hysteresis * |current|`` is not applied;
   in mode ``cost``, neither is a move whose expected cost gain is not above its own
   uncertainty (:func:`cost_gain`: the ``1 - gain_level`` bootstrap quantile of the gain
   must be > 0), so a flat cost curve cannot make the threshold swing;
5. maximum step: the applied value moves at most ``max_step * |current|`` (exactly: the
   clamp is corrected by one ulp where float rounding would overshoot);
6. dry run: everything is computed and audited, nothing is applied.

Every applied value is a new version; :func:`rollback` restores an earlier version's exact
value as a new version, so the history is append-only.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from ngcal.core.errors import ArtifactError, ConfigError, NgcalError
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import OperatingPoint, ThresholdFile

from . import estimate, fusion, ng
from .audit import AuditAnchor, anchor

POLICY_STATE_SCHEMA = "ngcal.policy_state/1"


@dataclass(frozen=True)
class PolicyConfig:
    """Guard rails and calibration options (``max_step``/``hysteresis`` relative to |current|)."""

    min_real_ng: int = 3
    min_real_ok: int = 0
    max_step: float = 0.10
    hysteresis: float = 0.01
    dry_run: bool = False
    mode: str = "cost"
    target_fpr: float = 0.01
    confidence: float = 0.95
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)
    miss_rate: float = 0.05
    prior_pseudo_count: float = fusion.DEFAULT_PRIOR_PSEUDO_COUNT
    normal_rule: str = "max"
    n_boot: int = 200
    #: confidence that a move lowers the expected cost (mode cost); 0 turns the check off
    gain_level: float = 0.9
    gain_boot: int = 200

    def __post_init__(self) -> None:
        if self.min_real_ng < 0 or self.min_real_ok < 0:
            raise ConfigError("min_real_ng and min_real_ok must be >= 0")
        if not (math.isfinite(self.max_step) and self.max_step >= 0):
            raise ConfigError(f"max_step={self.max_step!r} must be a finite number >= 0")
        if not (math.isfinite(self.hysteresis) and self.hysteresis >= 0):
            raise ConfigError(f"hysteresis={self.hysteresis!r} must be a finite number >= 0")
        if self.normal_rule not in ("max", "pooled"):
            raise ConfigError(f"normal_rule={self.normal_rule!r} is not 'max' or 'pooled'")
        if self.mode not in estimate.MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {estimate.MODES}")
        if not 0.0 <= self.gain_level < 1.0:
            raise ConfigError(f"gain_level={self.gain_level!r} must be in [0, 1)")

    def options(self) -> estimate.CalibrationOptions:
        """The calibration options these guard rails propose with."""
        return estimate.CalibrationOptions(
            mode=self.mode,
            target_fpr=self.target_fpr,
            confidence=self.confidence,
            operating_point=self.operating_point,
            miss_rate=self.miss_rate,
            prior_pseudo_count=self.prior_pseudo_count,
            normal_rule=self.normal_rule,
            n_boot=self.n_boot,
        )


def _dump(t: ThresholdFile) -> dict[str, Any]:
    out: dict[str, Any] = t.model_dump(mode="json", by_alias=True)
    return out


@dataclass(frozen=True)
class PolicyState:
    """The current threshold and every version ever applied (oldest first, current included)."""

    current: ThresholdFile
    history: tuple[ThresholdFile, ...]

    def __post_init__(self) -> None:
        versions = [t.version for t in self.history]
        if len(set(versions)) != len(versions):
            raise ArtifactError(f"policy state: duplicate versions in history {versions}")
        if self.current not in self.history:
            raise ArtifactError(
                f"policy state: current version {self.current.version} is not in the history"
            )

    @classmethod
    def initial(cls, threshold: ThresholdFile) -> PolicyState:
        """A state whose only version is ``threshold``."""
        return cls(current=threshold, history=(threshold,))

    @property
    def latest_version(self) -> int:
        """The highest version number ever used."""
        return int(max(t.version for t in self.history))

    def find(self, version: int) -> ThresholdFile | None:
        """The history entry with that version, or None."""
        return next((t for t in self.history if t.version == version), None)

    def to_json(self) -> dict[str, Any]:
        """JSON-able representation (the daemon stores it atomically)."""
        return {
            "schema": POLICY_STATE_SCHEMA,
            "current_version": self.current.version,
            "history": [_dump(t) for t in self.history],
        }

    @classmethod
    def from_json(cls, obj: Any) -> PolicyState:
        """Parse :meth:`to_json` output; ArtifactError names the bad field."""
        if not isinstance(obj, dict) or obj.get("schema") != POLICY_STATE_SCHEMA:
            raise ArtifactError(f"policy state: not a {POLICY_STATE_SCHEMA} object")
        try:
            history = tuple(ThresholdFile.model_validate(t) for t in obj["history"])
            cur = int(obj["current_version"])
        except (KeyError, TypeError, ValueError, ValidationError) as e:
            raise ArtifactError(f"policy state: malformed ({e})") from e
        current = next((t for t in history if t.version == cur), None)
        if current is None:
            raise ArtifactError(f"policy state: current_version {cur} is not in the history")
        return cls(current=current, history=history)


#: what became of a request: a new version applied; everything computed but not applied
#: (dry run); nothing to change (no move worth making, or already current); refused
#: (insufficient or foreign evidence, a failed calibration, an unknown version)
Outcome = Literal["applied", "dry_run", "unchanged", "refused"]


@dataclass(frozen=True)
class Decision:
    """The outcome of one recalibration or rollback request; ``outcome`` says which kind."""

    outcome: Outcome
    reason: str
    old: ThresholdFile
    proposed: ThresholdFile | None
    new_state: PolicyState
    audit: dict[str, Any]

    @property
    def applied(self) -> bool:
        """True when a new threshold version was applied."""
        return self.outcome == "applied"


def _now(now: str | None) -> str:
    return now or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def clamp_step(old: float, proposed: float, max_step: float) -> float:
    """``proposed`` moved no further than ``max_step * |old|`` from ``old`` (exact in floats)."""
    limit = max_step * abs(old)
    if abs(proposed - old) <= limit:
        return proposed
    value = old + math.copysign(limit, proposed - old)
    while abs(value - old) > limit:  # float rounding overshot: step back one ulp
        value = math.nextafter(value, old)
    return value


def _rates(t: ThresholdFile | None) -> dict[str, Any]:
    if t is None:
        return {}
    return {
        "expected_fpr": None if t.expected_fpr is None else t.expected_fpr.model_dump(),
        "expected_fnr": None if t.expected_fnr is None else t.expected_fnr.model_dump(),
    }


def _audit(
    *,
    action: str,
    actor: str,
    now: str,
    old: ThresholdFile,
    new: ThresholdFile | None,
    proposed: ThresholdFile | None,
    applied: bool,
    reason: str,
    dry_run: bool,
    evidence: dict[str, int],
) -> dict[str, Any]:
    return {
        "time": now,
        "actor": actor,
        "action": action,
        "evidence": evidence,
        "old_value": old.value,
        "old_version": old.version,
        "proposed_value": None if proposed is None else proposed.value,
        "new_value": None if new is None else new.value,
        "new_version": None if new is None else new.version,
        "mode": None if proposed is None else proposed.mode,
        "method": None if proposed is None else proposed.method,
        **_rates(new if new is not None else proposed),
        "applied": applied,
        "reason": reason,
        "dry_run": dry_run,
    }


def evidence_has_ng(evidence: Sequence[ScoreSet]) -> bool:
    """True when some score set is NG evidence (synthetic or real)."""
    return any(s.is_ng and len(s) for s in evidence)


def _counts(evidence: Sequence[ScoreSet]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in evidence:
        out[s.source] = out.get(s.source, 0) + len(s)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class CostGain:
    """Expected cost per part saved by moving ``old`` -> ``new`` (false-reject units).

    ``mean`` on the evidence itself, ``low`` the ``1 - level`` quantile over bootstrap
    resamples of the normal groups and of the NG sample (within each weighted group).
    """

    mean: float
    low: float
    level: float


def cost_gain(
    evidence: Sequence[ScoreSet],
    old: float,
    new: float,
    config: PolicyConfig,
    *,
    seed: int = 0,
    audit: AuditAnchor | None = None,
) -> CostGain:
    """How much the move lowers the expected cost at the operating point, and how surely.

    With ``audit`` the NG evidence is anchored as :func:`recalibrate`'s proposal was.
    """
    ev = fusion.fuse(
        evidence, prior_pseudo_count=config.prior_pseudo_count, normal_rule=config.normal_rule
    )
    if audit is not None:
        ev, _ = anchor(ev, audit)
    op = config.operating_point
    t = np.asarray([old, new])

    def gain(groups: Sequence[np.ndarray], sample: ng.NgSample) -> float:
        c = ng.cost_at(ng.fpr_at(groups, t), sample.tpr(t), op.prevalence, op.cost_ratio)
        return float(c[0] - c[1])

    point = gain(ev.normal_groups, ev.ng)
    rng = np.random.default_rng(seed)
    boots = [
        gain(
            [rng.choice(x, size=x.size, replace=True) for x in ev.normal_groups],
            ev.ng.resample(rng),
        )
        for _ in range(config.gain_boot)
    ]
    low = float(np.quantile(boots, 1.0 - config.gain_level)) if boots else point
    return CostGain(mean=point, low=low, level=config.gain_level)


def recalibrate(
    state: PolicyState,
    evidence: Sequence[ScoreSet],
    config: PolicyConfig,
    *,
    actor: str,
    now: str | None = None,
    audit: AuditAnchor | None = None,
) -> Decision:
    """Propose a threshold from ``evidence`` and apply it within the guard rails.

    ``audit``: the audited miss rate at the current threshold (None: no audit evidence;
    the proposal is then exactly the offline ``calibrate`` on the same evidence).
    """
    now = _now(now)
    old = state.current
    counts = _counts(evidence)

    def decide(
        outcome: Outcome,
        reason: str,
        proposed: ThresholdFile | None = None,
        new: ThresholdFile | None = None,
    ) -> Decision:
        """Audit and return the outcome; ``new`` is applied when ``outcome`` is applied."""
        applied = outcome == "applied"
        entry = _audit(
            action="recalibrate",
            actor=actor,
            now=now,
            old=old,
            new=new,
            proposed=proposed,
            applied=applied,
            reason=reason,
            dry_run=config.dry_run,
            evidence=counts,
        )
        entry["outcome"] = outcome
        if audit is not None:
            entry["audit_anchor"] = {
                "threshold": audit.threshold,
                "miss": audit.miss.model_dump(),
                "escaped": audit.escaped,
            }
        if new is None or not applied:
            return Decision(outcome, reason, old, proposed, state, entry)
        new_state = PolicyState(current=new, history=(*state.history, new))
        return Decision(outcome, reason, old, proposed, new_state, entry)

    n_ng, n_ok = counts.get("real_ng", 0), counts.get("real_ok", 0)
    if n_ng < config.min_real_ng or n_ok < config.min_real_ok:
        return decide(
            "refused",
            f"insufficient evidence: {n_ng} real NG (need {config.min_real_ng}), "
            f"{n_ok} real OK (need {config.min_real_ok})",
        )
    foreign = sorted({s.model_sha256 for s in evidence if s.model_sha256} - {old.model_sha256})
    if old.model_sha256 and foreign:
        return decide("refused", f"evidence from another model (sha256 {foreign[0][:12]}...)")
    version = state.latest_version + 1
    try:
        proposed = estimate.calibrate(
            evidence,
            dataclasses.replace(config.options(), audit=audit),
            provenance=estimate.Provenance(
                model_sha256=old.model_sha256,
                created_by=actor,
                version=version,
                parent_version=old.version,
                now=now,
            ),
        )
    except NgcalError as e:
        return decide("refused", f"calibration failed: {e}")
    move = abs(proposed.value - old.value)
    if move < config.hysteresis * abs(old.value):
        return decide(
            "unchanged",
            f"proposed move {move:.6g} is below the hysteresis "
            f"{config.hysteresis:g} x |{old.value:.6g}|",
            proposed,
        )
    value = clamp_step(old.value, proposed.value, config.max_step)
    if config.mode == "cost" and config.gain_level > 0 and evidence_has_ng(evidence):
        g = cost_gain(evidence, old.value, value, config, audit=audit)
        if g.low <= 0.0:
            return decide(
                "unchanged",
                f"expected cost gain {g.mean:.3g} per part is not above its uncertainty "
                f"({g.level:.0%} lower bound {g.low:.3g})",
                proposed,
            )
    clamped = value != proposed.value
    fpr, fnr = (proposed.expected_fpr, proposed.expected_fnr)
    if clamped:
        fpr, fnr = estimate.expected_rates(
            evidence,
            value,
            prior_pseudo_count=config.prior_pseudo_count,
            normal_rule=config.normal_rule,
        )
    notes = dict(proposed.notes)
    notes.update(proposed_value=proposed.value, clamped=int(clamped))
    new = proposed.model_copy(
        update={"value": value, "expected_fpr": fpr, "expected_fnr": fnr, "notes": notes}
    )
    reason = "clamped to max_step" if clamped else "applied"
    if config.dry_run:
        return decide("dry_run", f"dry run ({reason} if applied)", proposed, new)
    return decide("applied", reason, proposed, new)


def rollback(state: PolicyState, version: int, *, actor: str, now: str | None = None) -> Decision:
    """Restore ``version``'s exact threshold as a NEW version whose parent_version is ``version``.

    Unknown versions, or the current version itself, give a refused decision.
    """
    now = _now(now)
    old = state.current
    target = state.find(version)

    def decide(
        outcome: Outcome, reason: str, new: ThresholdFile | None, st: PolicyState
    ) -> Decision:
        applied = outcome == "applied"
        audit = _audit(
            action="rollback",
            actor=actor,
            now=now,
            old=old,
            new=new,
            proposed=new,
            applied=applied,
            reason=reason,
            dry_run=False,
            evidence=dict(old.evidence),
        )
        audit["rollback_to"] = version
        audit["outcome"] = outcome
        return Decision(outcome, reason, old, new, st, audit)

    if target is None:
        known = [t.version for t in state.history]
        return decide("refused", f"unknown version {version} (known: {known})", None, state)
    if version == old.version:
        return decide("unchanged", f"version {version} is already current", None, state)
    notes = dict(target.notes)
    notes.update(rollback_from=old.version, rollback_to=version)
    new = target.model_copy(
        update={
            "version": state.latest_version + 1,
            "parent_version": version,
            "created_at": now,
            "created_by": actor,
            "notes": notes,
        }
    )
    new_state = PolicyState(current=new, history=(*state.history, new))
    return decide("applied", f"rolled back to version {version}", new, new_state)
