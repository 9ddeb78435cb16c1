"""From a complete file to a committed verdict: read, preprocess, score in batches, decide.

Two threads: ``prepare`` decodes and preprocesses (PIL, numpy) while ``score`` runs the
model (onnxruntime releases the GIL), so decoding overlaps inference. The score thread takes
whatever is prepared, up to ``batch_size``, without waiting for a full batch: a batch
forms only when files arrive faster than they are scored. Unreadable images become ERROR
verdicts with the ``ImageError`` reason; a file deleted before it was read is a logged skip.
Each batch's verdicts and outbound messages are committed in one transaction; the
decision itself is ``decision.decide``. The pipeline reads candidates from a queue and
reports each finished one to a ``done`` callback: it never calls into the intake.

No file can stall the pipeline: when a batch fails, each item is retried alone, and an
item that fails alone becomes an ERROR verdict (``internal_error: ...``) instead of being
offered again forever; only a transient database error (busy, disk full) leaves the file
for the next scan.
"""

from __future__ import annotations

import logging
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

from .clock import SYSTEM_CLOCK, Clock
from .decision import Scored, decide
from .intake import Candidate
from .messages import Outbound, Topics, Verdict, make_msg_id
from .recalibration import ThresholdKeeper
from .store import Store, is_transient

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
    """The prepare and score threads between the candidate queue and the store."""

    def __init__(
        self,
        *,
        device: str,
        source: queue.Queue[Candidate],
        done: Callable[[Candidate], None],
        scorer: Scorer,
        keeper: ThresholdKeeper,
        store: Store,
        topics: Topics,
        model_sha256: str,
        batch_size: int,
        max_pixels: int,
        on_commit: Callable[[int], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.device = device
        self.source = source
        self._done = done
        self.clock = clock
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
        while time.monotonic() < deadline and (self.source.qsize() or self._ready.qsize()):
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
                    cand = self.source.get(timeout=0.5)
                except queue.Empty:
                    continue
                item = self._prepare(cand)
                if item is None:
                    self._done(cand)
                    continue
                while not self._stop.is_set():
                    try:
                        self._ready.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        self.heartbeat["prepare"] = time.monotonic()
                else:
                    self._done(cand)
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
                self._commit_isolating(batch)
            finally:
                for p in batch:
                    self._done(p.cand)

    def _commit_isolating(self, batch: list[Prepared]) -> None:
        """Commit ``batch``; on failure retry each item alone, then decide it ERROR.

        Only a transient database error leaves a file unmarked (the next scan offers it
        again); every other failure would recur, so it becomes the file's ERROR verdict.
        """
        try:
            self._score_and_commit(batch)
            return
        except Exception as e:  # noqa: BLE001 - a worker must survive
            if is_transient(e):
                log.warning(
                    "batch of %d not committed (%s); files stay for the next scan", len(batch), e
                )
                self.clock.sleep(1.0)
                return
            log.exception("scoring a batch of %d failed; retrying each file alone", len(batch))
        for p in batch:
            try:
                self._score_and_commit([p])
                continue
            except Exception as e:  # noqa: BLE001 - isolate the poison item
                if is_transient(e):
                    log.warning(
                        "%s/%s not committed (%s); it stays for the next scan",
                        p.cand.camera,
                        p.cand.rel,
                        e,
                    )
                    continue
                reason = f"internal_error: {type(e).__name__}: {e}"
            try:
                self._score_and_commit([p], forced_error=reason)
            except Exception:  # noqa: BLE001 - nothing more can be done for this file now
                log.exception("%s/%s: cannot record its ERROR verdict", p.cand.camera, p.cand.rel)

    def _score_and_commit(self, batch: list[Prepared], *, forced_error: str | None = None) -> None:
        """Score the readable items together, decide each one, commit all verdicts at once."""
        results: dict[int, Scored] = {}
        good = [i for i, p in enumerate(batch) if p.tensor is not None and forced_error is None]
        score_ms = 0.0
        if good:
            t0 = time.perf_counter()
            results = dict(zip(good, self._score_batch([batch[i] for i in good]), strict=True))
            score_ms = (time.perf_counter() - t0) * 1e3 / len(good)
        thr = self.keeper.current
        now = self.clock.time()
        items: list[tuple[Verdict, Outbound]] = []
        for i, p in enumerate(batch):
            scored = results.get(i) or Scored.failed(forced_error or p.error or "unreadable")
            d = decide(scored, thr.value)
            mid = make_msg_id(self.device, p.cand.camera, p.cand.rel, p.sha256, p.mtime_ns)
            v = Verdict(
                msg_id=mid,
                camera=p.cand.camera,
                path=p.cand.rel,
                size=p.size,
                mtime_ns=p.mtime_ns,
                sha256=p.sha256,
                verdict=d.label,
                reason=d.reason,
                score=d.score,
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
                audit=d.label == "OK" and self.keeper.audit_draw(mid),
            )
            if d.label == "ERROR":
                log.warning("ERROR verdict %s/%s: %s", p.cand.camera, p.cand.rel, d.reason)
            items.append((v, Outbound(self.topics.verdict(v.camera), v.payload(), v.msg_id)))
        new = self.store.record_verdicts(items)
        self.verdicts += new
        self.last_verdict_at = now
        self._on_commit(new)

    def _score_batch(self, good: list[Prepared]) -> list[Scored]:
        """Scores of prepared tensors, in order; one by one when the batch call fails."""
        stacked = np.stack([p.tensor for p in good if p.tensor is not None]).astype(np.float32)
        try:
            with self.score_lock:
                res = self.scorer.score(stacked)
            return [Scored(float(s)) for s in res.image_scores.tolist()]
        except NgcalError as e:
            log.error("batch scoring failed (%s); scoring one by one", e)
            return [self._score_one(p) for p in good]

    def _score_one(self, p: Prepared) -> Scored:
        """Score one image after its batch failed; a failure becomes the ERROR reason."""
        if p.tensor is None:
            return Scored.failed(p.error or "unreadable")
        try:
            with self.score_lock:
                res = self.scorer.score(p.tensor[None])
            return Scored(float(res.image_scores[0]))
        except NgcalError as e:
            return Scored.failed(f"scorer_failed: {e}")

    def score_file(self, path: str) -> float:
        """Score one file now (confirmed images from the intake folder); raises ImageError."""
        x = preprocess(load_rgb(path, max_pixels=self.max_pixels), self.scorer.preprocessing)
        with self.score_lock:
            res = self.scorer.score(x[None])
        return float(res.image_scores[0])
