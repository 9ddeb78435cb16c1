"""The outbox relay: publish unsent rows QoS 1, delete them on a successful PUBACK.

One thread owns every publish of outbox rows and every PUBACK, so the ``mid -> row``
map needs no lock: a PUBACK is only read from the event queue after the publish that
produced its mid has been recorded. A reason code >= 0x80 (MQTT v5: e.g. 0x87 not
authorized) leaves the row unsent, on hold, counted in the status and raised as an alarm;
held rows are retried after ``refused_hold_s`` and on every reconnect. Rows paho already
holds are not republished after a reconnect: paho resends them itself (with DUP set).
After a crash paho's memory is gone and every row still in the outbox goes out again.

The same thread publishes the retained availability/threshold/status messages on every
connect and the status every ``status_interval_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from .link import MqttLink
from .store import Store

log = logging.getLogger(__name__)

MQTT_ERR_SUCCESS = 0
MQTT_ERR_NO_CONN = 4
FAILURE = 0x80


class Relay:
    """Moves the outbox to the broker; reports connection state and refusals."""

    def __init__(
        self,
        store: Store,
        link: MqttLink,
        *,
        max_inflight: int,
        retained: Callable[[], list[tuple[str, bytes]]],
        status_interval_s: float,
        refused_hold_s: float = 60.0,
        on_connected: Callable[[bool], None] | None = None,
    ) -> None:
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
        self.heartbeat = time.monotonic()
        self.published = 0
        self.acked = 0
        self.refused = 0
        self.connected_since: float | None = None
        self.last_disconnect: str | None = None

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.backlog() == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
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
            self.heartbeat = time.monotonic()
            try:
                self._handle_events()
                if self.link.connected.is_set():
                    if self._republish.is_set():
                        self._republish.clear()
                        self.publish_retained(status_only=False)
                    self._fill()
                    if time.monotonic() >= next_status:
                        self.publish_retained(status_only=True)
                        next_status = time.monotonic() + self.status_interval_s
            except Exception:  # noqa: BLE001 - the relay must survive and retry
                log.exception("relay iteration failed; retrying")
                time.sleep(0.5)
            self._wake.wait(timeout=0.05 if self.inflight else 0.25)
            self._wake.clear()

    def _handle_events(self) -> None:
        acked: list[int] = []
        while True:
            try:
                ev = self.link.events.get_nowait()
            except queue.Empty:
                break
            kind = ev[0]
            if kind == "puback":
                _, mid, code, name = ev
                row = self.inflight.pop(mid, None)
                topic = self._retained_mids.pop(mid, None)
                if code >= FAILURE:
                    self._refused(row, topic, code, name)
                elif row is not None:
                    acked.append(row)
            elif kind == "connected":
                self.receive_max = ev[2] if isinstance(ev[2], int) and ev[2] > 0 else None
                self._connected(bool(ev[1]))
            elif kind in ("disconnected", "connect_failed"):
                if self.connected_since is not None or kind == "connect_failed":
                    log.warning("mqtt %s: %s", kind, ev[1])
                self.connected_since = None
                self.last_disconnect = str(ev[1])
        if acked:
            self.store.mark_sent(acked)
            self.acked += len(acked)

    def _connected(self, session_present: bool) -> None:
        log.info(
            "mqtt connected (session present: %s); %d publish(es) in flight",
            session_present,
            len(self.inflight),
        )
        self.connected_since = time.time()
        self.link.subscribe_commands()
        self.store.release_holds()
        self.store.clear_alarms("mqtt_disconnected")
        self.publish_retained(status_only=False)
        if self.on_connected is not None:
            self.on_connected(session_present)

    def _refused(self, row: int | None, topic: str | None, code: int, name: str) -> None:
        self.refused += 1
        if row is not None:
            self.store.mark_refused(row, code, name, self.refused_hold_s)
            log.error(
                "broker refused outbox row %d (reason 0x%02x %s); kept unsent", row, code, name
            )
            self.store.raise_alarm("publish_refused", f"0x{code:02x} {name}")
        elif topic is not None:
            log.error("broker refused retained %s (0x%02x %s)", topic, code, name)
            self.store.raise_alarm("publish_refused", f"0x{code:02x} {name} on {topic}")

    def _fill(self) -> None:
        # MQTT v5: never exceed the broker's Receive Maximum (paho does not enforce it)
        limit = min(self.max_inflight, self.receive_max or self.max_inflight)
        room = limit - len(self.inflight) - len(self._retained_mids)
        if room <= 0:
            return
        rows = self.store.unsent(exclude=set(self.inflight.values()), limit=room)
        for r in rows:
            mid, rc = self.link.publish(r.topic, r.payload, retain=r.retain)
            if rc in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN):
                self.inflight[mid] = r.id
                self.published += 1
            else:
                log.warning("publish of outbox row %d not queued (paho rc %d)", r.id, rc)
                break

    def publish_retained(self, *, status_only: bool) -> None:
        """(Re)publish the retained state messages (all of them, or just the status)."""
        for topic, payload in self.retained():
            if status_only and not topic.endswith("/status"):
                continue
            mid, _ = self.link.publish(topic, payload, retain=True)
            self._retained_mids[mid] = topic
            if len(self._retained_mids) > 100:  # never acked (lost): do not let them block
                self._retained_mids.clear()
