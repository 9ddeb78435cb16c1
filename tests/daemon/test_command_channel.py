"""The command channel of a RUNNING daemon on the real broker cannot be poisoned.

Mosquitto sends a client at most 20 unacknowledged QoS 1 messages and redelivers them only
on reconnect: a command the daemon never PUBACKs holds a slot for the session's lifetime.
These tests send poison (and fuzz) to every command topic and check that each message is
answered once and PUBACKed, and that a valid command afterwards is still handled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_kit import Subscriber, daemon_config, write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.mqtt

CMD = "ngcal/dev1/cmd/"
TOPICS = [CMD + k for k in ("confirm", "recalibrate", "rollback")]
DEEP = b"[" * 1500 + b"]" * 1500
SURROGATE = b'{"request_id": "\\ud800", "version": 1}'


def ack_count(sub: Subscriber) -> int:
    return len(sub.on("/cmd/ack"))


def send_and_wait_ack(sub: Subscriber, topic: str, payload: bytes, timeout: float) -> float:
    """Publish one command, wait for exactly one more ack; returns seconds to the ack."""
    before = ack_count(sub)
    t0 = time.monotonic()
    sub.publish(topic, payload)
    sub.wait(lambda: ack_count(sub) > before, timeout, f"an ack for {payload[:60]!r}")
    return time.monotonic() - t0


def start_online(d: Any, sub: Subscriber) -> None:
    """Start the daemon and wait for its ``online`` (published after it subscribed)."""
    n = len([m for m in sub.on("/availability") if m.payload == b"online"])
    d.start()
    sub.wait(
        lambda: len([m for m in sub.on("/availability") if m.payload == b"online"]) > n,
        30,
        "availability online",
    )


def assert_no_replays(sub: Subscriber, d: Any) -> None:
    """Restart the daemon: anything it had not PUBACKed would be redelivered and answered."""
    n = ack_count(sub)
    assert d.terminate() == 0
    start_online(d, sub)
    time.sleep(1.0)
    assert ack_count(sub) == n, sub.json_on("/cmd/ack")[n:]


def test_25_poison_commands_then_a_valid_rollback_is_acked_before_and_after_restart(
    tmp_path: Path, broker, daemon_process, tiny_bundle
):
    """More poison than Mosquitto's 20 in-flight slots (deep nesting, lone surrogates),
    each answered `rejected`; a valid rollback after them is acked; after a restart
    nothing is replayed; 25 more sent while the daemon is down are answered at start and
    a valid command after them is acked too."""
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port)
    sub = Subscriber(broker.port, (CMD + "ack", "ngcal/dev1/availability")).start()
    d = daemon_process(cfg)
    start_online(d, sub)
    for i in range(25):
        sub.publish(TOPICS[i % 3], DEEP if i % 2 else SURROGATE)
    sub.publish(CMD + "rollback", {"request_id": "valid-1", "version": 99})
    sub.wait(lambda: ack_count(sub) >= 26, 30, "26 acks")
    got = sub.json_on("/cmd/ack")
    assert [a["status"] for a in got[:25]] == ["rejected"] * 25
    assert {a["reason"].split(":")[0] for a in got[:25]} == {"malformed JSON", "unencodable text"}
    assert (got[25]["request_id"], got[25]["status"]) == ("valid-1", "refused")
    assert_no_replays(sub, d)
    assert d.terminate() == 0
    for i in range(25):
        sub.publish(TOPICS[i % 3], DEEP if i % 2 else SURROGATE)
    d.start()
    sub.publish(CMD + "rollback", {"request_id": "valid-2", "version": 99})
    sub.wait(lambda: ack_count(sub) >= 52, 30, "52 acks")
    assert sub.json_on("/cmd/ack")[-1]["request_id"] == "valid-2"
    assert d.proc is not None and d.proc.poll() is None
    assert d.terminate() == 0
    sub.stop()


# ---------------------------------------------------------------------- fuzz

NASTY = st.sampled_from(["", "\ud800", "\x00", "#", "a/+/b", "$SYS/x", "x" * 200, "é", "0"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20)
)
JSONISH = st.recursive(
    st.one_of(SCALARS, NASTY),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
NEAR_VALID = st.fixed_dictionaries(
    {"request_id": st.one_of(st.text(min_size=1, max_size=8), NASTY, st.integers())},
    optional={
        "version": st.one_of(st.integers(-5, 2**40), st.floats(), st.text(max_size=4)),
        "label": st.sampled_from(["NG", "OK", "ng", "MAYBE", 1, None]),
        "msg_id": st.one_of(st.text(max_size=40), NASTY),
        "image_sha256": st.one_of(
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), NASTY
        ),
        "dry_run": st.one_of(st.booleans(), st.text(max_size=3)),
        "operator": st.one_of(st.text(max_size=10), NASTY),
        "response_topic": st.one_of(NASTY, st.sampled_from(TOPICS + [CMD + "ack", "op/replies"])),
        "schema": st.text(max_size=10),
        "unexpected": JSONISH,
    },
)


def _encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates become \ud800 escapes


PAYLOADS = st.one_of(
    st.binary(max_size=600),
    JSONISH.map(_encode),
    NEAR_VALID.map(_encode),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


def test_fuzzed_commands_are_each_answered_once_and_never_block_the_channel(
    tmp_path: Path, broker, daemon_process, tiny_bundle
):
    """Arbitrary bytes, arbitrary JSON and near-valid commands on each command topic of one
    running daemon: each message gets exactly one ack, the daemon stays alive, a valid
    confirmation afterwards is applied and acked within a second, and a restart replays
    nothing (every message was PUBACKed)."""
    cfg = daemon_config(
        tmp_path, tiny_bundle, broker.port, extra_mqtt="  max_command_bytes: 4096\n"
    )
    filters = (CMD + "ack", "ngcal/dev1/+/verdict", "ngcal/dev1/availability")
    sub = Subscriber(broker.port, filters, client_id="fuzzer").start()
    d = daemon_process(cfg)
    start_online(d, sub)
    write_image(tmp_path / "watch" / "cam1" / "seen.png", 10)
    sub.wait(lambda: len(sub.on("/verdict")) == 1, 20, "a verdict to confirm")
    msg_id = sub.json_on("/verdict")[0]["msg_id"]
    sent = 0

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(topic=st.sampled_from(TOPICS), payload=PAYLOADS)
    def one_message(topic: str, payload: bytes) -> None:
        nonlocal sent
        sent += 1
        send_and_wait_ack(sub, topic, payload, timeout=10)
        assert d.proc is not None and d.proc.poll() is None, d.log()

    one_message()
    time.sleep(0.5)  # a second ack to any message would have arrived by now
    assert ack_count(sub) == sent, "some message was answered more than once"
    confirm = {"request_id": "after-fuzz", "msg_id": msg_id, "label": "NG"}
    took = send_and_wait_ack(sub, CMD + "confirm", _encode(confirm), timeout=10)
    last = sub.json_on("/cmd/ack")[-1]
    assert (last["request_id"], last["status"]) == ("after-fuzz", "accepted")
    assert took < 1.0, f"valid command acked after {took:.2f} s"
    assert_no_replays(sub, d)
    assert d.terminate() == 0
    sub.stop()
