"""From a complete file to a committed verdict: read, preprocess, score in batches, decide.

Two threads: ``prepare`` decodes and preprocesses (PIL, numpy) while ``score`` runs the
model (onnxruntime releases the GIL), so decoding overlaps inference. The score thread takes
whatever is prepared, up to ``batch_size``, without waiting for a full batch: a batch
forms only when files arrive faster than they are scored. Unreadable images become ERROR
verdicts with the ``ImageError`` reason; a file deleted before it was read is a logged skip.
Each batch's verdicts and outbound messages are committed in one transaction.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ngcal.core.errors import ImageError, NgcalError
from ngcal.core.files import sha256_file
from ngcal.core.images import load_rgb, preprocess
from ngcal.core.scorer import Scorer

from .intake import Candidate, Intake
from .messages import Label, Outbound, Topics, Verdict, make_msg_id
from .recalibration import ThresholdKeeper
from .store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A candidate read from disk: its identity, and a tensor [3, S, S] or an error reason."""

    cand: Candidate
    size: int
    mtime_ns: int
    sha256: str
    tensor: np.ndarray | None
    error: str | None
    decode_ms: float


class ScoringPipeline:
    """The prepare and score threads between the intake queue and the store."""

    def __init__(
        self,
        *,
        device: str,
        intake: Intake,
        scorer: Scorer,
        keeper: ThresholdKeeper,
        store: Store,
        topics: Topics,
        model_sha256: str,
        batch_size: int,
        max_pixels: int,
        on_commit: Callable[[int], None],
    ) -> None:
        self.device = device
        self.intake = intake
        self.scorer = scorer
        self.keeper = keeper
        self.store = store
        self.topics = topics
        self.model_sha256 = model_sha256
        self.batch_size = max(1, min(batch_size, scorer.max_batch))
        self.max_pixels = max_pixels
        self._on_commit = on_commit
        self._ready: queue.Queue[Prepared | None] = queue.Queue(maxsize=2 * self.batch_size)
        self._stop = threading.Event()
        self._prep_done = threading.Event()
        self.score_lock = threading.Lock()  # the scorer is shared with the command handler
        self._threads: list[threading.Thread] = []
        self.heartbeat = {"prepare": time.monotonic(), "score": time.monotonic()}
        self.last_verdict_at: float | None = None
        self.verdicts = 0

    def start(self) -> None:
        for name, fn in (("prepare", self._prepare_loop), ("score", self._score_loop)):
            t = threading.Thread(target=fn, name=f"ngcal-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float) -> None:
        """Finish what is queued within ``timeout`` seconds, then stop both threads."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.intake.queue.qsize() or self._ready.qsize()):
            time.sleep(0.05)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=max(0.5, deadline - time.monotonic()))

    # ------------------------------------------------------------------ prepare
    def _prepare_loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.heartbeat["prepare"] = time.monotonic()
                try:
                    cand = self.intake.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                item = self._prepare(cand)
                if item is None:
                    self.intake.done(cand)
                    continue
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        self.heartbeat["prepare"] = time.monotonic()
                else:
                    self.intake.done(cand)
        finally:
            self._prep_done.set()

    def _prepare(self, cand: Candidate) -> Prepared | None:
        """Read, hash and preprocess one file; None when it vanished (a logged skip)."""
        t0 = time.perf_counter()
        try:
            st = cand.path.stat()
        except FileNotFoundError:
            log.warning("skip %s/%s: deleted before scoring", cand.camera, cand.rel)
            return None
        except OSError as e:
            return Prepared(cand, 0, 0, "", None, f"unreadable: {e.strerror}", 0.0)
        try:
            digest = sha256_file(cand.path)
        except NgcalError as e:
            if not cand.path.exists():
                log.warning("skip %s/%s: deleted before scoring", cand.camera, cand.rel)
                return None
            # e.g. permission denied: an ERROR verdict for this file version
            return Prepared(cand, st.st_size, st.st_mtime_ns, "", None, f"unreadable: {e}", 0.0)
        try:
            rgb = load_rgb(cand.path, max_pixels=self.max_pixels)
            tensor = preprocess(rgb, self.scorer.preprocessing)
            err = None
        except ImageError as e:
            if e.reason == "not_found":
                log.warning("skip %s/%s: deleted before scoring", cand.camera, cand.rel)
                return None
            tensor, err = None, e.reason + (f": {e.detail}" if e.detail else "")
        ms = (time.perf_counter() - t0) * 1e3
        return Prepared(cand, st.st_size, st.st_mtime_ns, digest, tensor, err, ms)

    # ------------------------------------------------------------------ score
    def _score_loop(self) -> None:
        while True:
            self.heartbeat["score"] = time.monotonic()
            try:
                first = self._ready.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set() and self._prep_done.is_set():
                    return
                continue
            if first is None:
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    nxt = self._ready.get_nowait()
                except queue.Empty:
                    break
                if nxt is not None:
                    batch.append(nxt)
            try:
                self._score_and_commit(batch)
            except Exception:  # noqa: BLE001 - a worker must survive; files are re-offered
                log.exception(
                    "scoring a batch of %d failed; files stay for the next scan", len(batch)
                )
                time.sleep(1.0)
            finally:
                for p in batch:
                    self.intake.done(p.cand)

    def _score_and_commit(self, batch: list[Prepared]) -> None:
        good = [p for p in batch if p.tensor is not None]
        scores: dict[int, float | str] = {}
        score_ms = 0.0
        if good:
            t0 = time.perf_counter()
            stacked = np.stack([p.tensor for p in good if p.tensor is not None]).astype(np.float32)
            try:
                with self.score_lock:
                    res = self.scorer.score(stacked)
                for p, s in zip(good, res.image_scores.tolist(), strict=True):
                    scores[id(p)] = s
            except NgcalError as e:
                log.error("batch scoring failed (%s); scoring one by one", e)
                for p in good:
                    scores[id(p)] = self._score_one(p)
            score_ms = (time.perf_counter() - t0) * 1e3 / len(good)
        thr = self.keeper.current
        now = time.time()
        items: list[tuple[Verdict, Outbound]] = []
        for p in batch:
            s = scores.get(id(p))
            label: Label
            reason = p.error
            score: float | None = None
            if isinstance(s, str):
                label, reason = "ERROR", s
            elif s is None:
                label = "ERROR"
            elif not math.isfinite(s):
                label, reason = "ERROR", "non_finite_score"
            else:
                score = float(s)
                label = "NG" if score >= thr.value else "OK"
            v = Verdict(
                msg_id=make_msg_id(self.device, p.cand.camera, p.cand.rel, p.sha256, p.mtime_ns),
                camera=p.cand.camera,
                path=p.cand.rel,
                size=p.size,
                mtime_ns=p.mtime_ns,
                sha256=p.sha256,
                verdict=label,
                reason=reason,
                score=score,
                threshold=thr.value,
                threshold_version=thr.version,
                model_sha256=self.model_sha256,
                detected_at=p.cand.detected_at,
                decided_at=now,
                timings_ms={
                    "decode": round(p.decode_ms, 3),
                    "score": round(score_ms, 3),
                    "total": round((now - p.cand.detected_at) * 1e3, 3),
                },
            )
            if label == "ERROR":
                log.warning("ERROR verdict %s/%s: %s", p.cand.camera, p.cand.rel, reason)
            items.append((v, Outbound(self.topics.verdict(v.camera), v.payload(), v.msg_id)))
        new = self.store.record_verdicts(items)
        self.verdicts += new
        self.last_verdict_at = now
        self._on_commit(new)

    def _score_one(self, p: Prepared) -> float | str:
        """Score one image after its batch failed; an error string becomes the ERROR reason."""
        if p.tensor is None:
            return p.error or "unreadable"
        try:
            with self.score_lock:
                res = self.scorer.score(p.tensor[None])
            return float(res.image_scores[0])
        except NgcalError as e:
            return f"scorer_failed: {e}"

    def score_file(self, path: str) -> float:
        """Score one file now (confirmed images from the intake folder); raises ImageError."""
        x = preprocess(load_rgb(path, max_pixels=self.max_pixels), self.scorer.preprocessing)
        with self.score_lock:
            res = self.scorer.score(x[None])
        return float(res.image_scores[0])
