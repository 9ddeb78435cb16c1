"""The current threshold, and recalibration / rollback through ``ngcal.calibration.policy``.

The policy state (current threshold and every earlier version) lives in the state
database, written in the same transaction as the audit entry and the outbound
``recalibration`` event, so the three never disagree after a crash. After each commit the
state is also exported atomically as ``policy_state.json`` and ``thresholds.json`` (plus
``thresholds/v<N>.json``) in the state directory for operators and tools; the database
stays the source of truth. Readers take ``current`` without a lock: it is one reference,
swapped after the commit.

The evidence a recalibration rests on (``assemble_evidence``, a pure function): the
bundle's score sets (the normal and synthetic evidence the first threshold was calibrated
on), the confirmed real NG (the last label of an image wins), and the line's good parts:
the stream of recent scored verdicts minus the images confirmed NG. Confirmations are a
selected sample: confirmed OKs are false alarms, all above the threshold of the moment,
so pooled on their own they would read as a good-part population far above the real one
(and, from 30 of them, form a normal group of their own that the ``max`` rule obeys).
Inside the stream they keep their true share of the line. The stream counts unconfirmed
defects as good parts, at most about ``prevalence`` of it (the contamination bound),
which can only overstate the false-reject rate. Only the confirmations of verdicts drawn
at random for audit (``recalibration.audit_share`` of OK verdicts) are a fair sample of
passed parts, and they alone estimate the escape rate. ``stream_window: 0`` turns the
stream off: confirmed OKs are then the ``real_ok`` set, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ngcal.calibration.ng import jeffreys_interval
from ngcal.calibration.policy import Decision, PolicyConfig, PolicyState, recalibrate, rollback
from ngcal.core.bundle import Bundle, open_bundle, recover_install
from ngcal.core.errors import ArtifactError, ConfigError
from ngcal.core.files import atomic_write_json
from ngcal.core.scoresets import ScoreSet, Source
from ngcal.core.thresholds import Interval, OperatingPoint, ThresholdFile, thresholds_json

from .config import RecalibrationConfig
from .messages import RECAL_SCHEMA, Outbound, Topics
from .store import Store, append_audit, enqueue, put_meta

log = logging.getLogger(__name__)

STATE_KEY = "policy_state"
AUDIT_SALT_KEY = "audit_salt"

OnCommit = Callable[[sqlite3.Connection, Decision], None]


def policy_config(cfg: RecalibrationConfig, *, dry_run: bool | None = None) -> PolicyConfig:
    """The calibration library's PolicyConfig for this config section."""
    return PolicyConfig(
        min_real_ng=cfg.min_real_ng,
        min_real_ok=cfg.min_real_ok,
        max_step=cfg.max_step,
        hysteresis=cfg.hysteresis,
        dry_run=cfg.dry_run if dry_run is None else (dry_run or cfg.dry_run),
        mode=cfg.mode,
        target_fpr=cfg.target_fpr,
        confidence=cfg.confidence,
        operating_point=OperatingPoint(prevalence=cfg.prevalence, cost_ratio=cfg.cost_ratio),
        miss_rate=cfg.miss_rate,
    )


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
    """

    drawn: int
    checked: int
    escaped: int
    rate: Interval | None

    def to_json(self) -> dict[str, Any]:
        return {
            "drawn": self.drawn,
            "checked": self.checked,
            "escaped": self.escaped,
            "escape_rate": None if self.rate is None else self.rate.model_dump(),
        }


def escape_audit(
    confirmed: Mapping[str, Confirmation], *, drawn: int, level: float = 0.95
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
    return EscapeAudit(drawn=drawn, checked=n, escaped=k, rate=rate)


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
    level: float = 0.95,
) -> DeviceEvidence:
    """The device's evidence from the bundle, the confirmation rows and the verdict stream.

    Real NG/OK score sets that ship in the bundle are replaced by the confirmations (the
    daemon's own labels are the source of truth for this line). With a stream, ``real_ok``
    is the confirmed OKs plus the unlabelled verdicts (each image once); without one, the
    confirmed OKs alone.
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
        audit=escape_audit(latest, drawn=audit_drawn, level=level),
    )


def with_escape_notes(d: Decision, audit: EscapeAudit) -> Decision:
    """``d`` with the audited escape rate in the applied threshold's notes (when measured).

    The retained threshold then states the share of passed parts found defective by
    random audit (``escape_rate`` with ``escape_rate_low``/``_high`` at ``escape_level``
    from ``escape_checked`` checks): measured on this line, not estimated from look-alikes.
    """
    r = audit.rate
    if not d.applied or r is None:
        return d
    new = d.new_state.current
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


MANUAL_FLAG = "recalibration.accept_manual_thresholds"


def open_with_thresholds(path: Path, cfg: RecalibrationConfig) -> tuple[Bundle, str | None]:
    """Open the installed bundle; a thresholds.json ngcal did not write is refused in one
    line, unless ``accept_manual_thresholds`` is set: then the bundle opens and the second
    item says why the file is an operator override (None for a file ngcal wrote)."""
    recover_install(path)
    try:
        return open_bundle(path), None
    except ArtifactError as e:
        bundle = open_bundle(path, allow_unsigned_thresholds=True)  # other faults raise here
        if not cfg.accept_manual_thresholds:  # only the thresholds' provenance was refused
            raise ArtifactError(f"{e} (set {MANUAL_FLAG}: true to accept it)") from e
        return bundle, str(e)


class ThresholdKeeper:
    """Holds the current threshold; applies policy decisions atomically.

    ``manual_override`` (from :func:`open_with_thresholds`) marks the bundle's thresholds
    as an operator's file: starting from it is audited, announced as a ``manual_override``
    recalibration event and flagged in the retained threshold's notes.
    """

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        bundle: Bundle,
        cfg: RecalibrationConfig,
        topics: Topics,
        *,
        manual_override: str | None = None,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.bundle = bundle
        self.cfg = cfg
        self.topics = topics
        self.manual_override = manual_override
        self._lock = threading.Lock()  # serialises recalibrations, never held by readers
        self.state = self._load_state()
        salt = store.get_meta(AUDIT_SALT_KEY)
        if not isinstance(salt, str):
            salt = secrets.token_hex(16)
            store.set_meta(AUDIT_SALT_KEY, salt)
        self._audit_salt = salt
        self.on_change: Callable[[ThresholdFile], None] | None = None

    @property
    def current(self) -> ThresholdFile:
        """The threshold verdicts are decided with now."""
        return self.state.current

    def _load_state(self) -> PolicyState:
        raw = self.store.get_meta(STATE_KEY)
        model = self.bundle.model_sha256
        if raw is not None:
            st = PolicyState.from_json(raw)
            if not st.current.model_sha256 or st.current.model_sha256 == model:
                if self.manual_override is not None:
                    log.warning(
                        "bundle thresholds.json is an operator override (%s) but the state "
                        "database already holds threshold v%d for this model: that one is used",
                        self.manual_override,
                        st.current.version,
                    )
                self._export(st)
                return st
            log.warning(
                "stored threshold belongs to model %s..., bundle holds %s...; starting over "
                "from the bundle's thresholds",
                st.current.model_sha256[:12],
                model[:12],
            )
        if self.bundle.thresholds is None:
            raise ConfigError(
                f"{self.bundle.root}: bundle has no thresholds.json and the state database "
                "holds none for this model; run `ngcal calibrate` and export again"
            )
        first = self.bundle.thresholds
        if self.manual_override is not None:
            notes = {**first.notes, "manual_override": self.manual_override}
            first = first.model_copy(update={"notes": notes})
        st = PolicyState.initial(first)
        entry = {"version": first.version, "value": first.value, "model_sha256": model}
        with self.store.tx() as c:
            put_meta(c, STATE_KEY, st.to_json())
            if self.manual_override is None:
                append_audit(c, "ngcal daemon", "threshold_initial", entry)
            else:
                entry["reason"] = self.manual_override
                append_audit(c, "operator override", "threshold_manual_override", entry)
                enqueue(c, manual_override_event(self.topics, first, self.manual_override))
        if self.manual_override is not None:
            log.warning(
                "threshold v%d %.6g from a thresholds.json ngcal did not write, accepted by %s "
                "(%s); audited and published",
                first.version,
                first.value,
                MANUAL_FLAG,
                self.manual_override,
            )
        self._export(st)
        return st

    def _export(self, st: PolicyState) -> None:
        """Atomic file copies of the state for operators (the database is authoritative)."""
        cur = thresholds_json(st.current)
        atomic_write_json(self.state_dir / "policy_state.json", st.to_json())
        atomic_write_json(self.state_dir / "thresholds" / f"v{st.current.version}.json", cur)
        atomic_write_json(self.state_dir / "thresholds.json", cur)

    # ------------------------------------------------------------------ evidence
    def audit_draw(self, msg_id: str) -> bool:
        """Whether this OK verdict is drawn for audit (``recalibration.audit_share``)."""
        return audit_draw(self.cfg.audit_share, self._audit_salt, msg_id)

    def device_evidence(self) -> DeviceEvidence:
        """Bundle score sets, confirmations, the verdict stream and the audit tally."""
        model = self.bundle.model_sha256
        window = self.cfg.stream_window
        return assemble_evidence(
            self.bundle.scoresets(),
            self.store.confirmations(),
            self.store.recent_scores(model, window) if window else [],
            model_sha256=model,
            contamination_bound=self.cfg.prevalence,
            audit_drawn=self.store.audited_count(model),
            level=self.cfg.confidence,
        )

    def evidence(self) -> list[ScoreSet]:
        """The score sets the policy calibrates on (bundle + confirmed real NG/OK)."""
        return list(self.device_evidence().sets)

    # ------------------------------------------------------------------ decisions
    def recalibrate(
        self, *, actor: str, dry_run: bool | None = None, on_commit: OnCommit | None = None
    ) -> Decision:
        """Run the policy on the evidence; commit state, audit and event in one transaction.

        ``on_commit(connection, decision)`` runs inside that transaction (the command
        handler records its idempotency row and ack there).
        """
        with self._lock:
            pc = policy_config(self.cfg, dry_run=dry_run)
            ev = self.device_evidence()
            decision = with_escape_notes(
                recalibrate(self.state, list(ev.sets), pc, actor=actor), ev.audit
            )
            decision.audit["device_evidence"] = ev.summary()
            self._commit(decision, "recalibrate", on_commit)
            return decision

    def rollback(self, version: int, *, actor: str, on_commit: OnCommit | None = None) -> Decision:
        """Restore an earlier version as a new version (refused when unknown or current)."""
        with self._lock:
            decision = rollback(self.state, version, actor=actor)
            self._commit(decision, "rollback", on_commit)
            return decision

    def _commit(self, d: Decision, kind: str, on_commit: OnCommit | None) -> None:
        event = recalibration_event(self.topics, d, kind)
        with self.store.tx() as c:
            if d.applied:
                put_meta(c, STATE_KEY, d.new_state.to_json())
            append_audit(c, str(d.audit.get("actor", "")), kind, d.audit)
            enqueue(c, event)
            if on_commit is not None:
                on_commit(c, d)
        if d.applied:
            self.state = d.new_state
            self._export(d.new_state)
            log.info(  # routine: an operator asked, or the guard rails allowed it
                "threshold %s: v%d %.6g -> v%d %.6g (%s)",
                kind,
                d.old.version,
                d.old.value,
                d.new_state.current.version,
                d.new_state.current.value,
                d.reason,
            )
            if self.on_change is not None:
                self.on_change(d.new_state.current)
        else:
            log.info("threshold %s not applied: %s", kind, d.reason)


def recalibration_event(topics: Topics, d: Decision, kind: str) -> Outbound:
    """The ``recalibration`` event: old/new threshold, evidence, applied or refused and why."""
    new = d.new_state.current if d.applied else None
    body = {
        "schema": RECAL_SCHEMA,
        "action": kind,
        "applied": d.applied,
        "reason": d.reason,
        "old": d.old.model_dump(mode="json", by_alias=True),
        "proposed": None
        if d.proposed is None
        else d.proposed.model_dump(mode="json", by_alias=True),
        "new": None if new is None else new.model_dump(mode="json", by_alias=True),
        "audit": d.audit,
    }
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    mid = hashlib.sha256(payload).hexdigest()[:32]
    return Outbound(topics.recalibration, payload, mid)


def manual_override_event(topics: Topics, t: ThresholdFile, reason: str) -> Outbound:
    """The ``recalibration`` event announcing a threshold taken from an operator's file."""
    dumped = t.model_dump(mode="json", by_alias=True)
    body = {
        "schema": RECAL_SCHEMA,
        "action": "manual_override",
        "applied": True,
        "reason": f"thresholds.json not written by ngcal, accepted by {MANUAL_FLAG}: {reason}",
        "old": None,
        "proposed": dumped,
        "new": dumped,
        "audit": {"actor": "operator override", "outcome": "applied"},
    }
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    return Outbound(topics.recalibration, payload, hashlib.sha256(payload).hexdigest()[:32])


def threshold_payload(t: ThresholdFile) -> bytes:
    """Retained ``threshold`` message: value, version, method, evidence, expected rates."""
    return json.dumps(t.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()
