"""The daemon's state database: one SQLite file in WAL mode.

Tables: ``verdicts`` (every decision, keyed by msg_id), ``outbox`` (messages not yet
PUBACKed; a row is deleted on a successful PUBACK, so an empty outbox means everything
arrived), ``skipped`` (files refused without a verdict), ``commands`` (idempotency by
request_id), ``confirmations`` (operator labels with scores), ``audit`` (append-only:
triggers refuse UPDATE and DELETE) and ``alarms``.

Durability: a verdict and its outbound message are written in one transaction. With
``synchronous=NORMAL`` a power cut may roll back the last commits; that loses nothing,
because an uncommitted verdict also leaves its file unmarked, and the reconciliation scan
scores it again under the same deterministic msg_id. Each thread gets its own connection.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngcal.core.errors import ArtifactError

from .messages import Outbound, Verdict

DB_NAME = "state.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    msg_id TEXT PRIMARY KEY, camera TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT,
    score REAL, threshold REAL, threshold_version INTEGER, model_sha256 TEXT NOT NULL,
    detected_at REAL NOT NULL, decided_at REAL NOT NULL, audit INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS verdicts_file ON verdicts (camera, path, mtime_ns, size);
CREATE INDEX IF NOT EXISTS verdicts_sha ON verdicts (sha256);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts (decided_at);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, retain INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_rc INTEGER, last_error TEXT,
    hold_until REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS skipped (
    camera TEXT NOT NULL, path TEXT NOT NULL, mtime_ns INTEGER NOT NULL, reason TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (camera, path, mtime_ns));
CREATE TABLE IF NOT EXISTS commands (
    request_id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, reason TEXT,
    payload TEXT NOT NULL, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS confirmations (
    request_id TEXT PRIMARY KEY, msg_id TEXT, sha256 TEXT NOT NULL, label TEXT NOT NULL,
    score REAL NOT NULL, operator TEXT NOT NULL, at REAL NOT NULL,
    audited INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
    kind TEXT NOT NULL, entry TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TABLE IF NOT EXISTS alarms (
    kind TEXT NOT NULL, detail TEXT NOT NULL, raised_at REAL NOT NULL, count INTEGER NOT NULL,
    cleared_at REAL, PRIMARY KEY (kind, detail));
"""

#: columns added after the first release: (table, column, declaration); added at open
_ADDED_COLUMNS = (
    ("verdicts", "audit", "INTEGER NOT NULL DEFAULT 0"),
    ("confirmations", "audited", "INTEGER NOT NULL DEFAULT 0"),
)


@dataclass(frozen=True)
class OutboxRow:
    """One unsent message."""

    id: int
    msg_id: str
    topic: str
    payload: bytes
    retain: bool
    attempts: int


class Store:
    """Thread-safe access to ``state.db`` (one connection per thread)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / DB_NAME
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"{self.path.parent}: cannot create state dir ({e})") from e
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn().executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        self._add_columns()

    def _add_columns(self) -> None:
        """Bring a database written by an earlier release up to the current columns."""
        with self.tx() as c:
            for table, column, decl in _ADDED_COLUMNS:
                have = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def _conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
                c.execute("PRAGMA busy_timeout=30000")
            except sqlite3.Error as e:
                raise ArtifactError(f"{self.path}: cannot open state database ({e})") from e
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error)."""
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a read-only query."""
        return list(self._conn().execute(sql, tuple(args)).fetchall())

    def close(self) -> None:
        """Close every connection (call once the worker threads have stopped)."""
        with self._lock:
            for c in self._all:
                with suppress(sqlite3.Error):
                    c.close()
            self._all.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ verdicts
    def record_verdicts(self, items: Sequence[tuple[Verdict, Outbound]]) -> int:
        """Insert verdicts and their messages in ONE transaction; returns how many were new."""
        new = 0
        with self.tx() as c:
            for v, msg in items:
                cur = c.execute(
                    "INSERT OR IGNORE INTO verdicts (msg_id, camera, path, size, mtime_ns, "
                    "sha256, verdict, reason, score, threshold, threshold_version, "
                    "model_sha256, detected_at, decided_at, audit) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        v.msg_id,
                        v.camera,
                        v.path,
                        v.size,
                        v.mtime_ns,
                        v.sha256,
                        v.verdict,
                        v.reason,
                        v.score,
                        v.threshold,
                        v.threshold_version,
                        v.model_sha256,
                        v.detected_at,
                        v.decided_at,
                        int(v.audit),
                    ),
                )
                if cur.rowcount:
                    new += 1
                    enqueue(c, msg)
        return new

    def is_known(self, camera: str, path: str, mtime_ns: int, size: int) -> bool:
        """True where this file version already has a verdict or was skipped."""
        c = self._conn()
        if c.execute(
            "SELECT 1 FROM verdicts WHERE camera=? AND path=? AND mtime_ns=? AND size=? LIMIT 1",
            (camera, path, mtime_ns, size),
        ).fetchone():
            return True
        return bool(
            c.execute(
                "SELECT 1 FROM skipped WHERE camera=? AND path=? AND mtime_ns=?",
                (camera, path, mtime_ns),
            ).fetchone()
        )

    def record_skip(self, camera: str, path: str, mtime_ns: int, reason: str) -> None:
        """Remember a refused file version so later scans do not log it again."""
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO skipped VALUES (?,?,?,?,?)",
                (camera, path, mtime_ns, reason, time.time()),
            )

    def verdict_by_msg_id(self, msg_id: str) -> dict[str, Any] | None:
        rows = self._dicts("SELECT * FROM verdicts WHERE msg_id=?", (msg_id,))
        return rows[0] if rows else None

    def verdict_by_sha256(self, sha256: str) -> dict[str, Any] | None:
        rows = self._dicts(
            "SELECT * FROM verdicts WHERE sha256=? AND score IS NOT NULL "
            "ORDER BY decided_at DESC LIMIT 1",
            (sha256,),
        )
        return rows[0] if rows else None

    def last_verdicts(self, n: int = 10) -> list[dict[str, Any]]:
        return self._dicts("SELECT * FROM verdicts ORDER BY decided_at DESC LIMIT ?", (n,))

    def verdict_counts(self) -> dict[str, int]:
        return {
            k: int(v)
            for k, v in self.query("SELECT verdict, count(*) FROM verdicts GROUP BY verdict")
        }

    def _dicts(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._conn().execute(sql, tuple(args))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    # ------------------------------------------------------------------ outbox
    def unsent(self, *, exclude: set[int], limit: int, now: float | None = None) -> list[OutboxRow]:
        """Oldest unsent rows not in flight and not on hold."""
        now = time.time() if now is None else now
        rows = self.query(
            "SELECT id, msg_id, topic, payload, retain, attempts FROM outbox "
            "WHERE hold_until <= ? ORDER BY id LIMIT ?",
            (now, limit + len(exclude)),
        )
        out = [
            OutboxRow(r[0], r[1], r[2], bytes(r[3]), bool(r[4]), r[5])
            for r in rows
            if r[0] not in exclude
        ]
        return out[:limit]

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Delete PUBACKed rows."""
        if not ids:
            return
        with self.tx() as c:
            c.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])

    def mark_refused(self, row_id: int, rc: int, reason: str, hold_s: float) -> None:
        """Keep a row the broker refused (reason code >= 0x80) unsent, on hold for ``hold_s``."""
        with self.tx() as c:
            c.execute(
                "UPDATE outbox SET attempts=attempts+1, last_rc=?, last_error=?, hold_until=? "
                "WHERE id=?",
                (rc, reason, time.time() + hold_s, row_id),
            )

    def release_holds(self) -> None:
        """Make held rows eligible again (after a reconnect)."""
        with self.tx() as c:
            c.execute("UPDATE outbox SET hold_until=0 WHERE hold_until>0")

    def outbox_stats(self) -> dict[str, Any]:
        """Backlog, refused rows and the age of the oldest unsent message in seconds."""
        n, oldest = self.query("SELECT count(*), min(created_at) FROM outbox")[0]
        refused = self.query("SELECT count(*) FROM outbox WHERE last_rc >= 128")[0][0]
        age = None if oldest is None else round(time.time() - oldest, 3)
        return {"backlog": int(n), "refused": int(refused), "oldest_age_s": age}

    # ------------------------------------------------------------------ commands, audit
    def command(self, request_id: str) -> dict[str, Any] | None:
        rows = self._dicts("SELECT * FROM commands WHERE request_id=?", (request_id,))
        return rows[0] if rows else None

    def audit_rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return self._dicts("SELECT * FROM audit ORDER BY id")
        return self._dicts("SELECT * FROM audit WHERE kind=? ORDER BY id", (kind,))

    def confirmations(self) -> list[dict[str, Any]]:
        """Every operator label, oldest first (``audited``: it labels an audit-drawn verdict)."""
        return self._dicts("SELECT * FROM confirmations ORDER BY at, rowid")

    def recent_scores(self, model_sha256: str, limit: int) -> list[tuple[str, float]]:
        """(sha256, score) of the ``limit`` most recent scored verdicts of this model.

        The stream of parts as the line sends them (OK and NG verdicts alike): normal
        evidence contaminated by the line's defects, which confirmations label.
        """
        rows = self.query(
            "SELECT sha256, score FROM verdicts WHERE score IS NOT NULL AND model_sha256=? "
            "ORDER BY decided_at DESC, rowid DESC LIMIT ?",
            (model_sha256, int(limit)),
        )
        return [(str(s), float(x)) for s, x in rows]

    def pass_tally(self, model_sha256: str) -> tuple[int, int]:
        """(OK verdicts, NG verdicts an operator confirmed NG) of this model: the passed and
        caught parts the audited escape rate turns into a miss rate."""
        passed = self.query(
            "SELECT count(*) FROM verdicts WHERE verdict='OK' AND model_sha256=?",
            (model_sha256,),
        )[0][0]
        caught = self.query(
            "SELECT count(DISTINCT v.msg_id) FROM verdicts v JOIN confirmations c "
            "ON c.msg_id = v.msg_id WHERE v.verdict='NG' AND c.label='NG' AND v.model_sha256=?",
            (model_sha256,),
        )[0][0]
        return int(passed), int(caught)

    def audited_count(self, model_sha256: str) -> int:
        """How many verdicts of this model were drawn for audit (marked ``audit: true``)."""
        return int(
            self.query(
                "SELECT count(*) FROM verdicts WHERE audit=1 AND model_sha256=?", (model_sha256,)
            )[0][0]
        )

    # ------------------------------------------------------------------ alarms
    def raise_alarm(self, kind: str, detail: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO alarms VALUES (?,?,?,1,NULL) ON CONFLICT(kind, detail) DO UPDATE "
                "SET count=count+1, cleared_at=NULL",
                (kind, detail, time.time()),
            )

    def clear_alarms(self, kind: str) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE alarms SET cleared_at=? WHERE kind=? AND cleared_at IS NULL",
                (time.time(), kind),
            )

    def active_alarms(self) -> list[dict[str, Any]]:
        return self._dicts(
            "SELECT kind, detail, raised_at, count FROM alarms "
            "WHERE cleared_at IS NULL ORDER BY raised_at"
        )

    # ------------------------------------------------------------------ meta
    def set_meta(self, key: str, value: Any) -> None:
        with self.tx() as c:
            put_meta(c, key, value)

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default


def enqueue(c: sqlite3.Connection, msg: Outbound) -> None:
    """Add ``msg`` to the outbox inside the caller's transaction."""
    c.execute(
        "INSERT INTO outbox (msg_id, topic, payload, retain, created_at) VALUES (?,?,?,?,?)",
        (msg.msg_id, msg.topic, msg.payload, int(msg.retain), time.time()),
    )


def append_audit(c: sqlite3.Connection, actor: str, kind: str, entry: dict[str, Any]) -> None:
    """Append one audit entry inside the caller's transaction."""
    c.execute(
        "INSERT INTO audit (at, actor, kind, entry) VALUES (?,?,?,?)",
        (time.time(), actor, kind, json.dumps(entry, default=str, sort_keys=True)),
    )


def put_meta(c: sqlite3.Connection, key: str, value: Any) -> None:
    """Set one ``meta`` key (a JSON value) inside the caller's transaction."""
    c.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value)))


def add_command(
    c: sqlite3.Connection,
    request_id: str,
    kind: str,
    status: str,
    reason: str | None,
    payload: str,
) -> None:
    """Record a handled command (idempotency by ``request_id``; a replay keeps the first)."""
    c.execute(
        "INSERT OR IGNORE INTO commands VALUES (?,?,?,?,?,?)",
        (request_id, kind, status, reason, payload, time.time()),
    )


def add_confirmation(
    c: sqlite3.Connection,
    request_id: str,
    *,
    msg_id: str | None,
    sha256: str,
    label: str,
    score: float,
    operator: str,
) -> None:
    """Record an operator's label of one image with its score, in the caller's transaction.

    The label is recorded as ``audited`` when it names a verdict drawn for audit: those
    labels are a random sample of passed parts (the unbiased escape-rate estimate).
    """
    c.execute(
        "INSERT INTO confirmations (request_id, msg_id, sha256, label, score, operator, at, "
        "audited) VALUES (?,?,?,?,?,?,?, COALESCE((SELECT audit FROM verdicts WHERE msg_id=?), 0))",
        (request_id, msg_id, sha256, label, float(score), operator, time.time(), msg_id),
    )


def is_transient(e: BaseException) -> bool:
    """True for errors that pass by themselves: SQLite busy/locked, disk or database full.

    Everything else (constraint and encoding errors, bugs) would fail again on a retry.
    """
    if isinstance(e, sqlite3.OperationalError):
        text = str(e).lower()
        return any(k in text for k in ("locked", "busy", "disk is full", "database or disk"))
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
