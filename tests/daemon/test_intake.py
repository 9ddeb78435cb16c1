"""Intake: files are taken when complete, scanned at start-up, and queued with back-pressure."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

from daemon_kit import write_image

from ngcal.daemon.config import CameraConfig, IntakeConfig
from ngcal.daemon.intake import Candidate, Intake
from ngcal.daemon.store import Store


def make_intake(tmp_path: Path, **cfg: object) -> tuple[Intake, Path, Store]:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    store = Store(tmp_path / "state")
    skips: list[tuple[Candidate, str]] = []
    intake = Intake(
        [CameraConfig(id="cam", watch=watch)],
        IntakeConfig(settle_seconds=0.2, rescan_seconds=60, **cfg),  # type: ignore[arg-type]
        store,
        on_skip=lambda c, r: skips.append((c, r)),
    )
    intake.skips = skips  # type: ignore[attr-defined]
    return intake, watch, store


def take(intake: Intake, timeout: float) -> Candidate | None:
    try:
        return intake.queue.get(timeout=timeout)
    except queue.Empty:
        return None


def test_open_file_is_taken_only_after_close(tmp_path):
    """With inotify, a file still being written (writer paused longer than settle_seconds)
    is not offered until it is closed; then it is offered once, complete."""
    intake, watch, store = make_intake(tmp_path)
    intake.start()
    try:
        data = os.urandom(200_000)
        with open(watch / "slow.png", "wb") as f:
            f.write(data[:1000])
            f.flush()
            assert take(intake, 0.8) is None, "offered while still open for writing"
            f.write(data[1000:])
        cand = take(intake, 5)
        assert cand is not None and cand.rel == "slow.png"
        assert cand.path.stat().st_size == len(data)
        intake.done(cand)
        assert take(intake, 0.5) is None, "offered twice"
    finally:
        intake.stop()
        store.close()


def test_polling_mode_takes_files_once_their_size_is_stable(tmp_path):
    """The polling observer (no close events) offers files after settle_seconds."""
    intake, watch, store = make_intake(tmp_path, polling=True)
    intake.start()
    try:
        write_image(watch / "a.png", 10)
        (watch / "b.png").write_bytes(b"\x89PNG not really")
        got = {c.rel for c in (take(intake, 5), take(intake, 5)) if c is not None}
        assert got == {"a.png", "b.png"}
    finally:
        intake.stop()
        store.close()


def test_startup_scan_offers_unknown_files_with_back_pressure(tmp_path):
    """Files present before start are offered by the reconciliation scan; with a queue of 2
    the scan waits for room instead of dropping; hidden/temp/non-image names are ignored."""
    intake, watch, store = make_intake(tmp_path, queue_size=2)
    for i in range(6):
        write_image(watch / f"f{i}.png", i)
    (watch / ".hidden.png").write_bytes(b"x")
    (watch / "upload.png.part").write_bytes(b"x")
    (watch / "notes.txt").write_text("x")
    old = time.time() - 10
    for p in watch.iterdir():
        os.utime(p, (old, old))
    intake.start()
    try:
        time.sleep(0.5)
        assert intake.queue.qsize() == 2  # full: the scan is blocked, not dropping
        seen = []
        while (c := take(intake, 2)) is not None:
            seen.append(c.rel)
            intake.done(c)
        assert sorted(seen) == [f"f{i}.png" for i in range(6)]
    finally:
        intake.stop()
        store.close()


def test_symlink_out_of_the_folder_is_refused_with_a_reason(tmp_path):
    """A symlink whose target lies outside the watch folder is skipped (once) with a reason;
    a symlink inside the folder is accepted."""
    intake, watch, store = make_intake(tmp_path)
    write_image(tmp_path / "outside.png", 1)
    write_image(watch / "inside.png", 1)
    os.symlink(tmp_path / "outside.png", watch / "evil.png")
    os.symlink(watch / "inside.png", watch / "alias.png")
    old = time.time() - 10
    for p in watch.iterdir():
        os.utime(p, (old, old), follow_symlinks=False)
    assert intake.scan() == 2
    assert {intake.queue.get_nowait().rel for _ in range(2)} == {"inside.png", "alias.png"}
    skips = intake.skips  # type: ignore[attr-defined]
    assert [(c.rel, r.split(" ")[0]) for c, r in skips] == [
        ("evil.png", "symlink_outside_watch_folder")
    ]
    intake.scan()
    assert len(skips) == 1, "a refused file is logged once, not on every scan"
    store.close()


def test_a_file_name_that_is_not_utf8_is_refused_once_and_never_stalls_the_scan(tmp_path, caplog):
    """A name with undecodable bytes cannot be stored or published: it is skipped with one
    warning, and the files sorted after it are still offered (on every scan)."""
    import logging

    intake, watch, store = make_intake(tmp_path)
    write_image(watch / "a.png", 1)
    write_image(watch / "z.png", 1)
    bad = os.path.join(os.fsencode(watch), b"m\xff.png")
    with open(bad, "wb") as f:
        f.write((watch / "a.png").read_bytes())
    old = time.time() - 10
    for p in watch.iterdir():
        os.utime(p, (old, old))
    with caplog.at_level(logging.WARNING, logger="ngcal.daemon.intake"):
        assert intake.scan() == 2
        intake.done(intake.queue.get_nowait())
        intake.done(intake.queue.get_nowait())
        intake.scan()
    warned = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warned) == 1 and "m\\udcff.png" in warned[0]
    store.close()
