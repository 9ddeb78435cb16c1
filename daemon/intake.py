"""Taking files from the watch folders: events, size-stable polling, reconciliation scans.

A file is taken when it is complete: an inotify close-after-write or a move into the
folder (watchdog ``on_closed`` / ``on_moved``), or, where only creation/modification is
seen (polling observer, network file systems), once its size and mtime have not changed
for ``settle_seconds``. A reconciliation scan at start-up and every ``rescan_seconds``
offers every settled file version the state database does not know, so a missed event, a
queue overflow or a crash never loses a file (with inotify, a file younger than
``settle_seconds`` at scan time waits for its close event or the next scan: a writer's
pause is never taken for the end of the file). The queue is bounded: events that find it full are
dropped and trigger an early scan; the scan itself blocks (back-pressure).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEventHandler

from ngcal.core.images import IMAGE_SUFFIXES

from .config import CameraConfig, IntakeConfig
from .store import Store

log = logging.getLogger(__name__)

_TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


@dataclass(frozen=True)
class Candidate:
    """A file offered for scoring; ``rel`` is its path relative to the watch folder."""

    camera: str
    path: Path
    rel: str
    detected_at: float


class CameraFolder:
    """Which files of one camera's folder are images to score."""

    def __init__(self, cam: CameraConfig) -> None:
        self.id = cam.id
        self.root = cam.watch
        self.real_root = Path(os.path.realpath(cam.watch))
        self.glob = cam.glob
        self.recursive = cam.recursive
        self._unnamable: set[str] = set()

    def rel(self, path: Path) -> str | None:
        """Path relative to the folder, or None when the file is not ours to score.

        A name that is not valid UTF-8 cannot be stored or published: it is refused with
        one warning (it would otherwise fail, and be offered again, on every scan).
        """
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        parts = rel.parts
        if not parts or (len(parts) > 1 and not self.recursive):
            return None
        if any(p.startswith(".") for p in parts):
            return None
        name = parts[-1]
        if name.lower().endswith(_TEMP_SUFFIXES):
            return None
        if self.glob is not None:
            if not fnmatch.fnmatch(name, self.glob):
                return None
        elif Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            return None
        text = rel.as_posix()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "backslashreplace").decode()
            if shown not in self._unnamable:
                self._unnamable.add(shown)
                log.warning("skip %s/%s: file name is not valid UTF-8", self.id, shown)
            return None
        return text

    def refuse_reason(self, path: Path) -> str | None:
        """Why a file must not be read: a symlink leading out of the folder, or not a file."""
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            if not target.is_relative_to(self.real_root):
                return f"symlink_outside_watch_folder (-> {target})"
        if path.exists() and not path.is_file():
            return "not_a_regular_file"
        return None

    def walk(self) -> list[Path]:
        """Every candidate file now in the folder (sorted)."""
        out: list[Path] = []
        if not self.root.is_dir():
            return out
        it = self.root.rglob("*") if self.recursive else self.root.iterdir()
        for p in it:
            if self.rel(p) is not None:
                out.append(p)
        out.sort()
        return out


class Intake:
    """Observers, the young-file tracker, the reconciliation scan and the bounded queue."""

    def __init__(
        self,
        cameras: list[CameraConfig],
        cfg: IntakeConfig,
        store: Store,
        *,
        on_skip: Callable[[Candidate, str], None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.folders = {c.id: CameraFolder(c) for c in cameras}
        self.queue: queue.Queue[Candidate] = queue.Queue(maxsize=cfg.queue_size)
        self._on_skip = on_skip
        self._pending: set[tuple[str, str]] = set()
        self._young: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._lock = threading.Lock()
        self._rescan = threading.Event()
        self._stop = threading.Event()
        self._observers: list[Any] = []
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.dropped_events = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the observers, then the scan thread (which scans at once)."""
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        for folder in self.folders.values():
            folder.root.mkdir(parents=True, exist_ok=True)
            obs = (
                PollingObserver(timeout=max(self.cfg.settle_seconds, 0.5))
                if self.cfg.polling
                else Observer()
            )
            obs.schedule(_Handler(self, folder), str(folder.root), recursive=folder.recursive)
            obs.daemon = True
            obs.start()
            self._observers.append(obs)
        self._thread = threading.Thread(target=self._scan_loop, name="ngcal-scan", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop taking new files (queued ones stay for the worker to drain)."""
        self._stop.set()
        self._rescan.set()
        for obs in self._observers:
            obs.stop()
        for obs in self._observers:
            obs.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def request_scan(self) -> None:
        self._rescan.set()

    def done(self, cand: Candidate) -> None:
        """The worker finished ``cand`` (committed or skipped): it may be offered again."""
        with self._lock:
            self._pending.discard((cand.camera, cand.rel))

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ offering
    def offer(self, folder: CameraFolder, path: Path, *, block: bool) -> bool:
        """Queue a complete file unless it is known, pending or refused; True when queued.

        ``block=False`` (observer threads) drops the offer when the queue is full and asks
        for an early scan; ``block=True`` (the scan) waits for room (back-pressure).
        """
        rel = folder.rel(path)
        if rel is None:
            return False
        key = (folder.id, rel)
        with self._lock:
            if key in self._pending:
                return False
            self._pending.add(key)
            self._young.pop(key, None)
        cand = Candidate(folder.id, path, rel, time.time())
        try:
            st = path.lstat()
            reason = folder.refuse_reason(path)
            known = self.store.is_known(folder.id, rel, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            self.done(cand)
            return False
        if known or reason is not None:
            if not known and reason is not None:
                self._on_skip(cand, reason)
                self.store.record_skip(folder.id, rel, st.st_mtime_ns, reason)
            self.done(cand)
            return False
        if not block:
            try:
                self.queue.put_nowait(cand)
                return True
            except queue.Full:
                self.done(cand)
                self.dropped_events += 1
                self._rescan.set()
                return False
        while not self._stop.is_set():
            try:
                self.queue.put(cand, timeout=0.5)
                return True
            except queue.Full:
                self.heartbeat = time.monotonic()
        self.done(cand)
        return False

    def note_young(self, folder: CameraFolder, path: Path) -> None:
        """A file was created or modified: take it once its size is stable."""
        rel = folder.rel(path)
        if rel is None:
            return
        try:
            st = path.stat()
        except OSError:
            return
        with self._lock:
            self._young[(folder.id, rel)] = (st.st_size, st.st_mtime_ns, time.monotonic())

    # ------------------------------------------------------------------ scanning
    def _scan_loop(self) -> None:
        period = max(0.2, min(self.cfg.settle_seconds or 0.2, self.cfg.rescan_seconds))
        next_full = 0.0
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            now = time.monotonic()
            if now >= next_full or self._rescan.is_set():
                self._rescan.clear()
                try:
                    self.scan()
                except Exception:  # noqa: BLE001 - the scan must never die
                    log.exception("reconciliation scan failed; retrying next period")
                next_full = time.monotonic() + self.cfg.rescan_seconds
            self._check_young()
            self._rescan.wait(timeout=period)

    def scan(self) -> int:
        """Offer every settled file version the database does not know; returns how many."""
        offered = 0
        settle_ns = int(self.cfg.settle_seconds * 1e9)
        for folder in self.folders.values():
            for p in folder.walk():
                if self._stop.is_set():
                    return offered
                try:
                    st = p.lstat()
                except OSError:
                    continue
                rel = folder.rel(p)
                if rel is None:
                    continue
                if time.time_ns() - st.st_mtime_ns < settle_ns:
                    # still settling: with polling, the young tracker takes it when stable;
                    # with inotify, its close event does (if it is still open) or the next
                    # scan (never guess from a pause that a writer has finished)
                    if self.cfg.polling:
                        self.note_young(folder, p)
                    continue
                if self.store.is_known(folder.id, rel, st.st_mtime_ns, st.st_size):
                    continue
                if self.offer(folder, p, block=True):
                    offered += 1
        if offered:
            log.info("reconciliation scan offered %d file(s)", offered)
        return offered

    def _check_young(self) -> None:
        now = time.monotonic()
        ready: list[tuple[str, str]] = []
        with self._lock:
            items = list(self._young.items())
        for key, (size, mtime, seen) in items:
            folder = self.folders[key[0]]
            path = folder.root / key[1]
            try:
                st = path.stat()
            except OSError:
                with self._lock:
                    self._young.pop(key, None)
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                with self._lock:
                    self._young[key] = (st.st_size, st.st_mtime_ns, now)
            elif now - seen >= self.cfg.settle_seconds:
                ready.append(key)
        for cam, rel in ready:
            folder = self.folders[cam]
            self.offer(folder, folder.root / rel, block=True)


class _Handler(FileSystemEventHandler):
    """watchdog event handler of one camera folder (methods run on the observer thread)."""

    def __init__(self, intake: Intake, folder: CameraFolder) -> None:
        super().__init__()
        self.intake = intake
        self.folder = folder

    def dispatch(self, event: Any) -> None:
        if event.is_directory:
            return
        kind = event.event_type
        if kind == "closed":
            self.intake.offer(self.folder, Path(os.fsdecode(event.src_path)), block=False)
        elif kind == "moved":
            self.intake.offer(self.folder, Path(os.fsdecode(event.dest_path)), block=False)
        elif kind in ("created", "modified") and self.intake.cfg.polling:
            # only the polling observer lacks close events; with inotify a file that is
            # still open for writing must wait for its close (or for a later scan)
            self.intake.note_young(self.folder, Path(os.fsdecode(event.src_path)))
