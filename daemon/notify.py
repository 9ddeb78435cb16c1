"""systemd ``sd_notify`` without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

Protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments sent as one datagram
to the AF_UNIX socket named in ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the
abstract namespace (replaced by a NUL byte). Without the variable every call is a no-op,
so the daemon runs the same under systemd, in a container or in a test.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to systemd when it is listening."""

    def __init__(self, address: str | None = None) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return bool(self.address)

    def watchdog_interval_s(self) -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds when systemd expects pings (for this pid)."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased); False when disabled or on error."""
        if not self.address:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        addr = self.address
        target = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # a reader that stopped reading must not block us
            self._sock.sendto(msg, target)
            return True
        except BlockingIOError:
            log.debug("sd_notify to %s dropped: the receiver's queue is full", addr)
            return False
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", addr, e)
            return False

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(stopping=1, status=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
