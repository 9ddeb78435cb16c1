"""The one long-lived MQTT client (paho-mqtt 2, callback API v2, MQTT v5).

paho runs its own network thread (``loop_start``) and its own reconnect with back-off.
The callbacks here do nothing but put typed events on two queues: ``events`` (connection
changes and PUBACKs, consumed by the relay) and ``inbox`` (commands, consumed by the
command handler). They never take a lock that ``publish()`` callers hold.

Session: a stable client id, ``clean_start=False`` and a session-expiry interval, so the
broker keeps the command subscription and queues QoS 1 commands while the daemon is
away; commands are acknowledged manually (``manual_ack=True`` and ``client.ack``) only
after the handler committed them. The will message sets availability ``offline``.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ngcal.core.errors import BackendError

from .config import MqttConfig
from .messages import Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """One inbound command PUBLISH; ``mid``/``qos`` are needed to acknowledge it."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool
    response_topic: str | None
    correlation: bytes | None


@dataclass(frozen=True)
class Connected:
    """CONNACK success; ``receive_max`` is the broker's MQTT v5 Receive Maximum, if sent."""

    session_present: bool
    receive_max: int | None


@dataclass(frozen=True)
class ConnectFailed:
    """No connection: TCP/TLS failure or a CONNACK refusal; ``reason`` names host:port."""

    reason: str


@dataclass(frozen=True)
class Disconnected:
    """An established connection ended."""

    reason: str


@dataclass(frozen=True)
class PubAck:
    """The broker's answer to one QoS 1 publish (``code`` >= 0x80 is a refusal)."""

    mid: int
    code: int
    name: str


LinkEvent = Connected | ConnectFailed | Disconnected | PubAck


class MqttLink:
    """Owns the paho client; exposes publish/ack and the two callback queues."""

    def __init__(
        self, cfg: MqttConfig, topics: Topics, *, client_id: str, reconnect_max_s: int = 30
    ) -> None:
        self.cfg = cfg
        self.topics = topics
        self.client_id = client_id
        self.reconnect_max_s = reconnect_max_s
        self.events: queue.SimpleQueue[LinkEvent] = queue.SimpleQueue()
        self.inbox: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self.connected = threading.Event()
        self._client: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the client, set the will, connect asynchronously and start paho's loop."""
        for w in security_warnings(self.cfg):
            log.warning("%s", w)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.max_inflight_messages_set(self.cfg.max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=self.reconnect_max_s)
        c.will_set(self.topics.availability, b"offline", qos=1, retain=True)
        if self.cfg.username is not None:
            c.username_pw_set(self.cfg.username, self.cfg.password())
        if self.cfg.tls is not None:
            t = self.cfg.tls
            c.tls_set(
                ca_certs=None if t.ca_file is None else str(t.ca_file),
                certfile=None if t.cert_file is None else str(t.cert_file),
                keyfile=None if t.key_file is None else str(t.key_file),
            )
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_pre_connect = self._on_pre_connect
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        self._client = c
        try:
            c.connect_async(
                self.cfg.host,
                self.cfg.port,
                keepalive=self.cfg.keepalive,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as e:
            raise BackendError(f"mqtt {self.cfg.host}:{self.cfg.port}: cannot connect ({e})") from e
        c.loop_start()

    def stop(self, *, offline_timeout: float = 5.0) -> None:
        """Publish availability ``offline`` (when connected), disconnect, stop the loop."""
        c = self._client
        if c is None:
            return
        if self.connected.is_set():
            info = c.publish(self.topics.availability, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=offline_timeout)
            except (RuntimeError, ValueError) as e:
                log.warning("could not publish offline: %s", e)
        c.disconnect()
        c.loop_stop()
        self._client = None

    # ------------------------------------------------------------------ calls from workers
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> tuple[int, int]:
        """Queue a QoS 1 publish; returns (mid, paho rc). paho resends it after a reconnect."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        return int(info.mid), int(info.rc)

    def subscribe_commands(self) -> None:
        """Subscribe to ``<p>/<device>/cmd/{confirm,recalibrate,rollback}`` at QoS 1."""
        self._client.subscribe([(t, 1) for t in self.topics.commands])

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge an inbound PUBLISH (after its command was committed)."""
        if self._client is not None and qos > 0:
            self._client.ack(mid, qos)

    # ------------------------------------------------------------------ paho callbacks
    @property
    def where(self) -> str:
        """``host:port`` of the broker (named in every connection log line and alarm)."""
        return f"{self.cfg.host}:{self.cfg.port}"

    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        if self.cfg.username is not None:  # secrets are read at use, on every (re)connect
            try:
                client.username_pw_set(self.cfg.username, self.cfg.password())
            except Exception as e:  # noqa: BLE001 - reported, paho retries
                self.events.put(ConnectFailed(f"mqtt {self.where}: password: {e}"))

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.connected.clear()
            hint = _CONNACK_HINTS.get(int(rc.value), "")
            self.events.put(ConnectFailed(f"mqtt {self.where}: connection refused: {rc}{hint}"))
        else:
            self.connected.set()
            receive_max = getattr(props, "ReceiveMaximum", None) if props is not None else None
            rm = receive_max if isinstance(receive_max, int) and receive_max > 0 else None
            self.events.put(Connected(bool(flags.session_present), rm))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the error is still current
        err = sys.exc_info()[1]
        self.events.put(ConnectFailed(f"mqtt {self.where}: {describe_connect_error(err)}"))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected.clear()
        self.events.put(Disconnected(f"mqtt {self.where}: {rc}"))

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.events.put(PubAck(mid, int(rc.value), str(rc)))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        self.inbox.put(
            Inbound(
                topic=msg.topic,
                payload=bytes(msg.payload),
                mid=int(msg.mid),
                qos=int(msg.qos),
                retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation=getattr(props, "CorrelationData", None),
            )
        )


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (traffic never leaves the machine)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warnings(cfg: MqttConfig) -> list[str]:
    """Why this broker link is not secure: TLS or authentication off for a remote broker."""
    if is_loopback(cfg.host):
        return []
    where = f"{cfg.host}:{cfg.port}"
    out = []
    if cfg.tls is None:
        out.append(
            f"warning: mqtt.tls is off for the non-loopback broker {where}: verdicts, "
            "commands and the password cross the network in clear text"
        )
    if cfg.username is None:
        out.append(
            f"warning: mqtt authentication is off (no mqtt.username) for the non-loopback "
            f"broker {where}: anyone who reaches it can send commands"
        )
    return out


#: CONNACK reason codes an operator can fix in the config (MQTT v5; 0x87 is what Mosquitto
#: answers to a wrong password)
_CONNACK_HINTS = {
    0x85: " (check mqtt.client_id)",
    0x86: " (check mqtt.username and the password)",
    0x87: " (check mqtt.username and the password)",
    0x8C: " (check the authentication method)",
}


def describe_connect_error(err: BaseException | None) -> str:
    """One line for a failed TCP/TLS connection (a TLS failure says so: wrong CA, name)."""
    if err is None:
        return "no connection"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {err.verify_message} (check mqtt.tls.ca_file)"
    if isinstance(err, ssl.SSLError):
        return f"TLS handshake failed: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (no broker listening)"
    return f"no connection ({type(err).__name__}: {err})"
