"""What a recalibration on the device rests on, and the audit draw: pure functions.

``assemble_evidence``: the bundle's score sets (the normal and synthetic evidence the
first threshold was calibrated on), the confirmed real NG (the last label of an image
wins), and the line's good parts: the stream of recent scored verdicts minus the images
confirmed NG. Confirmations are a selected sample: confirmed OKs are false alarms, all
above the threshold of the moment, so pooled on their own they would read as a good-part
population far above the real one (and, from 30 of them, form a normal group of their own
that the ``max`` rule obeys). Inside the stream they keep their true share of the line.
The stream counts unconfirmed defects as good parts, at most about ``prevalence`` of it
(the contamination bound), which can only overstate the false-reject rate.
``stream_window: 0`` turns the stream off: confirmed OKs are then the ``real_ok`` set.

``audit_draw`` picks ``recalibration.audit_share`` of OK verdicts at random for a person
to check; only those checks are a fair sample of passed parts, and ``escape_audit``
estimates the escape rate from them alone (decision record 0600).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ngcal.calibration.audit import AuditAnchor
from ngcal.calibration.ng import jeffreys_interval
from ngcal.calibration.policy import Decision, PolicyState
from ngcal.calibration.statements import audit_miss_rate, headline
from ngcal.core.scoresets import ScoreSet, Source
from ngcal.core.thresholds import Interval


@dataclass(frozen=True)
class Confirmation:
    """An operator's latest label of one image (``audited``: it labels an audit draw)."""

    sha256: str
    label: str
    score: float
    audited: bool


def latest_confirmations(rows: Iterable[Mapping[str, Any]]) -> dict[str, Confirmation]:
    """The last label per image from ``Store.confirmations()`` rows (oldest first)."""
    out: dict[str, Confirmation] = {}
    for row in rows:
        sha = str(row["sha256"])
        out[sha] = Confirmation(
            sha, str(row["label"]), float(row["score"]), bool(row.get("audited", 0))
        )
    return out


@dataclass(frozen=True)
class EscapeAudit:
    """Audit draws and what their checks found: the unbiased escape-rate estimate.

    ``drawn`` OK verdicts were marked for audit, ``checked`` of them were confirmed and
    ``escaped`` were confirmed NG; ``rate`` is escaped/checked with a Jeffreys interval
    (None before the first check). It is the share of passed parts that are defective.
    ``passed`` OK verdicts and ``caught`` NG verdicts confirmed NG over the same verdicts
    turn it into the line's miss rate (:func:`ngcal.calibration.statements.audit_miss_rate`).
    """

    drawn: int
    checked: int
    escaped: int
    rate: Interval | None
    passed: int = 0
    caught: int = 0

    def miss_rate(self) -> Interval | None:
        """The line's miss rate with its interval, from these counts; None before the
        first check (:func:`ngcal.calibration.statements.audit_miss_rate`)."""
        if self.rate is None:
            return None
        return audit_miss_rate(
            escaped=self.escaped,
            checked=self.checked,
            passed=self.passed,
            caught=self.caught,
            level=self.rate.level,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able counts and the rate (null before the first check)."""
        return {
            "drawn": self.drawn,
            "checked": self.checked,
            "escaped": self.escaped,
            "escape_rate": None if self.rate is None else self.rate.model_dump(),
            "passed": self.passed,
            "caught": self.caught,
        }


def escape_audit(
    confirmed: Mapping[str, Confirmation],
    *,
    drawn: int,
    level: float = 0.95,
    passed: int = 0,
    caught: int = 0,
) -> EscapeAudit:
    """Tally the audited confirmations into an escape rate with an interval at ``level``."""
    checked = [c for c in confirmed.values() if c.audited]
    n, k = len(checked), sum(c.label == "NG" for c in checked)
    rate = None
    if n:
        low, high = jeffreys_interval(k / n, float(n), level)
        rate = Interval(
            value=k / n,
            low=low,
            high=high,
            level=level,
            kind="interval",
            basis=f"{n} audited OK verdicts checked by a person",
            n=float(n),
        )
    return EscapeAudit(drawn=drawn, checked=n, escaped=k, rate=rate, passed=passed, caught=caught)


@dataclass(frozen=True)
class DeviceEvidence:
    """What a recalibration on the device rests on (see the module docstring).

    ``sets``: the bundle's normal and synthetic score sets, ``real_ng`` from confirmations
    and ``real_ok``: the line's good parts (the stream without confirmed NG, or the
    confirmed OKs alone when the stream is off). ``stream``: scores of recent verdicts
    nobody labelled (at most about ``contamination_bound`` of them defective). ``audit``:
    the escape-rate estimate from audit draws.
    """

    sets: tuple[ScoreSet, ...]
    stream: np.ndarray
    contamination_bound: float
    audit: EscapeAudit

    def summary(self) -> dict[str, Any]:
        """Counts per source, the stream and the audit, for events and the audit log."""
        counts: dict[str, int] = {}
        for st in self.sets:
            counts[st.source] = counts.get(st.source, 0) + len(st)
        return {
            "counts": dict(sorted(counts.items())),
            "stream": {"n": int(self.stream.size), "contamination_bound": self.contamination_bound},
            "escape_audit": self.audit.to_json(),
        }


def assemble_evidence(
    bundle_sets: Sequence[ScoreSet],
    confirmations: Iterable[Mapping[str, Any]],
    stream: Sequence[tuple[str, float]],
    *,
    model_sha256: str,
    contamination_bound: float,
    audit_drawn: int = 0,
    tally: tuple[int, int] = (0, 0),
    level: float = 0.95,
) -> DeviceEvidence:
    """The device's evidence from the bundle, the confirmation rows and the verdict stream.

    Real NG/OK score sets that ship in the bundle are replaced by the confirmations (the
    daemon's own labels are the source of truth for this line). With a stream, ``real_ok``
    is the confirmed OKs plus the unlabelled verdicts (each image once); without one, the
    confirmed OKs alone. ``tally``: (OK verdicts, NG verdicts confirmed NG) of this model,
    for the audit's miss rate.
    """
    sets = [s for s in bundle_sets if s.source not in ("real_ng", "real_ok")]
    latest = latest_confirmations(confirmations)
    unlabelled = [(sha, x) for sha, x in stream if sha not in latest]
    ok = [(k, c.score) for k, c in latest.items() if c.label == "OK"]
    groups: tuple[tuple[Source, list[tuple[str, float]]], ...] = (
        ("real_ng", [(k, c.score) for k, c in latest.items() if c.label == "NG"]),
        ("real_ok", ok + unlabelled if stream else ok),
    )
    for source, items in groups:
        if items:
            meta: dict[str, Any] = {}
            if source == "real_ok" and stream:
                meta = {
                    "confirmed_ok": len(ok),
                    "unlabelled_verdicts": len(unlabelled),
                    "contamination_bound": contamination_bound,
                }
            sets.append(
                ScoreSet(
                    source=source,
                    scores=np.asarray([x for _, x in items], dtype=np.float64),
                    item_ids=tuple(k for k, _ in items),
                    model_sha256=model_sha256,
                    meta=meta,
                )
            )
    return DeviceEvidence(
        sets=tuple(sets),
        stream=np.asarray([x for _, x in unlabelled], dtype=np.float64),
        contamination_bound=contamination_bound,
        audit=escape_audit(
            latest, drawn=audit_drawn, level=level, passed=tally[0], caught=tally[1]
        ),
    )


def audit_anchor(audit: EscapeAudit, threshold: float) -> AuditAnchor | None:
    """The audit's miss rate at ``threshold`` (the one in force) for the policy, or None.

    None before the first audit check. The tally spans every verdict of this model, so
    after a move the figure mixes the thresholds that were in force (decision 0304).
    """
    miss = audit.miss_rate()
    if miss is None:
        return None
    return AuditAnchor(threshold=threshold, miss=miss, escaped=audit.escaped)


def with_escape_notes(d: Decision, audit: EscapeAudit) -> Decision:
    """``d`` with what random audits measured, in the applied threshold (when measured).

    The retained threshold then states the share of passed parts found defective by
    random audit (``escape_rate`` with ``escape_rate_low``/``_high`` at ``escape_level``
    from ``escape_checked`` checks) and, as ``miss_rate_by_source["audit"]``, the line's
    miss rate with its interval, which its ``expected_fnr`` then states (the audit is the
    one unbiased sample of passed parts; :func:`ngcal.calibration.statements.headline`).
    """
    r = audit.rate
    if not d.applied or r is None:
        return d
    new = d.new_state.current
    miss = audit.miss_rate()
    if miss is not None:
        by_source = {**new.miss_rate_by_source, "audit": miss}
        fnr = miss if new.expected_fnr is None else headline(by_source, new.expected_fnr)
        new = new.model_copy(update={"miss_rate_by_source": by_source, "expected_fnr": fnr})
    notes = {
        **new.notes,
        "escape_rate": r.value,
        "escape_rate_low": r.low,
        "escape_rate_high": r.high,
        "escape_level": r.level,
        "escape_checked": audit.checked,
    }
    new = new.model_copy(update={"notes": notes})
    state = PolicyState(current=new, history=(*d.new_state.history[:-1], new))
    return dataclasses.replace(d, new_state=state)


def audit_draw(share: float, salt: str, msg_id: str) -> bool:
    """True for a share ``share`` of verdict ids, uniformly and independently of the score.

    A keyed hash of the verdict's id, so the same file version is always drawn the same way
    (a re-scored file keeps its flag) and nobody without the device's salt can predict it.
    """
    if share <= 0.0:
        return False
    h = hashlib.sha256(f"{salt}\x1f{msg_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < share
