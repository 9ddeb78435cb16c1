"""The clock seam: monotonic and wall time, sleeping and waiting on an event.

Workers take a ``Clock`` instead of calling ``time`` directly, so unit tests drive time
with a fake (``sleep`` advances it at once) and never sleep for real. ``SYSTEM_CLOCK`` is
the real one every production part uses by default.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """What a worker needs from time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (deadlines, heartbeats)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (timestamps written to the database and messages)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Pause the calling thread."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` passes; True when it is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(timeout)


SYSTEM_CLOCK: Clock = SystemClock()
