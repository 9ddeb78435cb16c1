"""Helpers for the daemon tests: a real Mosquitto, a real tiny ONNX bundle, a subscriber.

The broker runs from ``/usr/sbin/mosquitto -c <generated conf>`` on a free loopback port
with its persistence in the test's tmp dir (never the system broker, never the network).
The bundle is a real ONNX graph run by the real onnxruntime session: ``anomaly_map`` is
the mean absolute input over channels [N, S, S] and ``image_score`` its spatial mean [N],
so a brighter image (after the 0.5/0.5 normalisation, further from mid-grey) scores higher.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ngcal.cli.demo_line import serve_argv


def missing(reason: str) -> None:
    """Skip for a missing system tool, except under CI (``NGCAL_CI=1``, set by ``.ci/run``),
    which installs every tool the tests need: there a missing tool fails the test."""
    if os.environ.get("NGCAL_CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)", pytrace=False)
    pytest.skip(reason)


MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
TINY_SIZE = 32
TINY_MODEL_SHA = "ab" * 32


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One Mosquitto process with a generated config; restartable on the same port and data."""

    def __init__(
        self,
        root: Path,
        *,
        acl: str | None = None,
        users: dict[str, str] | None = None,
        tls: Pki | None = None,
    ):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            # run as whoever runs the tests (as root, mosquitto would switch to 'mosquitto'
            # and could not write into the test's private tmp dir)
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.root}/",
            "autosave_interval 1",
            f"log_dest file {self.root}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
        if users:
            pw = self.root / "passwd"
            pw.write_text("")
            for u, p in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(pw), u, p], check=True, capture_output=True
                )
            lines += [f"password_file {pw}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (self.root / "acl").write_text(acl)
            lines.append(f"acl_file {self.root / 'acl'}")
        self.conf = self.root / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    log = (self.root / "mosquitto.log").read_text(errors="replace")
                    raise RuntimeError(f"mosquitto exited: {log[-2000:]}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen within 10 s")

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file on a clean stop)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate it signed (for 127.0.0.1 and localhost), PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_pki(root: Path, *, name: str = "test-ca") -> Pki:
    """Generate a fresh CA and server key/certificate under ``root`` (EC P-256, 1 day)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(root / "ca.pem", root / "server.pem", root / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return pki


# ---------------------------------------------------------------------- tiny bundle


def make_tiny_bundle(root: Path, *, threshold: float = 1.0, n_normal: int = 50) -> Path:
    """A real bundle: tiny ONNX graph, manifest with hashes, a normal score set, thresholds."""
    import onnx
    from onnx import TensorProto, helper

    from ngcal.core.manifest import (
        BackboneSpec,
        BundleManifest,
        PatchCoreSpec,
        Preprocessing,
        write_manifest,
    )
    from ngcal.core.scoresets import ScoreSet, save_scoreset
    from ngcal.core.thresholds import ThresholdFile, save_thresholds

    root.mkdir(parents=True, exist_ok=True)
    s = TINY_SIZE
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, s, s])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", s, s])
    score = helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["N"])
    nodes = [
        helper.make_node("Abs", ["image"], ["absx"]),
        helper.make_node("ReduceMean", ["absx"], ["anomaly_map"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map"], ["image_score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [amap, score])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "model.onnx"))
    rng = np.random.default_rng(0)
    save_scoreset(
        root / "scores" / "normal_loo.json",
        ScoreSet(
            source="normal_loo",
            scores=rng.uniform(0.0, 0.8, n_normal),
            item_ids=tuple(f"good/{i:03d}.png" for i in range(n_normal)),
            model_sha256=TINY_MODEL_SHA,
        ),
    )
    manifest = BundleManifest(
        model_sha256=TINY_MODEL_SHA,
        backbone=BackboneSpec(name="tiny", layers=(0,), weights="none", weights_sha256="0" * 64),
        preprocessing=Preprocessing(image_size=s),
        patchcore=PatchCoreSpec(
            feature_dim=1,
            raw_feature_dim=1,
            feature_map_size=(s, s),
            coreset_ratio=1.0,
            coreset_size=1,
            num_train_images=1,
            image_score="mean",
        ),
    )
    write_manifest(root, manifest, ["model.onnx", "scores/normal_loo.json"])
    save_thresholds(
        root / "thresholds.json",
        ThresholdFile(value=threshold, mode="fixed", method="test", model_sha256=TINY_MODEL_SHA),
    )
    return root


def write_image(path: Path, grey: int, *, size: int = 48, fmt: str | None = None) -> None:
    """A uniform grey image written atomically (temp name, then rename into place)."""
    arr = np.full((size, size), grey, dtype=np.uint8)
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(arr, mode="L").save(
        tmp, format=fmt or path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
    )
    os.replace(tmp, path)


# ---------------------------------------------------------------------- config + daemon


def daemon_config(
    tmp: Path,
    bundle: Path,
    port: int,
    *,
    cameras: tuple[str, ...] = ("cam1",),
    device: str = "dev1",
    extra_mqtt: str = "",
    extra: str = "",
    rescan: float = 2.0,
    batch: int = 4,
) -> Path:
    cams = "\n".join(f"  - id: {c}\n    watch: {tmp / 'watch' / c}" for c in cameras)
    for c in cameras:  # a missing watch folder is refused (a typo is never watched silently)
        (tmp / "watch" / c).mkdir(parents=True, exist_ok=True)
    text = f"""device_id: {device}
bundle: {bundle}
state_dir: {tmp / "state"}
cameras:
{cams}
runtime:
  batch_size: {batch}
intake:
  settle_seconds: 0.2
  rescan_seconds: {rescan}
  queue_size: 64
mqtt:
  host: 127.0.0.1
  port: {port}
  keepalive: 5
{extra_mqtt}service:
  status_interval_s: 2
  drain_timeout_s: 5
{extra}"""
    path = tmp / "daemon.yaml"
    path.write_text(text)
    return path


class NotifySocket:
    """A real unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, key: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for m in self.messages:
            if key in m.split("\n"):
                return m
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(data)
            if key in data.split("\n"):
                return data
        raise AssertionError(f"no {key!r} on the notify socket within {timeout} s: {self.messages}")

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """``python -m ngcal.cli.main serve --config X`` as a real subprocess."""

    def __init__(self, config: Path, tmp: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.tmp = tmp
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.runs = 0

    def start(self, *, wait_ready: bool = True) -> None:
        self.runs += 1
        sock_path = self.tmp / f"notify{self.runs}.sock"
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(sock_path)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), **self.env)
        with open(self.tmp / f"daemon{self.runs}.log", "wb") as log:
            self.proc = subprocess.Popen(
                serve_argv(self.config),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait_ready:
            try:
                self.notify.wait_for("READY=1", timeout=60)
            except AssertionError:
                raise AssertionError(self.log()) from None

    def log(self) -> str:
        return (self.tmp / f"daemon{self.runs}.log").read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.notify is not None:
            self.notify.close()


# ---------------------------------------------------------------------- subscriber


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float


@dataclass
class Subscriber:
    """A paho client collecting every message on ``filters`` (MQTT v5, QoS 1)."""

    port: int
    filters: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    client_id: str = "test-subscriber"
    persistent: bool = False
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Subscriber:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.connected = threading.Event()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.ca is not None:
            c.tls_set(ca_certs=str(self.ca))
        c.reconnect_delay_set(1, 1)

        def on_connect(cl: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                for f in self.filters:
                    cl.subscribe(f, qos=1)
                self.connected.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            with self.lock:
                self.messages.append(
                    Received(msg.topic, bytes(msg.payload), bool(msg.retain), time.time())
                )

        c.on_connect = on_connect
        c.on_message = on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if self.persistent else 0
        c.connect(
            "127.0.0.1", self.port, keepalive=5, clean_start=not self.persistent, properties=props
        )
        c.loop_start()
        self.client = c
        assert self.connected.wait(10), "subscriber did not connect"
        time.sleep(0.2)  # let the SUBACK arrive
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: dict[str, Any] | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(5)

    def on(self, suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.on(suffix)]

    def wait(self, pred: Callable[[], bool], timeout: float, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def record_line_part(
    store: Any,
    i: int,
    score: float,
    threshold: Any,
    *,
    draw: Callable[[str], bool] | None = None,
) -> tuple[str, bool]:
    """A simulated line's part ``i``: its verdict at ``threshold`` (a ThresholdFile),
    audited when OK and ``draw(msg_id)`` says so, recorded in ``store``. Returns the
    verdict ("OK"/"NG") and whether it was drawn for audit."""
    from ngcal.daemon.messages import Outbound, Verdict

    label = "NG" if score >= threshold.value else "OK"
    mid = f"{i:032x}"
    drawn = label == "OK" and draw is not None and draw(mid)
    v = Verdict(
        msg_id=mid,
        camera="c",
        path=f"{mid}.png",
        size=1,
        mtime_ns=1,
        sha256=mid,
        verdict=label,
        reason=None,
        score=score,
        threshold=threshold.value,
        threshold_version=threshold.version,
        model_sha256=TINY_MODEL_SHA,
        detected_at=float(i),
        decided_at=float(i),
        audit=drawn,
    )
    store.record_verdicts([(v, Outbound("t", v.payload(), mid))])
    return label, drawn


def confirm_line_part(store: Any, i: int, label: str, score: float) -> None:
    """The operator's confirmation (``label``) of the simulated line's part ``i``."""
    from ngcal.daemon.store import add_confirmation

    mid = f"{i:032x}"
    with store.tx() as c:
        add_confirmation(
            c, f"r{i}", msg_id=mid, sha256=mid, label=label, score=score, operator="qa"
        )
