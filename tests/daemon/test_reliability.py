"""No verdict is lost: broker outages, SIGKILL, restarts, ACL refusals, retained state.

Every test runs the daemon as a real subprocess against a real Mosquitto on a free
loopback port. Expected msg_ids are computed by the test from the files on disk
(device, camera, relative path, sha256, mtime_ns), not taken from the daemon.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_kit import Subscriber, daemon_config, write_image

from ngcal.core.files import sha256_file
from ngcal.daemon.messages import make_msg_id

pytestmark = pytest.mark.mqtt


def expected_ids(watch: Path, device: str = "dev1") -> dict[str, str]:
    """msg_id -> file name for every image now in ``watch/<camera>/``."""
    out = {}
    for cam_dir in sorted(p for p in watch.iterdir() if p.is_dir()):
        for f in sorted(cam_dir.iterdir()):
            if f.name.startswith("."):
                continue
            st = f.stat()
            out[make_msg_id(device, cam_dir.name, f.name, sha256_file(f), st.st_mtime_ns)] = f.name
    return out


def received_ids(sub: Subscriber) -> set[str]:
    return {v["msg_id"] for v in sub.json_on("/verdict")}


def missing(expected: dict[str, str], sub: Subscriber) -> list[str]:
    """File names whose verdict never arrived (the check every outage test relies on)."""
    got = received_ids(sub)
    return sorted(name for mid, name in expected.items() if mid not in got)


def db_count(state: Path, sql: str) -> int:
    with sqlite3.connect(state / "state.db", timeout=30) as c:
        return int(c.execute(sql).fetchone()[0])


def _outage_run(
    tmp_path, broker_factory, daemon_process, tiny_bundle, n: int, *, drop_unsent: bool
) -> tuple[dict[str, str], Subscriber, Path, set[str]]:
    """Write ``n`` images; stop the broker mid-run; SIGKILL the daemon while it is down;
    optionally delete the unsent outbox rows (a daemon that drops them); restart both."""
    broker = broker_factory()
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port, rescan=1.0)
    watch = tmp_path / "watch" / "cam1"
    watch.mkdir(parents=True, exist_ok=True)
    state = tmp_path / "state"
    sub = Subscriber(
        broker.port, ("ngcal/dev1/+/verdict",), client_id="obs", persistent=True
    ).start()
    d = daemon_process(cfg)
    d.start()
    first = n // 3
    for i in range(first):
        write_image(watch / f"img{i:04d}.png", i % 256)
    sub.wait(lambda: len(received_ids(sub)) >= first // 2, 60, "verdicts before the outage")
    broker.stop()
    for i in range(first, n - n // 6):
        write_image(watch / f"img{i:04d}.png", i % 256)
    deadline = time.monotonic() + 60
    while db_count(state, "SELECT count(*) FROM verdicts") < n - n // 6 - 5:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    d.kill()  # SIGKILL while the broker is down: paho's memory is gone, the outbox is not
    with sqlite3.connect(state / "state.db") as c:
        backlog = {r[0] for r in c.execute("SELECT msg_id FROM outbox")}
    if drop_unsent:
        with sqlite3.connect(state / "state.db") as c:
            c.execute("DELETE FROM outbox")
    for i in range(n - n // 6, n):  # written while the daemon is dead: start-up scan
        write_image(watch / f"img{i:04d}.png", i % 256)
    broker.start()
    d.start()
    return expected_ids(tmp_path / "watch"), sub, state, backlog


def test_300_images_survive_broker_outage_and_sigkill(
    tmp_path, broker_factory, daemon_process, tiny_bundle
):
    """Every msg_id arrives (duplicates allowed) and the outbox ends empty after a broker
    stop mid-run, a SIGKILL of the daemon while the broker is down, and both restarting."""
    expected, sub, state, backlog = _outage_run(
        tmp_path, broker_factory, daemon_process, tiny_bundle, 300, drop_unsent=False
    )
    assert len(expected) == 300
    assert len(backlog) > 0, "the outage must leave unsent verdicts for the relay to recover"
    sub.wait(lambda: not missing(expected, sub), 90, "every msg_id")
    assert missing(expected, sub) == []
    deadline = time.monotonic() + 30
    while db_count(state, "SELECT count(*) FROM outbox") != 0:
        assert time.monotonic() < deadline, "outbox did not drain"
        time.sleep(0.1)
    assert db_count(state, "SELECT count(*) FROM verdicts") == 300
    assert received_ids(sub) <= set(expected), "a verdict for a file that does not exist"
    sub.stop()


def test_negative_control_dropped_outbox_rows_are_detected(
    tmp_path, broker_factory, daemon_process, tiny_bundle
):
    """The same check reports a gap when unsent outbox rows are deleted during the outage
    (a daemon that drops unsent messages): the outage test can fail."""
    expected, sub, state, dropped = _outage_run(
        tmp_path, broker_factory, daemon_process, tiny_bundle, 60, drop_unsent=True
    )
    assert dropped
    # everything not dropped still arrives (files scored after the restart included) ...
    sub.wait(lambda: set(expected) - dropped <= received_ids(sub), 60, "surviving verdicts")
    time.sleep(2.0)
    gap = missing(expected, sub)
    # ... and the check names the dropped ones (a row dropped after the broker already
    # delivered it, but before its PUBACK came back, is not a gap)
    assert gap, "the check must detect verdicts that never arrived"
    assert {mid for mid, name in expected.items() if name in gap} <= dropped
    sub.stop()


def test_acl_denied_publish_stays_unsent_and_is_reported(
    tmp_path, broker_factory, daemon_process, tiny_bundle
):
    """A verdict the broker refuses (PUBACK 0x87 not authorized) stays in the outbox, is
    counted as refused, raises an alarm, and is shown by `ngcal status`; others go out."""
    acl = (
        "user dev\ntopic readwrite ngcal/dev1/#\ntopic deny ngcal/dev1/blocked/verdict\n"
        "user obs\ntopic read ngcal/#\n"
    )
    broker = broker_factory(acl=acl, users={"dev": "devpw", "obs": "obspw"})
    extra_mqtt = "  username: dev\n  password_env: NGCAL_TEST_MQTT_PASSWORD\n"
    cfg = daemon_config(
        tmp_path, tiny_bundle, broker.port, cameras=("cam1", "blocked"), extra_mqtt=extra_mqtt
    )
    sub = Subscriber(broker.port, ("ngcal/#",), username="obs", password="obspw").start()
    d = daemon_process(cfg, env={"NGCAL_TEST_MQTT_PASSWORD": "devpw"})
    d.start()
    write_image(tmp_path / "watch" / "cam1" / "a.png", 10)
    write_image(tmp_path / "watch" / "blocked" / "b.png", 10)
    sub.wait(lambda: len(sub.on("cam1/verdict")) == 1, 20, "the allowed verdict")
    state = tmp_path / "state"
    deadline = time.monotonic() + 20
    while db_count(state, "SELECT count(*) FROM outbox WHERE last_rc = 135") != 1:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    while db_count(state, "SELECT count(*) FROM outbox") != 1:  # cam1's PUBACK processed
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    time.sleep(0.5)
    assert sub.on("blocked/verdict") == []
    assert db_count(state, "SELECT count(*) FROM outbox") == 1
    sub.wait(
        lambda: any(s["outbox"]["refused"] == 1 and s["alarms"] for s in sub.json_on("/status")),
        20,
        "status reporting the refusal",
    )
    out = subprocess.run(
        [sys.executable, "-m", "ngcal.cli.main", "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["outbox"] == {**report["outbox"], "backlog": 1, "refused": 1}
    assert [a["kind"] for a in report["alarms"]] == ["publish_refused"]
    assert "0x87" in report["alarms"][0]["detail"]
    text = subprocess.run(
        [sys.executable, "-m", "ngcal.cli.main", "status", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "outbox: 1 unsent (1 refused by the broker)" in text
    assert "publish_refused: 0x87 Not authorized" in text
    assert "threshold: v1 0.5" in text
    assert d.terminate() == 0
    sub.stop()


def test_retained_state_survives_broker_restart(
    tmp_path, broker_factory, daemon_process, tiny_bundle
):
    """After a clean stop (availability offline) and a broker restart, a new subscriber
    sees the retained availability and threshold; a new start publishes online again."""
    broker = broker_factory()
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port)
    d = daemon_process(cfg)
    d.start()
    first = Subscriber(broker.port, ("ngcal/dev1/availability",), client_id="first").start()
    first.wait(lambda: [m.payload for m in first.messages] == [b"online"], 10, "online")
    first.stop()
    assert d.terminate() == 0
    broker.stop()
    broker.start()
    sub = Subscriber(
        broker.port,
        ("ngcal/dev1/availability", "ngcal/dev1/threshold", "ngcal/dev1/status"),
        client_id="late",
    ).start()
    sub.wait(lambda: len(sub.messages) >= 3, 10, "retained messages")
    assert all(m.retain for m in sub.messages)
    assert [m.payload for m in sub.on("/availability")] == [b"offline"]
    thr = sub.json_on("/threshold")[0]
    assert thr["value"] == 0.5 and thr["version"] == 1
    d.start()
    sub.wait(lambda: sub.on("/availability")[-1].payload == b"online", 15, "online again")
    assert d.terminate() == 0
    sub.wait(lambda: sub.on("/availability")[-1].payload == b"offline", 10, "offline on stop")
    sub.stop()
