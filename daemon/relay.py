"""The outbox relay: publish unsent rows QoS 1, delete them on a successful PUBACK.

One thread owns every publish of outbox rows and every PUBACK, so the ``mid -> row``
map needs no lock: a PUBACK is only read from the event queue after the publish that
produced its mid has been recorded. A reason code >= 0x80 (MQTT v5: e.g. 0x87 not
authorized) leaves the row unsent, on hold, counted in the status and raised as an alarm;
held rows are retried after ``refused_hold_s`` and on every reconnect. Rows paho already
holds are not republished after a reconnect: paho resends them itself (with DUP set).
After a crash paho's memory is gone and every row still in the outbox goes out again.

A row paho will not even queue (a payload or topic it refuses) is put on hold the same
way and the next rows go on: no single row can stall the outbox.

A connection failure is logged once per distinct reason (the line names host:port and
the cause: TLS trust, credentials, no listener) and raised as the ``mqtt_connect_failed``
alarm, cleared on the next successful connect; retries repeat at debug level.

The same thread publishes the retained availability/threshold/status messages on every
connect and the status every ``status_interval_s``. The relay needs only a ``Publisher``
(the link, or a fake in unit tests) and a ``Clock``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from .clock import SYSTEM_CLOCK, Clock
from .link import Connected, ConnectFailed, Disconnected, LinkEvent, PubAck
from .store import Store

log = logging.getLogger(__name__)

MQTT_ERR_SUCCESS = 0
MQTT_ERR_NO_CONN = 4
FAILURE = 0x80
#: a row paho refused to queue is held like a broker refusal; this is its reason code
LOCAL_REFUSAL = 0x100


class Publisher(Protocol):
    """What the relay needs from the MQTT link."""

    events: queue.SimpleQueue[LinkEvent]
    connected: threading.Event

    @property
    def where(self) -> str: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> tuple[int, int]:
        """Queue a QoS 1 publish; (mid, paho rc). May raise ValueError for a bad topic."""
        ...

    def subscribe_commands(self) -> None: ...


class Relay:
    """Moves the outbox to the broker; reports connection state and refusals."""

    def __init__(
        self,
        store: Store,
        link: Publisher,
        *,
        max_inflight: int,
        retained: Callable[[], list[tuple[str, bytes]]],
        status_interval_s: float,
        refused_hold_s: float = 60.0,
        on_connected: Callable[[bool], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.store = store
        self.link = link
        self.max_inflight = max_inflight
        self.retained = retained
        self.status_interval_s = status_interval_s
        self.refused_hold_s = refused_hold_s
        self.on_connected = on_connected
        self.inflight: dict[int, int] = {}  # mid -> outbox row id
        self.receive_max: int | None = None
        self._retained_mids: dict[int, str] = {}
        self._wake = threading.Event()
        self._republish = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = clock.monotonic()
        self.published = 0
        self.acked = 0
        self.refused = 0
        self.connected_since: float | None = None
        self.last_disconnect: str | None = None
        self._last_failure: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ngcal-relay", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New rows were committed."""
        self._wake.set()

    def republish_retained(self) -> None:
        """Ask the relay thread to publish the retained state again (threshold changed)."""
        self._republish.set()
        self._wake.set()

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or ``timeout`` passes."""
        deadline = self.clock.monotonic() + timeout
        while self.clock.monotonic() < deadline:
            if self.backlog() == 0:
                return True
            self._wake.set()
            self.clock.sleep(0.05)
        return self.backlog() == 0

    def backlog(self) -> int:
        """Rows in the outbox (unsent, in flight or refused)."""
        return int(self.store.outbox_stats()["backlog"])

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        next_status = 0.0
        while not self._stop.is_set():
            self.heartbeat = self.clock.monotonic()
            try:
                next_status = self.step(next_status)
            except Exception:  # noqa: BLE001 - the relay must survive and retry
                log.exception("relay iteration failed; retrying")
                self.clock.sleep(0.5)
            self.clock.wait(self._wake, 0.05 if self.inflight else 0.25)
            self._wake.clear()

    def step(self, next_status: float = 0.0) -> float:
        """One iteration: take link events, publish what fits; returns the next status time."""
        self._handle_events()
        if self.link.connected.is_set():
            if self._republish.is_set():
                self._republish.clear()
                self.publish_retained(status_only=False)
            self._fill()
            if self.clock.monotonic() >= next_status:
                self.publish_retained(status_only=True)
                next_status = self.clock.monotonic() + self.status_interval_s
        return next_status

    def _handle_events(self) -> None:
        acked: list[int] = []
        while True:
            try:
                ev = self.link.events.get_nowait()
            except queue.Empty:
                break
            if isinstance(ev, PubAck):
                row = self.inflight.pop(ev.mid, None)
                topic = self._retained_mids.pop(ev.mid, None)
                if ev.code >= FAILURE:
                    self._refused(row, topic, ev.code, ev.name)
                elif row is not None:
                    acked.append(row)
            elif isinstance(ev, Connected):
                self.receive_max = ev.receive_max
                self._connected(ev.session_present)
            elif isinstance(ev, ConnectFailed):
                self._connect_failed(ev.reason)
            elif isinstance(ev, Disconnected):
                if self.connected_since is not None:
                    log.warning("%s (disconnected)", ev.reason)
                self.connected_since = None
                self.last_disconnect = ev.reason
        if acked:
            self.store.mark_sent(acked)
            self.acked += len(acked)

    def _connected(self, session_present: bool) -> None:
        log.info(
            "mqtt connected (session present: %s); %d publish(es) in flight",
            session_present,
            len(self.inflight),
        )
        self.connected_since = self.clock.time()
        self._last_failure = None
        self.link.subscribe_commands()
        self.store.release_holds()
        self.store.clear_alarms("mqtt_disconnected")
        self.store.clear_alarms("mqtt_connect_failed")
        self.publish_retained(status_only=False)
        if self.on_connected is not None:
            self.on_connected(session_present)

    def _connect_failed(self, reason: str) -> None:
        """One error line and one alarm per distinct reason; repeats at debug level."""
        self.connected_since = None
        self.last_disconnect = reason
        if reason == self._last_failure:
            log.debug("%s (still)", reason)
            return
        self._last_failure = reason
        log.error("%s; verdicts wait in the outbox, retrying", reason)
        self.store.clear_alarms("mqtt_connect_failed")
        self.store.raise_alarm("mqtt_connect_failed", reason)

    def _refused(self, row: int | None, topic: str | None, code: int, name: str) -> None:
        self.refused += 1
        if row is not None:
            self.store.mark_refused(row, code, name, self.refused_hold_s)
            log.error(
                "mqtt %s refused outbox row %d (reason 0x%02x %s); kept unsent",
                self.link.where,
                row,
                code,
                name,
            )
            self.store.raise_alarm("publish_refused", f"0x{code:02x} {name}")
        elif topic is not None:
            log.error("mqtt %s refused retained %s (0x%02x %s)", self.link.where, topic, code, name)
            self.store.raise_alarm("publish_refused", f"0x{code:02x} {name} on {topic}")

    def _fill(self) -> None:
        # MQTT v5: never exceed the broker's Receive Maximum (paho does not enforce it)
        limit = min(self.max_inflight, self.receive_max or self.max_inflight)
        room = limit - len(self.inflight) - len(self._retained_mids)
        if room <= 0:
            return
        rows = self.store.unsent(exclude=set(self.inflight.values()), limit=room)
        for r in rows:
            try:
                mid, rc = self.link.publish(r.topic, r.payload, retain=r.retain)
            except ValueError as e:  # e.g. a topic paho refuses: would fail forever
                self._refused(r.id, None, LOCAL_REFUSAL, f"not publishable: {e}")
                continue
            if rc in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):
                self.inflight[mid] = r.id
                self.published += 1
            else:
                self._refused(r.id, None, LOCAL_REFUSAL, f"paho rc {rc}")

    def publish_retained(self, *, status_only: bool) -> None:
        """(Re)publish the retained state messages (all of them, or just the status)."""
        for topic, payload in self.retained():
            if status_only and not topic.endswith("/status"):
                continue
            mid, _ = self.link.publish(topic, payload, retain=True)
            self._retained_mids[mid] = topic
            if len(self._retained_mids) > 100:  # never acked (lost): do not let them block
                self._retained_mids.clear()
