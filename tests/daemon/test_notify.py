"""systemd notify protocol against a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from ngcal.daemon.notify import Notifier


def test_notify_sends_datagrams_to_a_path_socket(tmp_path, monkeypatch):
    """READY/STATUS/WATCHDOG/STOPPING arrive as KEY=VALUE lines on $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier()
    assert n.enabled
    assert n.ready("up")
    assert srv.recv(1024) == b"READY=1\nSTATUS=up"
    assert n.watchdog()
    assert srv.recv(1024) == b"WATCHDOG=1"
    assert n.stopping("bye")
    assert srv.recv(1024) == b"STOPPING=1\nSTATUS=bye"
    n.close()
    srv.close()


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="abstract sockets are Linux-only")
def test_notify_handles_abstract_namespace(monkeypatch):
    """A leading '@' names an abstract socket (NUL byte), as systemd sets it."""
    name = f"ngcal-test-{uuid.uuid4().hex}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind("\0" + name)
    srv.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    n = Notifier()
    assert n.status("hello")
    assert srv.recv(1024) == b"STATUS=hello"
    n.close()
    srv.close()


def test_notify_without_socket_is_a_noop(monkeypatch):
    """Outside systemd every call returns False and nothing fails."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready("x") and not n.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(monkeypatch):
    """WATCHDOG_USEC is honoured only when WATCHDOG_PID is unset or ours."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval_s() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval_s() is None


@pytest.mark.mqtt
def test_daemon_reports_ready_watchdog_and_stopping(tmp_path, broker, daemon_process, tiny_bundle):
    """The real daemon sends READY after start-up, WATCHDOG pings while healthy, and
    STOPPING on SIGTERM, over a fake NOTIFY_SOCKET."""
    from daemon_kit import daemon_config

    cfg = daemon_config(tmp_path, tiny_bundle, broker.port)
    d = daemon_process(cfg, env={"WATCHDOG_USEC": "1000000"})
    d.start()
    assert d.notify is not None
    ready = d.notify.wait_for("READY=1", 1)
    assert "STATUS=ready: onnxruntime:CPUExecutionProvider" in ready
    d.notify.wait_for("WATCHDOG=1", 10)
    assert d.terminate() == 0
    d.notify.wait_for("STOPPING=1", 5)


def test_notify_never_blocks_when_the_receiver_stops_reading(tmp_path, monkeypatch):
    """A full receive queue drops messages instead of blocking the daemon's main thread."""
    path = tmp_path / "stuck.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier()
    t0 = time.monotonic()
    results = [n.status("x" * 512) for _ in range(5000)]
    assert time.monotonic() - t0 < 5
    assert results[0] and not results[-1]  # the first went through, later ones were dropped
    n.close()
    srv.close()
