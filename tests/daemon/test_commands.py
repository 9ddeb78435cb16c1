"""Feedback commands over a real broker: confirm, recalibrate, rollback; idempotent, acked.

The daemon runs as a subprocess; a test client publishes commands on ``cmd/*`` and reads
``cmd/ack``, ``threshold`` (retained) and ``recalibration``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from daemon_kit import Subscriber, daemon_config, write_image

from ngcal.core.files import sha256_file

pytestmark = pytest.mark.mqtt

RECAL = """recalibration:
  min_real_ng: 2
  mode: target_fpr
  target_fpr: 0.1
  hysteresis: 0.0
  max_step: 0.5
  intake_dir: {intake}
"""


def acks(sub: Subscriber, rid: str) -> list[dict]:
    return [a for a in sub.json_on("/cmd/ack") if a["request_id"] == rid]


def wait_ack(sub: Subscriber, rid: str, n: int = 1) -> list[dict]:
    sub.wait(lambda: len(acks(sub, rid)) >= n, 20, f"{n} ack(s) for {rid}")
    return acks(sub, rid)


def test_commands_are_idempotent_acked_once_and_feed_recalibration(
    tmp_path: Path, broker, daemon_process, tiny_bundle
):
    """Each request_id gets exactly one real ack and replays get `duplicate`; malformed,
    oversized and invalid commands are rejected with an ack; confirmations (by msg_id and by
    sha256 of an intake image) feed the policy; recalibrate applies a new threshold that is
    published retained and audited; rollback restores v1's value as a new version."""
    intake = tmp_path / "intake"
    intake.mkdir()
    cfg = daemon_config(
        tmp_path,
        tiny_bundle,
        broker.port,
        extra_mqtt="  max_command_bytes: 512\n",
        extra=RECAL.format(intake=intake),
    )
    sub = Subscriber(broker.port, ("ngcal/#",), client_id="operator").start()
    d = daemon_process(cfg)
    d.start()
    watch = tmp_path / "watch" / "cam1"
    for i, grey in enumerate((0, 250, 128, 130)):
        write_image(watch / f"p{i}.png", grey)
    sub.wait(lambda: len(sub.on("/verdict")) == 4, 20, "4 verdicts")
    verdicts = {v["image"]: v for v in sub.json_on("/verdict")}
    assert verdicts["p0.png"]["verdict"] == "NG" and verdicts["p2.png"]["verdict"] == "OK"
    cmd = "ngcal/dev1/cmd/"

    # confirm by msg_id, then replay it
    c1 = {
        "request_id": "r1",
        "msg_id": verdicts["p0.png"]["msg_id"],
        "label": "NG",
        "operator": "ann",
    }
    sub.publish(cmd + "confirm", c1)
    assert [a["status"] for a in wait_ack(sub, "r1")] == ["accepted"]
    sub.publish(cmd + "confirm", c1)
    assert [a["status"] for a in wait_ack(sub, "r1", 2)] == ["accepted", "duplicate"]

    # confirm by sha256 of an image the daemon never saw (intake folder): scored then
    write_image(intake / "seen_elsewhere.png", 5)
    sha = sha256_file(intake / "seen_elsewhere.png")
    sub.publish(cmd + "confirm", {"request_id": "r2", "image_sha256": sha, "label": "NG"})
    a2 = wait_ack(sub, "r2")[0]
    assert a2["status"] == "accepted" and a2["source"] == "intake" and a2["score"] > 0.9

    # rejected: malformed JSON, oversized, invalid label (with its request_id), unknown msg_id
    sub.publish(cmd + "confirm", b"{not json")
    sub.publish(cmd + "confirm", json.dumps({"request_id": "big", "pad": "x" * 600}).encode())
    sub.publish(cmd + "confirm", {"request_id": "r3", "msg_id": "m", "label": "MAYBE"})
    sub.publish(cmd + "confirm", {"request_id": "r4", "msg_id": "nope", "label": "OK"})
    sub.wait(
        lambda: sum(a["status"] == "rejected" for a in sub.json_on("/cmd/ack")) >= 4,
        20,
        "4 rejections",
    )
    rejected = [a for a in sub.json_on("/cmd/ack") if a["status"] == "rejected"]
    reasons = " | ".join(a["reason"] for a in rejected)
    assert "malformed JSON" in reasons and "oversized" in reasons
    assert "invalid confirm: label" in reasons and "unknown msg_id" in reasons
    assert acks(sub, "r3")[0]["status"] == "rejected"

    # recalibrate: dry run first (nothing applied), then for real, then a replay
    sub.publish(cmd + "recalibrate", {"request_id": "k1", "dry_run": True})
    assert wait_ack(sub, "k1")[0]["status"] == "accepted"
    sub.publish(cmd + "recalibrate", {"request_id": "k2", "operator": "bob"})
    k2 = wait_ack(sub, "k2")[0]
    assert k2["status"] == "applied", k2
    assert k2["threshold_version"] == 2 and k2["threshold"] != 0.5
    sub.wait(lambda: sub.json_on("/threshold")[-1]["version"] == 2, 10, "retained threshold v2")
    sub.publish(cmd + "recalibrate", {"request_id": "k2"})
    assert [a["status"] for a in wait_ack(sub, "k2", 2)] == ["applied", "duplicate"]
    events = sub.json_on("/recalibration")
    assert [e["applied"] for e in events] == [False, True]
    assert events[1]["audit"]["evidence"]["real_ng"] == 2

    # rollback to v1 (new version 3 with v1's value); unknown version refused
    sub.publish(cmd + "rollback", {"request_id": "b1", "version": 1})
    b1 = wait_ack(sub, "b1")[0]
    assert b1["status"] == "applied" and b1["threshold_version"] == 3 and b1["threshold"] == 0.5
    sub.publish(cmd + "rollback", {"request_id": "b2", "version": 99})
    assert wait_ack(sub, "b2")[0]["status"] == "refused"
    sub.wait(lambda: sub.json_on("/threshold")[-1]["version"] == 3, 10, "retained threshold v3")

    # verdicts after the rollback use v3
    write_image(watch / "after.png", 0)
    sub.wait(lambda: any(v["image"] == "after.png" for v in sub.json_on("/verdict")), 20, "v")
    after = [v for v in sub.json_on("/verdict") if v["image"] == "after.png"][0]
    assert after["threshold_version"] == 3

    # exactly one non-duplicate ack per request_id
    for rid in ("r1", "r2", "k1", "k2", "b1", "b2"):
        assert len([a for a in acks(sub, rid) if a["status"] != "duplicate"]) == 1, rid
    assert d.terminate() == 0

    with sqlite3.connect(tmp_path / "state" / "state.db") as c:
        kinds = [r[0] for r in c.execute("SELECT kind FROM audit ORDER BY id")]
        assert kinds == ["threshold_initial", "recalibrate", "recalibrate", "rollback", "rollback"]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            c.execute("DELETE FROM audit")
    saved = json.loads((tmp_path / "state" / "thresholds.json").read_text())
    assert saved["version"] == 3 and saved["value"] == 0.5
    sub.stop()


def test_commands_sent_while_daemon_is_down_are_handled_after_restart(
    tmp_path: Path, broker, daemon_process, tiny_bundle
):
    """The persistent session (clean_start=False, session expiry) keeps the subscription,
    so a command published while the daemon is stopped is handled and acked on restart."""
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port)
    sub = Subscriber(broker.port, ("ngcal/dev1/cmd/ack",), client_id="operator").start()
    d = daemon_process(cfg)
    d.start()
    assert d.terminate() == 0
    sub.publish("ngcal/dev1/cmd/recalibrate", {"request_id": "while-down", "dry_run": True})
    time.sleep(0.3)
    assert acks(sub, "while-down") == []
    d.start()
    assert [a["status"] for a in wait_ack(sub, "while-down")] == ["refused"]
    assert "insufficient evidence" in acks(sub, "while-down")[0]["reason"]
    assert d.terminate() == 0
    sub.stop()
