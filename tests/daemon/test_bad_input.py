"""Bad input never stops the daemon: ERROR verdicts with reasons, or logged skips.

Zero-byte, truncated PNG/JPEG, text renamed .png and a 20000x20000 PNG (refused from its
header, before decoding) give ERROR verdicts; a symlink out of the watch folder and a
file deleted before scoring are logged skips; good images before and after still get
their OK/NG verdicts.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from daemon_kit import Subscriber, daemon_config, write_image
from PIL import Image

from ngcal.daemon.config import CameraConfig, IntakeConfig, RecalibrationConfig
from ngcal.daemon.intake import Candidate, Intake
from ngcal.daemon.messages import Topics
from ngcal.daemon.recalibration import ThresholdKeeper
from ngcal.daemon.scoring import ScoringPipeline
from ngcal.daemon.store import Store


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` with a token IDAT: decoding would need
    400 MB, reading the header needs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def noise_bytes(fmt: str) -> bytes:
    arr = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def drop(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.mark.mqtt
def test_bad_files_give_error_verdicts_and_the_service_goes_on(
    tmp_path: Path, broker, daemon_process, tiny_bundle
):
    """Each bad file yields an ERROR verdict naming its reason (or a logged skip), and good
    images around them are still decided."""
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port)
    sub = Subscriber(broker.port, ("ngcal/dev1/+/verdict",)).start()
    d = daemon_process(cfg)
    d.start()
    watch = tmp_path / "watch" / "cam1"
    write_image(watch / "good_before.png", 128)
    drop(watch / "zero.png", b"")
    drop(watch / "trunc.png", noise_bytes("PNG")[:3000])
    drop(watch / "trunc.jpg", noise_bytes("JPEG")[:1500])
    drop(watch / "text.png", b"this is not an image\n" * 10)
    drop(watch / "huge.png", huge_png_header(20000, 20000))
    outside = tmp_path / "outside.png"
    write_image(outside, 0)
    os.symlink(outside, watch / "link.png")
    time.sleep(0.5)
    write_image(watch / "good_after.png", 0)
    sub.wait(lambda: len(sub.on("/verdict")) >= 7, 30, "7 verdicts")
    time.sleep(1.5)  # a verdict for the symlink would arrive by now
    got = {v["image"]: v for v in sub.json_on("/verdict")}
    assert set(got) == {
        "good_before.png",
        "zero.png",
        "trunc.png",
        "trunc.jpg",
        "text.png",
        "huge.png",
        "good_after.png",
    }
    assert got["good_before.png"]["verdict"] == "OK" and got["good_after.png"]["verdict"] == "NG"
    reasons = {k: (v["verdict"], (v["reason"] or "").split(":")[0]) for k, v in got.items()}
    assert reasons["zero.png"] == ("ERROR", "empty")
    assert reasons["trunc.png"] == ("ERROR", "truncated")
    assert reasons["trunc.jpg"][0] == "ERROR" and reasons["trunc.jpg"][1] in (
        "truncated",
        "corrupt",
    )
    assert reasons["text.png"] == ("ERROR", "not_an_image")
    assert reasons["huge.png"] == ("ERROR", "too_large")
    assert all(v["score"] is None for k, v in got.items() if not k.startswith("good"))
    deadline = time.monotonic() + 15  # symlinks give no close event: the scan finds it
    while "symlink_outside_watch_folder" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.2)
    assert len(sub.on("/verdict")) == 7
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert d.terminate() == 0
    sub.stop()


def test_file_deleted_before_scoring_is_a_logged_skip(tmp_path: Path, tiny_bundle, caplog):
    """A queued file that vanishes before it is read gets no verdict and a logged reason;
    the next file is still scored."""
    from ngcal.core.bundle import open_bundle
    from ngcal.core.runtime import open_scorer

    watch = tmp_path / "watch"
    watch.mkdir()
    store = Store(tmp_path / "state")
    bundle = open_bundle(tiny_bundle)
    scorer = open_scorer(bundle, max_batch=4)
    topics = Topics("ngcal", "dev1")
    keeper = ThresholdKeeper(store, tmp_path / "state", bundle, RecalibrationConfig(), topics)
    intake = Intake(
        [CameraConfig(id="cam1", watch=watch)], IntakeConfig(), store, on_skip=lambda c, r: None
    )
    commits: list[int] = []
    pipe = ScoringPipeline(
        device="dev1",
        source=intake.queue,
        done=intake.done,
        scorer=scorer,
        keeper=keeper,
        store=store,
        topics=topics,
        model_sha256=bundle.model_sha256,
        batch_size=4,
        max_pixels=10_000_000,
        on_commit=commits.append,
    )
    write_image(watch / "kept.png", 128)
    intake.queue.put(Candidate("cam1", watch / "gone.png", "gone.png", time.time()))
    intake.queue.put(Candidate("cam1", watch / "kept.png", "kept.png", time.time()))
    with caplog.at_level(logging.WARNING, logger="ngcal.daemon.scoring"):
        pipe.start()
        deadline = time.monotonic() + 10
        while not commits and time.monotonic() < deadline:
            time.sleep(0.05)
        pipe.stop(timeout=2)
    rows = store.query("SELECT path, verdict FROM verdicts")
    assert rows == [("kept.png", "OK")]
    assert any("gone.png: deleted before scoring" in r.getMessage() for r in caplog.records)
    store.close()
    scorer.close()
