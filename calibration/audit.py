"""The audited miss rate as an anchor for the NG evidence (decision 0304).

Confirmed NG are a selected sample: every flagged defect is confirmed, a missed one only
when somebody finds it, so confirmations read as a line that misses less than it does;
synthetic look-alikes can be optimistic in the same direction (decision 0303). Random
audits of passed parts are the one unbiased measurement of the miss rate at the
threshold in force ``t0`` (:func:`ngcal.calibration.statements.audit_miss_rate`).

:func:`anchor` reweights the fused NG sample so that its miss rate at ``t0`` agrees with
the audit: the mass of every NG group below ``t0`` is scaled by one factor, the mass at
or above it by another (the shape on each side is kept), so that

- the fused miss rate stays where it is while it lies inside the audit's interval (the
  audit cannot tell it wrong; so a handful of checks changes nothing);
- outside it, the evidence is contradicted at the audit's level, and its miss rate moves
  to the audit's point estimate, the one unbiased figure (the fused evidence's own
  interval says nothing about the selection of confirmations, so it is not weighed
  against the audit's); with no escape found yet (point estimate 0) only to the
  interval's upper end, so that a clean audit never claims more than it shows.

Without an anchor nothing changes, so the offline ``calibrate`` is what it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ngcal.core.errors import ConfigError
from ngcal.core.thresholds import Interval

from . import ng, statements
from .fusion import FusedEvidence

Notes = dict[str, float | int | str | None]


@dataclass(frozen=True)
class AuditAnchor:
    """What random audits measured: the miss rate (with its interval) at ``threshold``."""

    threshold: float
    miss: Interval
    escaped: int

    def __post_init__(self) -> None:
        m = self.miss
        if m.value is None or m.low is None or m.high is None:
            raise ValueError("audit anchor: the miss rate needs a value and an interval")
        if not 0.0 <= m.low <= m.value <= m.high <= 1.0:
            raise ValueError(f"audit anchor: inconsistent miss interval {m}")


#: the fields of an audit figure given on the command line (``ngcal calibrate --audit``)
AUDIT_FIELDS = ("threshold", "passed", "caught", "checked", "escaped")


def parse_audit(spec: str, *, level: float = 0.95) -> AuditAnchor:
    """``threshold=T,passed=N,caught=C,checked=n,escaped=x`` as an anchor.

    At threshold ``T`` the line passed ``N`` parts and caught ``C`` confirmed defects;
    ``n`` passed parts drawn at random were checked and ``x`` of them were defective.
    ConfigError names the fault.
    """
    fields: dict[str, float] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in AUDIT_FIELDS or key in fields:
            raise ConfigError(f"--audit {spec!r}: expected {'=..,'.join(AUDIT_FIELDS)}=..")
        try:
            fields[key] = float(value)
        except ValueError as e:
            raise ConfigError(f"--audit {spec!r}: {key}={value!r} is not a number") from e
    missing = [k for k in AUDIT_FIELDS if k not in fields]
    if missing:
        raise ConfigError(f"--audit {spec!r}: missing {', '.join(missing)}")
    counts = {k: fields[k] for k in AUDIT_FIELDS[1:]}
    if any(v < 0 or v != int(v) for v in counts.values()) or counts["escaped"] > counts["checked"]:
        raise ConfigError(f"--audit {spec!r}: counts must be whole numbers, escaped <= checked")
    if counts["checked"] < 1 or counts["checked"] > counts["passed"]:
        raise ConfigError(f"--audit {spec!r}: need 1 <= checked <= passed")
    miss = statements.audit_miss_rate(
        escaped=int(counts["escaped"]),
        checked=int(counts["checked"]),
        passed=int(counts["passed"]),
        caught=int(counts["caught"]),
        level=level,
    )
    assert miss is not None  # checked >= 1
    return AuditAnchor(threshold=fields["threshold"], miss=miss, escaped=int(counts["escaped"]))


def _split(sample: ng.NgSample, t0: float) -> tuple[ng.NgSample, np.ndarray]:
    """Each group cut at ``t0`` into (below, at-or-above) sub-groups; which side each is."""
    arrays: list[np.ndarray] = []
    weights: list[float] = []
    bws: list[float] = []
    side: list[bool] = []
    hs = sample.bandwidths or (0.0,) * len(sample.scores)
    total = sum(sample.weights)
    for y, w, h in zip(sample.scores, sample.weights, hs, strict=True):
        y = np.asarray(y, dtype=np.float64)
        for below in (True, False):
            part = y[y < t0] if below else y[y >= t0]
            if part.size and w > 0:
                arrays.append(part)
                weights.append(w / total * part.size / y.size)
                bws.append(h)
                side.append(below)
    return ng.NgSample(tuple(arrays), tuple(weights), tuple(bws)), np.asarray(side, dtype=bool)


def target_miss(fused: float, a: AuditAnchor) -> float:
    """The miss rate at ``a.threshold`` the NG evidence is moved to (see the module doc)."""
    m = a.miss
    assert m.value is not None and m.low is not None and m.high is not None
    if m.low <= fused <= m.high:
        return fused
    if a.escaped >= 1:
        return float(m.value)
    return float(min(max(fused, m.low), m.high))


def anchor(ev: FusedEvidence, a: AuditAnchor) -> tuple[FusedEvidence, Notes]:
    """``ev`` with its NG sample reweighted to the audited miss rate at ``a.threshold``."""
    notes: Notes = {"audit_threshold": a.threshold, "audit_miss": a.miss.value}
    if not ev.ng.scores:
        return ev, {**notes, "audit_anchor": "no NG evidence"}
    t0 = a.threshold
    m_fused = float(ng.weighted_fnr(ev.ng, t0))
    target = target_miss(m_fused, a)
    notes.update(audit_fused_miss=m_fused, audit_target_miss=target)
    if abs(target - m_fused) < 1e-12:
        return ev, {**notes, "audit_anchor": "agrees"}
    sub, below = _split(ev.ng, t0)
    # miss at t0 is linear in the two scale factors (kernels leak across t0, so each
    # side's own miss share is computed, not assumed 1 and 0)
    w = np.asarray(sub.weights)
    own = np.asarray(
        [
            1.0 - ng.NgSample((s,), (1.0,), (h,)).tpr(np.asarray([t0]))[0]
            for s, h in zip(sub.scores, sub.bandwidths or (0.0,) * len(sub.scores), strict=True)
        ]
    )
    wb, wa = float(w[below].sum()), float(w[~below].sum())
    mb, ma = float((w * own)[below].sum()), float((w * own)[~below].sum())
    # a wb + b wa = 1 and a mb + b ma = target
    rb = mb / wb if wb > 0 else None
    ra = ma / wa if wa > 0 else None
    if rb is None or ra is None or abs(rb - ra) < 1e-12:
        return ev, {**notes, "audit_anchor": "no NG evidence on one side of the threshold"}
    reach = float(min(max(target, min(ra, rb)), max(ra, rb)))
    # share s of the mass below: s rb + (1 - s) ra = reach
    s = (reach - ra) / (rb - ra)
    scale = np.where(below, s / wb, (1.0 - s) / wa)
    sample = ng.groups_of(sub.scores, list(w * scale), list(sub.bandwidths))
    notes.update(audit_anchor="reweighted", audit_mass_below=s, audit_reached_miss=reach)
    return dataclasses.replace(ev, ng=sample), notes
