"""The state database: verdict + message in one transaction, idempotent ids, append-only audit."""

from __future__ import annotations

import sqlite3
import time

import pytest

from ngcal.daemon.messages import Outbound, Verdict, make_msg_id
from ngcal.daemon.store import Store, append_audit


def verdict(name: str, mtime_ns: int = 1) -> Verdict:
    mid = make_msg_id("dev", "cam", name, "00" * 32, mtime_ns)
    return Verdict(
        msg_id=mid,
        camera="cam",
        path=name,
        size=10,
        mtime_ns=mtime_ns,
        sha256="00" * 32,
        verdict="OK",
        reason=None,
        score=0.1,
        threshold=0.5,
        threshold_version=1,
        model_sha256="m",
        detected_at=time.time(),
        decided_at=time.time(),
    )


def test_msg_id_is_deterministic_and_changes_with_the_file_version():
    """Same file version -> same id; another mtime, sha256, path, camera or device -> another."""
    base = make_msg_id("d", "c", "a.png", "s", 1)
    assert base == make_msg_id("d", "c", "a.png", "s", 1)
    others = {
        make_msg_id("d", "c", "a.png", "s", 2),
        make_msg_id("d", "c", "a.png", "t", 1),
        make_msg_id("d", "c", "b.png", "s", 1),
        make_msg_id("d", "x", "a.png", "s", 1),
        make_msg_id("e", "c", "a.png", "s", 1),
    }
    assert base not in others and len(others) == 5


def test_verdict_and_message_commit_together_and_only_once(tmp_path):
    """record_verdicts writes verdict and outbox row atomically; a replayed verdict (same
    msg_id) adds no second message; a failing batch leaves neither."""
    store = Store(tmp_path)
    v = verdict("a.png")
    msg = Outbound("t/verdict", v.payload(), v.msg_id)
    assert store.record_verdicts([(v, msg)]) == 1
    assert store.record_verdicts([(v, msg)]) == 0
    assert store.outbox_stats()["backlog"] == 1
    assert store.is_known("cam", "a.png", 1, 10) and not store.is_known("cam", "a.png", 2, 10)
    bad = (verdict("b.png"), Outbound("t", None, "x"))  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.record_verdicts([(verdict("c.png"), msg), bad])
    assert store.query("SELECT count(*) FROM verdicts")[0][0] == 1  # c.png rolled back too
    rows = store.unsent(exclude=set(), limit=10)
    assert [r.msg_id for r in rows] == [v.msg_id]
    assert store.unsent(exclude={rows[0].id}, limit=10) == []
    store.mark_refused(rows[0].id, 0x87, "Not authorized", hold_s=60)
    assert store.unsent(exclude=set(), limit=10) == []
    assert store.outbox_stats()["refused"] == 1
    store.release_holds()
    store.mark_sent([rows[0].id])
    assert store.outbox_stats()["backlog"] == 0
    store.close()


def test_audit_is_append_only(tmp_path):
    """UPDATE and DELETE on the audit table are refused by triggers."""
    store = Store(tmp_path)
    with store.tx() as c:
        append_audit(c, "me", "test", {"x": 1})
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), store.tx() as c:
        c.execute("UPDATE audit SET actor='you'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"), store.tx() as c:
        c.execute("DELETE FROM audit")
    assert [r["actor"] for r in store.audit_rows()] == ["me"]
    store.close()
