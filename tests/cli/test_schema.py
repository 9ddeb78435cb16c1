"""The MQTT contract: committed schemas equal the models, and real payloads obey them."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_committed_schemas_equal_the_models(capsys: pytest.CaptureFixture[str]) -> None:
    """`ngcal schema --check` over schemas/: a model change without a regenerated file fails."""
    from ngcal.cli.main import main

    rc = main(["schema", "--check", "--out", str(REPO / "schemas")])
    assert rc == 0, capsys.readouterr().out


def test_check_names_a_drifted_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The drift check can fail: an edited schema file is named."""
    from ngcal.cli.main import main

    assert main(["schema", "--out", str(tmp_path)]) == 0
    f = tmp_path / "verdict.schema.json"
    f.write_text(f.read_text().replace('"camera"', '"kamera"', 1))
    assert main(["schema", "--check", "--out", str(tmp_path)]) == 1
    assert "verdict.schema.json" in capsys.readouterr().out


def test_ack_statuses_are_the_daemons() -> None:
    """The documented ack statuses are exactly the daemon's AckStatus."""
    import typing

    from ngcal.core.mqtt_schema import ACK_STATUSES
    from ngcal.daemon.messages import AckStatus

    assert typing.get_args(AckStatus) == ACK_STATUSES


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("mes_client", REPO / "examples/mes_client.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.mqtt
def test_example_mes_client_against_the_real_daemon(tmp_path: Path) -> None:
    """examples/mes_client.py on a real broker and daemon: it receives a verdict, confirms it,
    asks for a recalibration and gets both acks and the event; every payload it received
    validates against the documented models."""
    sys.path.insert(0, str(REPO / "tests" / "daemon"))
    from daemon_kit import (  # type: ignore[import-not-found]
        MOSQUITTO,
        Broker,
        DaemonProcess,
        daemon_config,
        make_tiny_bundle,
        missing,
        write_image,
    )

    from ngcal.core.mqtt_schema import OUTBOUND

    if not os.path.exists(MOSQUITTO):
        missing(f"{MOSQUITTO} not installed (apt-get install mosquitto)")
    broker = Broker(tmp_path / "broker")
    broker.start()
    bundle = make_tiny_bundle(tmp_path / "bundle", threshold=0.5)
    cfg = daemon_config(tmp_path, bundle, broker.port)
    (tmp_path / "watch" / "cam1").mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(cfg, tmp_path)
    got: list[tuple[str, dict[str, Any]]] = []
    arrived = threading.Condition()

    def on_message(topic: str, body: dict[str, Any]) -> None:
        with arrived:
            got.append((topic, body))
            arrived.notify_all()

    def wait(pred: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with arrived:
            while True:
                for topic, body in got:
                    if pred(topic, body):
                        return body
                left = deadline - time.monotonic()
                assert left > 0, (got, daemon.log())
                arrived.wait(left)

    mes = None
    try:
        daemon.start()
        mes = _load_example().MesClient(
            "127.0.0.1", broker.port, device="dev1", on_message=on_message
        )
        write_image(tmp_path / "watch" / "cam1" / "a.png", 250)
        verdict = wait(lambda t, b: t.endswith("/cam1/verdict"))
        rid = mes.confirm(verdict["msg_id"], "NG")
        ack = wait(lambda t, b: t.endswith("/cmd/ack") and b.get("request_id") == rid)
        assert ack["status"] == "accepted"
        rid = mes.recalibrate()
        ack = wait(lambda t, b: t.endswith("/cmd/ack") and b.get("request_id") == rid)
        assert ack["status"] in ("applied", "unchanged", "refused")
        wait(lambda t, b: t.endswith("/recalibration"))
        wait(lambda t, b: t.endswith("/status"))
    finally:
        if mes is not None:
            mes.close()
        daemon.close()
        broker.stop()
    models = {topic.rsplit("/", 1)[-1]: model for topic, model in OUTBOUND.values()}
    checked = set()
    for topic, body in got:
        name = topic.rsplit("/", 1)[-1]
        models[name].model_validate(body)
        checked.add(name)
    assert {"verdict", "ack", "recalibration", "status", "threshold"} <= checked
