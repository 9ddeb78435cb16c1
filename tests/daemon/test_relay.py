"""The relay against a fake publisher and a fake clock (real SQLite store): no sleeping.

The real-broker behaviour (outages, SIGKILL, ACL refusals) is in ``test_reliability``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fakes import FakeClock, FakePublisher

from ngcal.daemon.link import Connected, ConnectFailed, PubAck
from ngcal.daemon.messages import Outbound
from ngcal.daemon.relay import Relay
from ngcal.daemon.store import Store, enqueue


def _relay(tmp_path: Path, n: int, **kw) -> tuple[Relay, FakePublisher, Store, FakeClock]:
    store = Store(tmp_path)
    with store.tx() as c:
        for i in range(n):
            enqueue(c, Outbound(f"t/{i}", b"x%d" % i, f"m{i}"))
    pub, clock = FakePublisher(), FakeClock()
    relay = Relay(store, pub, retained=list, status_interval_s=30, clock=clock, **kw)
    return relay, pub, store, clock


def test_puback_deletes_a_row_a_refusal_holds_it_and_the_rest_go_on(tmp_path):
    """Success deletes the row; 0x87 keeps it unsent (held, counted, alarmed) while the
    following rows are published and acknowledged."""
    relay, pub, store, _ = _relay(tmp_path, 3, max_inflight=10)
    pub.connected.set()
    pub.events.put(Connected(False, None))
    relay.step()
    assert [t for _, t, _ in pub.published] == ["t/0", "t/1", "t/2"]
    pub.events.put(PubAck(1, 0x87, "Not authorized"))
    pub.events.put(PubAck(2, 0, "Success"))
    pub.events.put(PubAck(3, 0, "Success"))
    relay.step()
    assert store.outbox_stats()["backlog"] == 1 and store.outbox_stats()["refused"] == 1
    assert [a["kind"] for a in store.active_alarms()] == ["publish_refused"]
    relay.step()
    assert len(pub.published) == 3, "a held row is not republished before its hold ends"
    store.close()


def test_a_row_paho_cannot_publish_never_stalls_the_outbox(tmp_path):
    """A publish that raises (a topic paho refuses) puts that row on hold; the next rows
    are still published."""
    relay, pub, store, _ = _relay(tmp_path, 3, max_inflight=10)
    pub.refuse.add("t/0")
    pub.connected.set()
    relay.step()
    assert [t for _, t, _ in pub.published] == ["t/1", "t/2"]
    assert store.outbox_stats()["refused"] == 1
    store.close()


def test_in_flight_never_exceeds_the_brokers_receive_maximum(tmp_path):
    """With Receive Maximum 2, two publishes are in flight until a PUBACK frees a slot."""
    relay, pub, store, _ = _relay(tmp_path, 5, max_inflight=64)
    pub.connected.set()
    pub.events.put(Connected(True, 2))
    relay.step()
    assert len(pub.published) == 2
    pub.events.put(PubAck(1, 0, "Success"))
    relay.step()
    assert len(pub.published) == 3
    store.close()


def test_connect_failure_is_one_line_and_one_alarm_until_connected(tmp_path, caplog):
    """The same failure repeated by paho's retries logs one error line naming host:port
    and raises one alarm; a successful connect clears it."""
    relay, pub, store, _ = _relay(tmp_path, 0, max_inflight=8)
    why = "mqtt broker.test:8883: TLS certificate not trusted: unable to get local issuer"
    with caplog.at_level(logging.DEBUG, logger="ngcal.daemon.relay"):
        for _ in range(5):
            pub.events.put(ConnectFailed(why))
            relay.step()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "broker.test:8883" in errors[0]
    assert [(a["kind"], a["detail"], a["count"]) for a in store.active_alarms()] == [
        ("mqtt_connect_failed", why, 1)
    ]
    pub.connected.set()
    pub.events.put(Connected(False, None))
    relay.step()
    assert store.active_alarms() == [] and pub.subscribed == 1
    store.close()


def test_drain_waits_on_the_clock_not_the_wall(tmp_path):
    """``drain`` gives up after its timeout measured on the injected clock."""
    relay, _, store, clock = _relay(tmp_path, 1, max_inflight=8)
    t0 = clock.monotonic()
    assert relay.drain(2.0) is False
    assert clock.monotonic() - t0 >= 2.0
    store.close()
