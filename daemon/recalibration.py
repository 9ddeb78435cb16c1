"""The current threshold, and recalibration / rollback through ``ngcal.calibration.policy``.

The policy state (current threshold and every earlier version) lives in the state
database, written in the same transaction as the audit entry and the outbound
``recalibration`` event, so the three never disagree after a crash. After each commit the
state is also exported atomically as ``policy_state.json`` and ``thresholds.json`` (plus
``thresholds/v<N>.json``) in the state directory for operators and tools; the database
stays the source of truth. Readers take ``current`` without a lock: it is one reference,
swapped after the commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ngcal.calibration.policy import Decision, PolicyConfig, PolicyState, recalibrate, rollback
from ngcal.core.bundle import Bundle
from ngcal.core.errors import ConfigError
from ngcal.core.files import atomic_write_json
from ngcal.core.scoresets import ScoreSet, Source
from ngcal.core.thresholds import OperatingPoint, ThresholdFile

from .config import RecalibrationConfig
from .messages import RECAL_SCHEMA, Outbound, Topics
from .store import Store, append_audit, enqueue, put_meta

log = logging.getLogger(__name__)

STATE_KEY = "policy_state"

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


class ThresholdKeeper:
    """Holds the current threshold; applies policy decisions atomically."""

    def __init__(
        self,
        store: Store,
        state_dir: Path,
        bundle: Bundle,
        cfg: RecalibrationConfig,
        topics: Topics,
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.bundle = bundle
        self.cfg = cfg
        self.topics = topics
        self._lock = threading.Lock()  # serialises recalibrations, never held by readers
        self.state = self._load_state()
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
        st = PolicyState.initial(self.bundle.thresholds)
        with self.store.tx() as c:
            put_meta(c, STATE_KEY, st.to_json())
            append_audit(
                c,
                "ngcal daemon",
                "threshold_initial",
                {"version": st.current.version, "value": st.current.value, "model_sha256": model},
            )
        self._export(st)
        return st

    def _export(self, st: PolicyState) -> None:
        """Atomic file copies of the state for operators (the database is authoritative)."""
        cur = st.current.model_dump(mode="json", by_alias=True)
        atomic_write_json(self.state_dir / "policy_state.json", st.to_json())
        atomic_write_json(self.state_dir / "thresholds" / f"v{st.current.version}.json", cur)
        atomic_write_json(self.state_dir / "thresholds.json", cur)

    # ------------------------------------------------------------------ evidence
    def evidence(self) -> list[ScoreSet]:
        """The bundle's score sets plus ``real_ng``/``real_ok`` from confirmations."""
        sets = [s for s in self.bundle.scoresets() if s.source not in ("real_ng", "real_ok")]
        latest: dict[str, tuple[str, float]] = {}
        for row in self.store.confirmations():  # ordered by time: the last label wins
            latest[row["sha256"]] = (row["label"], float(row["score"]))
        model = self.bundle.model_sha256
        pairs: tuple[tuple[Source, str], ...] = (("real_ng", "NG"), ("real_ok", "OK"))
        for source, label in pairs:
            items = [(k, s) for k, (lab, s) in sorted(latest.items()) if lab == label]
            if items:
                sets.append(
                    ScoreSet(
                        source=source,
                        scores=np.asarray([s for _, s in items]),
                        item_ids=tuple(k for k, _ in items),
                        model_sha256=model,
                    )
                )
        return sets

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
            decision = recalibrate(self.state, self.evidence(), pc, actor=actor)
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
            log.warning(
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


def threshold_payload(t: ThresholdFile) -> bytes:
    """Retained ``threshold`` message: value, version, method, evidence, expected rates."""
    return json.dumps(t.model_dump(mode="json", by_alias=True), separators=(",", ":")).encode()
