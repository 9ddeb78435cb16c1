"""The current threshold, and recalibration / rollback through ``ngcal.calibration.policy``.

The policy state (current threshold and every earlier version) lives in the state
database, written in the same transaction as the audit entry and the outbound
``recalibration`` event, so the three never disagree after a crash. After each commit the
state is also exported atomically as ``policy_state.json`` and ``thresholds.json`` (plus
``thresholds/v<N>.json``) in the state directory for operators and tools; the database
stays the source of truth. Readers take ``current`` without a lock: it is one reference,
swapped after the commit.

The evidence it rests on is assembled in ``evidence.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from ngcal.calibration.policy import Decision, PolicyConfig, PolicyState, recalibrate, rollback
from ngcal.core.bundle import Bundle, open_bundle, recover_install
from ngcal.core.errors import ArtifactError, ConfigError
from ngcal.core.files import atomic_write_json
from ngcal.core.scoresets import ScoreSet
from ngcal.core.thresholds import OperatingPoint, ThresholdFile, thresholds_json

from .config import RecalibrationConfig
from .evidence import (
    DeviceEvidence,
    assemble_evidence,
    audit_anchor,
    audit_draw,
    with_escape_notes,
)
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
        gain_level=cfg.gain_level,
    )


MANUAL_FLAG = "recalibration.accept_manual_thresholds"


def open_with_thresholds(path: Path, cfg: RecalibrationConfig) -> tuple[Bundle, str | None]:
    """Open the installed bundle, refusing a thresholds.json ngcal did not write.

    The refusal is one line naming the override flag. With ``accept_manual_thresholds``
    the bundle opens and the second item says why the file is an operator override (None
    for a file ngcal wrote).
    """
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
            tally=self.store.pass_tally(model),
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
            anchor = audit_anchor(ev.audit, self.state.current.value)
            decision = with_escape_notes(
                recalibrate(self.state, list(ev.sets), pc, actor=actor, audit=anchor), ev.audit
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
