"""Poison commands are answered and PUBACKed, never retried forever (fake channel and clock,
real SQLite store and threshold keeper). The real-broker versions are in
``test_command_channel``."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeChannel, FakeClock, inbound

from ngcal.core.bundle import open_bundle
from ngcal.daemon import commands as commands_mod
from ngcal.daemon.commands import CommandHandler
from ngcal.daemon.config import RecalibrationConfig
from ngcal.daemon.messages import Topics
from ngcal.daemon.recalibration import ThresholdKeeper
from ngcal.daemon.store import Store

TOPICS = Topics("ngcal", "dev1")
ROLLBACK = "ngcal/dev1/cmd/rollback"
CONFIRM = "ngcal/dev1/cmd/confirm"


@pytest.fixture
def handler(tmp_path: Path, tiny_bundle: Path) -> Any:
    store = Store(tmp_path / "state")
    keeper = ThresholdKeeper(
        store, tmp_path / "state", open_bundle(tiny_bundle), RecalibrationConfig(), TOPICS
    )
    h = CommandHandler(
        store=store,
        link=FakeChannel(),
        keeper=keeper,
        topics=TOPICS,
        max_bytes=65536,
        intake_dir=None,
        auto_recalibrate=False,
        score_file=lambda p: 0.0,
        on_commit=lambda: None,
        clock=FakeClock(),
        max_attempts=4,
    )
    yield h
    store.close()


def acks(h: CommandHandler) -> list[dict[str, Any]]:
    rows = h.store.query("SELECT payload FROM outbox WHERE topic=? ORDER BY id", (TOPICS.ack,))
    return [json.loads(r[0]) for r in rows]


POISON = [
    b"[" * 1500 + b"]" * 1500,  # RecursionError in json.loads
    b'{"request_id": "\\ud800", "version": 1}',  # lone surrogate: cannot be stored
    b'{"request_id": "ok-id", "operator": "\\udfff", "version": 1}',
    b'{"request_id": "x", "version": 1, "response_topic": "a\\u0000b"}',
    b"\xff\xfe\x00garbage",
    b"17",
    b'{"request_id": "n", "version": ' + b"[" * 20 + b"]" * 20 + b"}",
]


@pytest.mark.parametrize("payload", POISON, ids=range(len(POISON)))
def test_poison_is_rejected_acked_and_pubacked_once(handler, payload):
    """Each poison message gets exactly one `rejected` ack and is PUBACKed at once."""
    assert handler.process(inbound(ROLLBACK, payload, 7)) == "rejected"
    assert handler.link.acked == [7]
    got = acks(handler)
    assert [a["status"] for a in got] == ["rejected"] and got[0]["reason"]
    assert handler.clock.slept == [], "nothing was retried"


def test_poison_then_valid_command_is_applied(handler):
    """A poison message does not hold the channel: the valid rollback after it is handled."""
    handler.process(inbound(ROLLBACK, b"[" * 1500 + b"]" * 1500, 1))
    handler.process(inbound(ROLLBACK, json.dumps({"request_id": "r", "version": 99}).encode(), 2))
    assert handler.link.acked == [1, 2]
    assert [a["status"] for a in acks(handler)] == ["rejected", "refused"]
    assert acks(handler)[1]["request_id"] == "r"


def test_response_topic_may_not_be_a_command_topic(handler):
    """An answer sent to a command topic would come back as a command: rejected."""
    cmd = {"request_id": "loop", "version": 1, "response_topic": CONFIRM}
    assert handler.process(inbound(ROLLBACK, json.dumps(cmd).encode(), 3)) == "rejected"
    assert handler.store.query("SELECT count(*) FROM outbox WHERE topic=?", (CONFIRM,)) == [(0,)]


def test_transient_error_is_retried_then_applied(handler, monkeypatch):
    """SQLite busy twice, then free: retried on the clock (no real sleep), answered once."""
    real = commands_mod.add_command
    fails = iter([True, True])

    def flaky(*a: Any, **k: Any) -> None:
        if next(fails, False):
            raise sqlite3.OperationalError("database is locked")
        real(*a, **k)

    monkeypatch.setattr(commands_mod, "add_command", flaky)
    cmd = json.dumps({"request_id": "busy", "version": 99}).encode()
    assert handler.process(inbound(ROLLBACK, cmd, 4)) == "refused"
    assert len(handler.clock.slept) == 2 and handler.link.acked == [4]
    assert [a["status"] for a in acks(handler)] == ["refused"]
    assert handler.store.active_alarms() == []


def test_a_transient_error_that_lasts_is_rejected_with_an_alarm(handler, monkeypatch):
    """Busy on every attempt: after max_attempts the command is rejected, PUBACKed and the
    command_failed alarm raised; the next command is handled normally."""

    def busy(*a: Any, **k: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(commands_mod, "add_command", busy)
    cmd = json.dumps({"request_id": "stuck", "version": 99}).encode()
    assert handler.process(inbound(ROLLBACK, cmd, 5)) == "rejected"
    assert len(handler.clock.slept) == 3 and handler.link.acked == [5]
    assert "gave up after 4 transient failures" in acks(handler)[0]["reason"]
    assert [a["kind"] for a in handler.store.active_alarms()] == ["command_failed"]
    monkeypatch.undo()
    handler.process(
        inbound(ROLLBACK, json.dumps({"request_id": "next", "version": 99}).encode(), 6)
    )
    assert acks(handler)[-1]["request_id"] == "next" and handler.link.acked == [5, 6]


def test_an_unexpected_error_is_rejected_not_retried(handler, monkeypatch):
    """A bug-like error (not transient) would recur: rejected at once, without retries."""

    def boom(*a: Any, **k: Any) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(handler.keeper, "rollback", boom)
    cmd = json.dumps({"request_id": "bug", "version": 99}).encode()
    assert handler.process(inbound(ROLLBACK, cmd, 8)) == "rejected"
    assert handler.clock.slept == [] and handler.link.acked == [8]
    assert "internal error: KeyError" in acks(handler)[0]["reason"]
    assert acks(handler)[0]["request_id"] == "bug"
