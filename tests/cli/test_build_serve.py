"""The whole loop on real data: `ngcal build` on magnetic tile, then the daemon on a real
broker with an MES on MQTT: verdicts, confirmations, a recalibration event."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.mqtt]

BUILD = """fit: {image_size: 128, cv_folds: 4}
glass: {epochs: 2, count: 16, pool_images: 8, hidden: 256}
"""


def test_build_then_serve_on_magnetic_tile(small_category: Path, tmp_path: Path) -> None:
    """Build a bundle from a magnetic-tile subset; the daemon scores dropped test images and
    publishes a verdict for each; an MES confirms the three defective ones NG (accepted)
    and asks for a recalibration, which answers with an ack and a recalibration event."""
    from ngcal.cli.demo_line import Broker, DaemonProcess, Mes, daemon_config, find_mosquitto
    from ngcal.cli.main import main
    from ngcal.core.errors import ConfigError

    try:
        find_mosquitto()
    except ConfigError as e:
        if os.environ.get("NGCAL_CI"):
            pytest.fail(str(e), pytrace=False)
        pytest.skip(str(e))
    cfg = tmp_path / "build.yaml"
    cfg.write_text(BUILD)
    out = tmp_path / "b"
    argv = ["build", "--data", str(small_category), "--out", str(out), "--config", str(cfg)]
    assert main(argv) == 0
    assert (out / "bundle" / "thresholds.json").is_file()

    broker = Broker(tmp_path / "broker")
    broker.start()
    line = tmp_path / "line"
    config = daemon_config(
        line, bundle=out / "bundle", port=broker.port, device="e2e", camera="top"
    )
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    mes = Mes(broker.port, prefix="ngcal", device="e2e")

    def wait(pred: Any, since: int = 0) -> Any:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            daemon.check_alive()
            got = mes.find(pred, since, 0.5)
            if got is not None:
                return got[2]
        raise AssertionError(daemon.log.read_text()[-3000:])

    try:
        daemon.start()
        wait(lambda t, b: t.endswith("/availability") and b == "online")
        dropped = {}
        for sub in ("good", "blowhole", "crack"):
            for src in sorted((small_category / "test" / sub).iterdir())[:3]:
                name = f"{sub}_{src.name}"
                shutil.copyfile(src, line / "camera" / f".{name}.tmp")
                (line / "camera" / f".{name}.tmp").replace(line / "camera" / name)
                dropped[name] = sub
        verdicts = {}
        for name in dropped:
            verdicts[name] = wait(
                lambda t, b, n=name: t.endswith("/top/verdict") and b.get("image") == n
            )
        assert all(v["verdict"] in ("OK", "NG") for v in verdicts.values())
        for name in [n for n, sub in dropped.items() if sub != "good"][:3]:
            mark = mes.mark()
            rid = mes.command("confirm", {"msg_id": verdicts[name]["msg_id"], "label": "NG"})
            ack = wait(
                lambda t, b, r=rid: t.endswith("/cmd/ack") and b.get("request_id") == r, mark
            )
            assert ack["status"] == "accepted", ack
        mark = mes.mark()
        rid = mes.command("recalibrate", {})
        ack = wait(lambda t, b: t.endswith("/cmd/ack") and b.get("request_id") == rid, mark)
        assert ack["status"] in ("applied", "unchanged", "refused"), ack
        event = wait(lambda t, b: t.endswith("/recalibration"), mark)
        assert event["action"] == "recalibrate" and event["reason"]
        assert event["applied"] == (ack["status"] == "applied")
    finally:
        mes.close()
        rc = daemon.stop()
        broker.stop()
    assert rc == 0
