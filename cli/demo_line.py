"""The demo's production line: a private Mosquitto, the daemon as a process, an MES on MQTT.

``ngcal demo`` uses these to run the edge half of the product for real: the broker listens
on a free loopback port with its files in the demo folder; the daemon is ``ngcal serve``
in its own process with a generated config; :class:`Mes` is what a plant's MES does over
MQTT (subscribe to verdicts, publish ``cmd/confirm`` and ``cmd/recalibrate``, read the
``cmd/ack`` answers and the ``recalibration`` event). Nothing here is a test double.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ngcal.core.errors import ConfigError, NgcalError

#: the demo line's recalibration guard rails; the cost-gain guard asks 50% confidence that a
#: move lowers the expected cost (the daemon's default is 90%): a line of 19 parts cannot
#: make a gain that sure, and the demo is there to show a move and its reasons
MIN_REAL_NG, MAX_STEP, GAIN_LEVEL = 3, 0.10, 0.5
INSTALL_HINT = (
    "install it: sudo apt-get install mosquitto (Debian/Ubuntu; brew install mosquitto on macOS)"
)


def find_mosquitto() -> str:
    """The mosquitto binary, or a ConfigError that says how to install it."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        raise ConfigError(
            f"the demo needs the Mosquitto MQTT broker, which is not installed; {INSTALL_HINT}"
        )
    return found


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A private Mosquitto on 127.0.0.1 (anonymous, loopback only), files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = find_mosquitto()
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"user {getpass.getuser()}",
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence false",
                    f"log_dest file {self.root / 'mosquitto.log'}",
                ]
            )
            + "\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise NgcalError(
            f"mosquitto did not start on 127.0.0.1:{self.port}; see {self.root / 'mosquitto.log'}"
        )

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> int | None:
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def daemon_config(
    root: Path,
    *,
    bundle: Path,
    port: int,
    device: str,
    camera: str,
    prevalence: float | None = None,
    cost_ratio: float | None = None,
) -> Path:
    """A daemon config for the demo line: one camera folder, the private broker, and the
    operating point the bundle was calibrated at (None: the daemon's default)."""
    op = "".join(
        f"  {k}: {v}\n" for k, v in (("prevalence", prevalence), ("cost_ratio", cost_ratio)) if v
    )
    text = f"""# written by ngcal demo
device_id: {device}
bundle: {bundle.resolve()}
state_dir: {(root / "state").resolve()}
cameras:
  - id: {camera}
    watch: {(root / "camera").resolve()}
intake:
  settle_seconds: 0.2
  rescan_seconds: 2
mqtt:
  host: 127.0.0.1
  port: {port}
  keepalive: 10
recalibration:
  min_real_ng: {MIN_REAL_NG}
  max_step: {MAX_STEP}
  gain_level: {GAIN_LEVEL}
{op}service:
  status_interval_s: 5
  drain_timeout_s: 5
"""
    (root / "camera").mkdir(parents=True, exist_ok=True)
    path = root / "daemon.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def serve_argv(config: Path) -> list[str]:
    """The command line of ``ngcal serve --config C`` in this Python, verbose (INFO logs)."""
    return [sys.executable, "-m", "ngcal.cli.main", "-v", "serve", "--config", str(config)]


class DaemonProcess:
    """``ngcal serve --config C`` in its own process; its output goes to ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                serve_argv(self.config),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise NgcalError(f"the daemon exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> int | None:
        rc = _terminate(self.proc)
        self.proc = None
        return rc


class Mes:
    """What an MES does over MQTT: read verdicts and events, send confirmations and commands."""

    def __init__(self, port: int, *, prefix: str, device: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.base = f"{prefix}/{device}"
        self.messages: list[tuple[str, dict[str, Any] | str]] = []
        self._arrived = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ngcal-demo-mes-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.subscribe(f"{self.base}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        try:
            body: dict[str, Any] | str = json.loads(msg.payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = msg.payload.decode("utf-8", "replace")
        with self._arrived:
            self.messages.append((str(msg.topic), body))
            self._arrived.notify_all()

    def mark(self) -> int:
        """A position in the received messages: :meth:`find` looks from here on."""
        with self._arrived:
            return len(self.messages)

    def find(
        self, match: Callable[[str, Any], bool], since: int, timeout: float
    ) -> tuple[int, str, Any] | None:
        """The first message at or after ``since`` that ``match``es, as (index, topic, body);
        waits up to ``timeout`` seconds for it, else None."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            i = since
            while True:
                while i < len(self.messages):
                    topic, body = self.messages[i]
                    if match(topic, body):
                        return i, topic, body
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)

    def command(self, kind: str, body: dict[str, Any]) -> str:
        """Publish ``cmd/<kind>`` (QoS 1) with a fresh ``request_id``; returns that id."""
        rid = f"demo-{kind}-{uuid.uuid4().hex[:8]}"
        info = self.client.publish(
            f"{self.base}/cmd/{kind}",
            json.dumps({"request_id": rid, "operator": "demo-operator", **body}),
            qos=1,
        )
        info.wait_for_publish(timeout=10)
        return rid

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
