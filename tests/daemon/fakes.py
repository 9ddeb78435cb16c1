"""Fakes at the daemon's seams: a clock tests drive, a publisher, a command channel.

Only the seams are fake; the store is the real SQLite database.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from ngcal.daemon.link import Inbound, LinkEvent


class FakeClock:
    """Time moves only when a worker sleeps or waits (no real sleeping)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if not event.is_set():
            self.now += timeout
        return event.is_set()


@dataclass
class FakePublisher:
    """Records publishes; ``refuse`` makes publish raise ValueError for a topic."""

    where: str = "broker.test:8883"
    events: queue.SimpleQueue[LinkEvent] = field(default_factory=queue.SimpleQueue)
    connected: threading.Event = field(default_factory=threading.Event)
    published: list[tuple[int, str, bytes]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    subscribed: int = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> tuple[int, int]:
        if topic in self.refuse:
            raise ValueError(f"bad topic {topic!r}")
        mid = len(self.published) + 1
        self.published.append((mid, topic, payload))
        return mid, 0

    def subscribe_commands(self) -> None:
        self.subscribed += 1


@dataclass
class FakeChannel:
    """The inbound side of the link: a queue of commands and the manual acks sent."""

    inbox: queue.SimpleQueue[Inbound] = field(default_factory=queue.SimpleQueue)
    acked: list[int] = field(default_factory=list)

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)


def inbound(topic: str, payload: bytes, mid: int) -> Inbound:
    return Inbound(topic, payload, mid, 1, False, None, None)
