"""Inbound commands: ``cmd/confirm``, ``cmd/recalibrate``, ``cmd/rollback``.

Each command is a JSON object with a ``request_id``; handling is idempotent by it. The
command's effect, its idempotency row and its ``cmd/ack`` message are committed in one
transaction, and only then is the inbound PUBLISH acknowledged to the broker (manual
ack), so a crash before the commit makes the broker redeliver the command and a crash
after it makes the replay answer ``duplicate``.

Poison never blocks the channel: every message is answered and PUBACKed. A failure that
would recur on redelivery (oversized, malformed or too deeply nested JSON, text that
cannot be stored such as a lone surrogate, an invalid field, an unknown image, any
non-transient error) is committed as a ``rejected`` ack naming the reason. Only a
transient error (SQLite busy, disk full) is retried, at most ``max_attempts`` times; then
the command is rejected and the ``command_failed`` alarm raised. (Mosquitto redelivers an
unacknowledged message only on reconnect, and stops sending after 20 in flight: an
unanswered message would hold one of those slots for the session's lifetime.)

A confirmation names a verdict by ``msg_id``, or an image by ``image_sha256``: a verdict
with that sha256, else a file with that sha256 in the recalibration intake folder, which
is scored then (a confirmed NG the daemon never saw).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ngcal.calibration.policy import Decision
from ngcal.core.errors import ImageError, NgcalError
from ngcal.core.files import sha256_file

from .clock import SYSTEM_CLOCK, Clock
from .link import Inbound
from .messages import AckStatus, Outbound, Topics, ack_message
from .recalibration import ThresholdKeeper
from .store import Store, add_command, add_confirmation, enqueue, is_transient

log = logging.getLogger(__name__)

#: commands are flat objects: deeper JSON is rejected before validation
MAX_DEPTH = 8
#: MQTT topic names: no wildcards, no control characters, not a ``$`` system topic
_TOPIC = r"^[^#+$\x00-\x1f\x7f][^#+\x00-\x1f\x7f]*$"


class CommandChannel(Protocol):
    """What the handler needs from the MQTT link: the inbound queue and the manual ack."""

    inbox: queue.SimpleQueue[Inbound]

    def ack(self, mid: int, qos: int) -> None: ...


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_: str | None = Field(default=None, alias="schema")
    request_id: str = Field(min_length=1, max_length=128)
    operator: str = Field(default="unknown", max_length=128)
    response_topic: str | None = Field(default=None, max_length=512, pattern=_TOPIC)


class ConfirmCmd(_Cmd):
    """Label a verdict (``msg_id``) or an image (``image_sha256``) NG or OK."""

    msg_id: str | None = Field(default=None, max_length=128)
    image_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    label: Literal["NG", "OK"]


class RecalibrateCmd(_Cmd):
    """Run the recalibration policy now."""

    dry_run: bool = False


class RollbackCmd(_Cmd):
    """Restore an earlier threshold version."""

    version: int = Field(ge=1)


_MODELS: dict[str, type[_Cmd]] = {
    "confirm": ConfirmCmd,
    "recalibrate": RecalibrateCmd,
    "rollback": RollbackCmd,
}


class CommandHandler:
    """Consumes ``link.inbox`` on its own thread."""

    def __init__(
        self,
        *,
        store: Store,
        link: CommandChannel,
        keeper: ThresholdKeeper,
        topics: Topics,
        max_bytes: int,
        intake_dir: Path | None,
        auto_recalibrate: bool,
        score_file: Callable[[str], float],
        on_commit: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
        max_attempts: int = 6,
    ) -> None:
        self.clock = clock
        self.max_attempts = max_attempts
        self.store = store
        self.link = link
        self.keeper = keeper
        self.topics = topics
        self.max_bytes = max_bytes
        self.intake_dir = intake_dir
        self.auto_recalibrate = auto_recalibrate
        self.score_file = score_file
        self._on_commit = on_commit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sha_cache: dict[tuple[str, int, int], str] = {}
        self.heartbeat = clock.monotonic()
        self.handled = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ngcal-commands", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = self.clock.monotonic()
            try:
                msg = self.link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            self.process(msg)

    def process(self, msg: Inbound) -> AckStatus | None:
        """Answer one message and PUBACK it; None only when stopped during a retry."""
        attempt = 0
        while True:
            attempt += 1
            try:
                status = self.handle(msg)
                break
            except Exception as e:  # noqa: BLE001 - classified: retried or answered
                if is_transient(e) and attempt < self.max_attempts:
                    log.warning(
                        "command on %s: transient failure (%s), attempt %d of %d",
                        msg.topic,
                        e,
                        attempt,
                        self.max_attempts,
                    )
                    if self._stop.is_set():
                        return None  # not acked: the broker redelivers it on reconnect
                    self.clock.sleep(min(0.25 * 2**attempt, 5.0))
                    continue
                status = self._give_up(msg, e, attempt)
                break
        self.heartbeat = self.clock.monotonic()
        self.link.ack(msg.mid, msg.qos)
        self.handled += 1
        self._on_commit()
        return status

    def _give_up(self, msg: Inbound, e: Exception, attempts: int) -> AckStatus:
        """Reject a command that failed for good; raise an alarm when that was transient."""
        if is_transient(e):
            reason = f"gave up after {attempts} transient failures: {e}"
            log.error("command on %s %s", msg.topic, reason)
        else:
            reason = f"internal error: {type(e).__name__}: {e}"
            log.exception("command on %s failed; rejected (would fail again)", msg.topic)
        reason = printable(reason)
        try:
            status = self._answer(msg, request_id_of(msg.payload), "rejected", reason)
        except Exception:  # noqa: BLE001 - PUBACK anyway: nothing may block the channel
            log.exception("cannot record the rejection of a command on %s", msg.topic)
            status = "rejected"
        if is_transient(e):
            try:
                self.store.raise_alarm("command_failed", reason[:200])
            except Exception:  # noqa: BLE001 - logged above already
                log.error("cannot raise the command_failed alarm")
        return status

    # ------------------------------------------------------------------ handling
    def handle(self, msg: Inbound) -> AckStatus:
        """Commit the command's effect and its ack; returns the ack status."""
        kind = self.topics.command_kind(msg.topic)
        if kind is None:  # not ours (never answer: an ack could feed back into a loop)
            log.warning("ignoring a message on %s (not a command topic)", msg.topic)
            return "rejected"
        if len(msg.payload) > self.max_bytes:
            return self._answer(
                msg, None, "rejected", f"oversized: {len(msg.payload)} bytes > {self.max_bytes}"
            )
        try:
            raw = json.loads(msg.payload)
        except RecursionError:
            return self._answer(msg, None, "rejected", "malformed JSON: nested too deeply")
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            return self._answer(msg, None, "rejected", f"malformed JSON: {printable(str(e))}")
        problem = json_problem(raw)
        if problem is not None:
            return self._answer(msg, None, "rejected", problem)
        rid = _valid_request_id(raw)
        try:
            cmd = _MODELS[kind].model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "<root>"
            return self._answer(
                msg,
                rid,
                "rejected",
                printable(f"invalid {kind}: {loc}: {first['msg']}"),
                record=kind,
            )
        if cmd.response_topic is not None and cmd.response_topic in self.topics.commands:
            return self._answer(
                msg, rid, "rejected", "response_topic is a command topic", record=kind
            )
        prior = self.store.command(cmd.request_id)
        if prior is not None:
            return self._answer(
                msg,
                cmd.request_id,
                "duplicate",
                f"already handled: {prior['status']}",
                original=prior["status"],
                response_topic=cmd.response_topic,
            )
        if isinstance(cmd, ConfirmCmd):
            return self._confirm(msg, cmd)
        if isinstance(cmd, RecalibrateCmd):
            d = self.keeper.recalibrate(
                actor=f"{cmd.operator} ({cmd.request_id})",
                dry_run=cmd.dry_run,
                on_commit=self._finisher(msg, cmd, kind),
            )
            return _decision_status(d)
        if isinstance(cmd, RollbackCmd):
            d = self.keeper.rollback(
                cmd.version,
                actor=f"{cmd.operator} ({cmd.request_id})",
                on_commit=self._finisher(msg, cmd, kind),
            )
            return _decision_status(d)
        raise AssertionError(kind)  # pragma: no cover - _MODELS covers every kind

    def _finisher(
        self, msg: Inbound, cmd: _Cmd, kind: str
    ) -> Callable[[sqlite3.Connection, Decision], None]:
        def finish(c: sqlite3.Connection, d: Decision) -> None:
            status = _decision_status(d)
            new = d.new_state.current
            self._write(
                c,
                msg,
                cmd.request_id,
                status,
                d.reason,
                kind=kind,
                payload=msg.payload,
                response_topic=cmd.response_topic,
                extra={"threshold_version": new.version, "threshold": new.value},
            )

        return finish

    def _confirm(self, msg: Inbound, cmd: ConfirmCmd) -> AckStatus:
        row = None
        if cmd.msg_id is not None:
            row = self.store.verdict_by_msg_id(cmd.msg_id)
            if row is None:
                return self._answer(
                    msg,
                    cmd.request_id,
                    "rejected",
                    f"unknown msg_id {cmd.msg_id}",
                    record="confirm",
                    response_topic=cmd.response_topic,
                )
            if cmd.image_sha256 is not None and row["sha256"] != cmd.image_sha256:
                return self._answer(
                    msg,
                    cmd.request_id,
                    "rejected",
                    "msg_id and image_sha256 disagree",
                    record="confirm",
                    response_topic=cmd.response_topic,
                )
        elif cmd.image_sha256 is not None:
            row = self.store.verdict_by_sha256(cmd.image_sha256)
        else:
            return self._answer(
                msg,
                cmd.request_id,
                "rejected",
                "give msg_id or image_sha256",
                record="confirm",
                response_topic=cmd.response_topic,
            )
        sha = row["sha256"] if row is not None else cmd.image_sha256
        score = row["score"] if row is not None else None
        source = "verdict"
        if score is None:
            try:
                score = self._score_intake(str(sha))
                source = "intake"
            except (ImageError, NgcalError, LookupError) as e:
                return self._answer(
                    msg,
                    cmd.request_id,
                    "rejected",
                    f"cannot score image: {e}",
                    record="confirm",
                    response_topic=cmd.response_topic,
                )
        with self.store.tx() as c:
            add_confirmation(
                c,
                cmd.request_id,
                msg_id=None if row is None else row["msg_id"],
                sha256=str(sha),
                label=cmd.label,
                score=float(score),
                operator=cmd.operator,
            )
            self._write(
                c,
                msg,
                cmd.request_id,
                "accepted",
                None,
                kind="confirm",
                payload=msg.payload,
                response_topic=cmd.response_topic,
                extra={"score": float(score), "source": source, "label": cmd.label},
            )
        log.info(
            "confirmed %s %s (score %.6g) by %s",
            sha[:12] if sha else "?",
            cmd.label,
            score,
            cmd.operator,
        )
        if self.auto_recalibrate:
            try:  # the confirmation is committed and acked whatever happens here
                self.keeper.recalibrate(actor=f"auto after {cmd.request_id}")
            except Exception:  # noqa: BLE001 - logged; the next confirmation retries
                log.exception("automatic recalibration after %s failed", cmd.request_id)
        return "accepted"

    def _score_intake(self, sha: str) -> float:
        if self.intake_dir is None or not self.intake_dir.is_dir():
            raise LookupError("no verdict with that sha256 and no intake folder configured")
        for p in sorted(self.intake_dir.iterdir()):
            if not p.is_file() or p.is_symlink() or p.name.startswith("."):
                continue
            st = p.stat()
            key = (p.name, st.st_mtime_ns, st.st_size)
            digest = self._sha_cache.get(key)
            if digest is None:
                digest = sha256_file(p)
                self._sha_cache[key] = digest
            if digest == sha:
                return self.score_file(str(p))
        raise LookupError(f"no verdict and no file in {self.intake_dir} with sha256 {sha[:12]}...")

    # ------------------------------------------------------------------ acks
    def _answer(
        self,
        msg: Inbound,
        rid: str | None,
        status: AckStatus,
        reason: str,
        *,
        record: str | None = None,
        original: str | None = None,
        response_topic: str | None = None,
    ) -> AckStatus:
        if status == "rejected":
            log.warning("command on %s rejected: %s", msg.topic, reason)
        extra: dict[str, Any] = {} if original is None else {"original_status": original}
        with self.store.tx() as c:
            self._write(
                c,
                msg,
                rid,
                status,
                reason,
                kind=record if rid else None,
                payload=msg.payload[:4096],
                response_topic=response_topic,
                extra=extra,
            )
        return status

    def _write(
        self,
        c: sqlite3.Connection,
        msg: Inbound,
        rid: str | None,
        status: AckStatus,
        reason: str | None,
        *,
        kind: str | None,
        payload: bytes,
        response_topic: str | None,
        extra: dict[str, Any],
    ) -> None:
        """Idempotency row (when ``kind``) and the ack message(s), in the caller's transaction."""
        if kind is not None and rid is not None:
            add_command(c, rid, kind, status, reason, payload.decode("utf-8", "replace"))
        ack = ack_message(
            self.topics, rid or f"mid-{msg.mid}-{time.time_ns()}", status, reason, **extra
        )
        enqueue(c, ack)
        extra_topics = {t for t in (response_topic, msg.response_topic) if t}
        for topic in extra_topics - {self.topics.ack, *self.topics.commands}:
            enqueue(c, Outbound(topic, ack.payload, ack.msg_id))


_OUTCOME_STATUS: dict[str, AckStatus] = {
    "applied": "applied",
    "dry_run": "accepted",
    "unchanged": "unchanged",
    "refused": "refused",
}


def _decision_status(d: Decision) -> AckStatus:
    """The ack status of a policy decision (its ``outcome`` field, never its reason text)."""
    return _OUTCOME_STATUS[d.outcome]


def _valid_request_id(raw: Any) -> str | None:
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def request_id_of(payload: bytes) -> str | None:
    """The command's ``request_id`` when it can be echoed safely in an ack, else None."""
    try:
        raw = json.loads(payload)
    except (RecursionError, ValueError):
        return None
    rid = _valid_request_id(raw)
    return rid if rid is not None and json_problem(rid) is None else None


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_problem(value: Any) -> str | None:
    """Why a parsed command cannot be handled (too deep, unstorable text), or None.

    Iterative, so a deep value cannot raise RecursionError here.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"malformed command: nested deeper than {MAX_DEPTH}"
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return f"unencodable text: {printable(v[:40])!r} is not valid UTF-8"
        elif isinstance(v, dict):
            stack.extend((k, depth + 1) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return None
