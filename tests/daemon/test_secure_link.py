"""The broker link for real with TLS, passwords and an ACL (generated CA, real Mosquitto).

The broker's ACL gives the daemon's user only its own topic tree. Each failure (a CA that
did not sign the broker's certificate, a wrong password, a topic the ACL denies) must give
one clear log line naming host:port and an alarm in the status, and lose nothing: the
verdicts wait in the outbox and go out once the fault is fixed.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_kit import Subscriber, daemon_config, make_pki, write_image

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parents[2]
#: the production ACL (configs/mosquitto/acl), with an optional deny rule for dev1 in front
PRODUCTION_ACL = (REPO / "configs" / "mosquitto" / "acl").read_text()
ACL = "user dev1\n{extra}\n\n" + PRODUCTION_ACL.replace("{", "{{").replace("}", "}}")
USERS = {"dev1": "dev1-secret", "ngcal-ops": "ops-secret"}


def tls_config(tmp: Path, bundle: Path, port: int, ca: Path, **kw: Any) -> Path:
    mqtt = f"  username: dev1\n  password_credential: mqtt-password\n  tls:\n    ca_file: {ca}\n"
    return daemon_config(tmp, bundle, port, extra_mqtt=mqtt, **kw)


def credentials(tmp: Path, password: str) -> dict[str, str]:
    creds = tmp / "creds"
    creds.mkdir(exist_ok=True)
    (creds / "mqtt-password").write_text(password + "\n")
    return {"CREDENTIALS_DIRECTORY": str(creds)}


def status(state: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "ngcal.cli.main", "status", "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def backlog(state: Path) -> int:
    with sqlite3.connect(state / "state.db", timeout=30) as c:
        return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])


def wait_for(pred: Any, timeout: float, what: str, d: Any) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{d.log()}"
        time.sleep(0.1)


def lines_with(d: Any, text: str) -> list[str]:
    return [ln for ln in d.log().splitlines() if text in ln]


def test_tls_password_acl_link_publishes_and_takes_commands_and_a_denied_topic_waits(
    tmp_path: Path, broker_factory, daemon_process, tiny_bundle
):
    """Over TLS with a password the daemon publishes verdicts and answers a command. A
    verdict topic the ACL denies gives one log line naming host:port and a
    ``publish_refused`` alarm in the status; the verdict waits in the outbox and arrives
    once the ACL is fixed (broker restarted with the corrected file)."""
    pki = make_pki(tmp_path / "pki")
    broker = broker_factory(
        tls=pki, users=USERS, acl=ACL.format(extra="topic deny ngcal/dev1/cam2/verdict")
    )
    cfg = tls_config(tmp_path, tiny_bundle, broker.port, pki.ca, cameras=("cam1", "cam2"))
    sub = Subscriber(
        broker.port, ("ngcal/#",), username="ngcal-ops", password="ops-secret", ca=pki.ca
    ).start()
    d = daemon_process(cfg, env=credentials(tmp_path, "dev1-secret"))
    d.start()
    write_image(tmp_path / "watch" / "cam1" / "a.png", 10)
    write_image(tmp_path / "watch" / "cam2" / "b.png", 10)
    sub.wait(lambda: len(sub.on("cam1/verdict")) == 1, 30, "cam1's verdict over TLS")
    msg_id = sub.json_on("cam1/verdict")[0]["msg_id"]
    sub.publish("ngcal/dev1/cmd/confirm", {"request_id": "c1", "msg_id": msg_id, "label": "NG"})
    sub.wait(lambda: sub.json_on("/cmd/ack")[-1:] != [], 20, "the ack")
    assert sub.json_on("/cmd/ack")[0]["status"] == "accepted"
    state = tmp_path / "state"
    wait_for(lambda: status(state)["alarms"] != [], 20, "publish_refused alarm", d)
    alarms = status(state)["alarms"]
    assert [a["kind"] for a in alarms] == ["publish_refused"] and "0x87" in alarms[0]["detail"]
    refused = lines_with(d, "refused outbox row")
    assert len(refused) == 1 and f"127.0.0.1:{broker.port}" in refused[0], refused
    assert backlog(state) == 1 and sub.on("cam2/verdict") == []

    (broker.root / "acl").write_text(ACL.format(extra=""))  # the fix
    broker.stop()
    broker.start()
    sub.wait(lambda: len(sub.on("cam2/verdict")) == 1, 60, "the held verdict after the fix")
    wait_for(lambda: backlog(state) == 0, 20, "an empty outbox", d)
    assert d.terminate() == 0
    sub.stop()


@pytest.mark.parametrize("fault", ["wrong_ca", "wrong_password"])
def test_a_broken_link_is_one_clear_line_and_an_alarm_and_loses_nothing(
    fault: str, tmp_path: Path, broker_factory, daemon_process, tiny_bundle
):
    """A CA that did not sign the broker's certificate, or a wrong password: one error
    line naming host:port and the cause, an ``mqtt_connect_failed`` alarm in the status,
    verdicts kept in the outbox; after the fix they all arrive and the alarm clears."""
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", name="someone-else")
    broker = broker_factory(tls=pki, users=USERS, acl=ACL.format(extra=""))
    sub = Subscriber(
        broker.port,
        ("ngcal/dev1/+/verdict",),
        username="ngcal-ops",
        password="ops-secret",
        ca=pki.ca,
    ).start()
    ca = other.ca if fault == "wrong_ca" else pki.ca
    cfg = tls_config(tmp_path, tiny_bundle, broker.port, ca)
    env = credentials(tmp_path, "dev1-secret" if fault == "wrong_ca" else "guess")
    d = daemon_process(cfg, env=env)
    d.start()
    for i in range(3):
        write_image(tmp_path / "watch" / "cam1" / f"p{i}.png", 10 * i)
    state = tmp_path / "state"
    wait_for(lambda: backlog(state) == 3, 30, "3 verdicts in the outbox", d)
    wait_for(lambda: status(state)["alarms"] != [], 20, "an alarm", d)
    time.sleep(4.0)  # paho retries after 1 s, 2 s, ...: the line must not repeat
    cause = (
        "TLS certificate not trusted"
        if fault == "wrong_ca"
        else "check mqtt.username and the password"
    )
    failed = [ln for ln in d.log().splitlines() if "ERROR" in ln and "mqtt" in ln]
    assert len(failed) == 1, failed
    assert f"mqtt 127.0.0.1:{broker.port}:" in failed[0] and cause in failed[0], failed
    alarms = status(state)["alarms"]
    assert [a["kind"] for a in alarms] == ["mqtt_connect_failed"] and cause in alarms[0]["detail"]
    assert sub.on("/verdict") == []

    if fault == "wrong_ca":  # the fix: the right CA in the config, and a restart
        assert d.terminate() == 0
        tls_config(tmp_path, tiny_bundle, broker.port, pki.ca)
        d.start()
    else:  # the fix: the right password in the credential (read at every reconnect)
        credentials(tmp_path, "dev1-secret")
    sub.wait(lambda: len(sub.on("/verdict")) == 3, 60, "the 3 held verdicts")
    wait_for(lambda: backlog(state) == 0, 20, "an empty outbox", d)
    wait_for(lambda: status(state)["alarms"] == [], 20, "the alarm cleared", d)
    assert d.terminate() == 0
    sub.stop()
