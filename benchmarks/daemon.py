"""Edge daemon benchmark: latency, a multi-camera burst, sustained throughput, a soak.

Starts its own Mosquitto (free loopback port, tmp dir) and the daemon as a subprocess
(``python -m ngcal.cli.main serve``), then:

1. bare scorer: the same bundle, backend, thread count and batch size in this process;
   ``bare_scorer_images_per_second`` is ``scorer.score`` alone on preprocessed batches
   (the strict denominator), ``bare_pipeline_images_per_second`` adds decode+preprocess;
2. latency (paced): ``--latency-images`` files moved into the watch folder one at a time at
   half the bare decode+score rate; latency = time a subscriber receives the verdict minus the
   time the file's rename into the folder returned. The broker forwards a QoS 1 message to
   subscribers before it returns the publisher's PUBACK, so this is the file-closed ->
   broker-accepted latency to within a loopback round trip;
3. throughput (sustained): ``--images`` files written as fast as the daemon takes them
   (at most ``--lead`` ahead of the received verdicts, like a camera with a bounded
   buffer), in segments of ``--segment`` images; each file is deleted once its verdict
   arrived. Between segments, with the daemon idle, the bare scorer is sampled again, so
   numerator and denominator see the same load from other processes on shared CPUs;
   images/s = images / time spent in segments. CPU time per image (daemon process vs
   bare scorer) is reported as a load-independent cross-check. Daemon RSS after the first
   10% of the images and at the end gives ``rss_growth_sustained``. Skipped with
   ``--images 0``;
4. burst: ``--cameras`` threads (4) each write their share of ``--burst-images`` (2000)
   into their own camera folder at once, in ``--burst-rounds`` rounds; per camera p50/p99
   from file closed to verdict received (``burst_per_camera``); ``burst_throughput_ratio``
   = burst images/s over the bare scorer sampled before and after every round
   (interleaved, so neighbours' load on shared CPUs affects both);
5. soak: ``--soak-minutes`` of steady load (all cameras, ``--soak-pace`` x the bare
   decode+score rate), files deleted once decided, like a camera's ring buffer.

RSS and open file descriptors of the daemon are read after the first burst round (warm:
every camera's observer thread has opened its database connection, every batch size has
run) and at the end: ``rss_growth`` (relative) and ``fd_growth`` (count).
The outbox backlog is sampled every ``--sample-s`` seconds through burst and soak
(``outbox_backlog``: [seconds since burst start, rows]). ``throughput_ratio`` is the
burst's (the sustained phase's when there is no burst).

Prints one JSON object on stdout; progress on stderr. Data: ``--data`` or ``NGCAL_DATA``
(default ``<repo>/../shared/data/magnetic_tile/tile``); every image of the category is
cycled. Bundle: ``--bundle`` (default ``<repo>/runs/tile/bundle``); if it has no
thresholds.json, a copy gets one at the 99th percentile of its normal score set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ngcal.cli.demo_line import serve_argv

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[daemon-bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def prepare_bundle(src: Path, work: Path) -> Path:
    """A copy of the bundle with a thresholds.json (added when the bundle has none)."""
    from ngcal.core.bundle import open_bundle
    from ngcal.core.thresholds import ThresholdFile, save_thresholds

    b = open_bundle(src)
    dst = work / "bundle"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("engines"))
    if b.thresholds is None:
        normal = [s for s in b.scoresets() if not s.is_ng]
        scores = np.concatenate([s.scores for s in normal]) if normal else np.array([1.0])
        save_thresholds(
            dst / "thresholds.json",
            ThresholdFile(
                value=float(np.quantile(scores, 0.99)),
                mode="fixed",
                method="benchmark_p99_normal",
                model_sha256=b.model_sha256,
                created_by="benchmarks/daemon.py",
            ),
        )
    return dst


def source_images(data: Path) -> list[bytes]:
    files = sorted(p for p in data.rglob("*.png") if "ground_truth" not in p.parts)
    if not files:
        raise SystemExit(f"no images under {data}")
    return [p.read_bytes() for p in files]


class BareScorer:
    """The same bundle, backend, threads and batch size in this process, sampled on demand.

    ``sample()`` scores ``n`` preprocessed images (score only) and decodes+preprocesses
    them again (with decode); it returns wall-clock rates and this process's CPU time per
    image (``time.process_time``: every thread of this process).
    """

    def __init__(self, bundle: Path, images: list[bytes], n: int, batch: int, backend: str):
        from ngcal.core.runtime import open_scorer

        self.scorer = open_scorer(bundle, backend=backend, threads=1, max_batch=batch)
        self.name = self.scorer.name
        self.batch = batch
        self.tmp = Path(tempfile.mkdtemp())
        self.paths = []
        for i in range(min(n, len(images))):
            p = self.tmp / f"{i}.png"
            p.write_bytes(images[(i * 7) % len(images)])
            self.paths.append(p)
        self.xs = self._decode()
        self.scorer.score(np.stack(self.xs[:batch]))  # warm-up

    def _decode(self) -> list[np.ndarray]:
        from ngcal.core.images import load_rgb, preprocess

        return [preprocess(load_rgb(p), self.scorer.preprocessing) for p in self.paths]

    def sample(self) -> dict[str, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(self.xs), self.batch):
            self.scorer.score(np.stack(self.xs[i : i + self.batch]))
        score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        self._decode()
        decode_s = time.perf_counter() - t0
        n = len(self.xs)
        return {
            "score_only": n / score_s,
            "with_decode": n / (score_s + decode_s),
            "cpu_ms_per_image": 1e3 * score_cpu / n,
        }

    def close(self) -> None:
        self.scorer.close()
        shutil.rmtree(self.tmp)


def open_fds(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Samples the daemon's outbox backlog, RSS and fds every ``period`` s on a thread."""

    def __init__(self, db: Path, pid: int, period: float) -> None:
        self.db, self.pid, self.period = db, pid, period
        self.t0 = time.monotonic()
        self.rows: list[tuple[float, int, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def backlog(self) -> int:
        import sqlite3

        c = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return int(c.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            c.close()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        t = round(time.monotonic() - self.t0, 1)
        self.rows.append((t, self.backlog(), round(rss_mb(self.pid), 1), open_fds(self.pid)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


def burst_round(
    watches: list[Path],
    images: list[bytes],
    listener: VerdictListener,
    n: int,
    tag: str,
    timeout: float,
) -> tuple[dict[str, list[float]], float]:
    """Each camera thread writes its share of ``n`` images at once; waits for every verdict.

    Returns per-camera latencies (ms, file closed -> verdict received) and the round's
    duration (first write to last verdict, s).
    """
    per_cam = [n // len(watches) + (i < n % len(watches)) for i in range(len(watches))]
    closes: dict[str, tuple[int, float]] = {}
    lock = threading.Lock()
    before = len(listener.got)

    def write(cam: int) -> None:
        for j in range(per_cam[cam]):
            name = f"{tag}c{cam}_{j:05d}.png"
            t = drop(watches[cam], name, images[(cam * 131 + j) % len(images)])
            with lock:
                closes[name] = (cam, t)

    threads = [threading.Thread(target=write, args=(c,)) for c in range(len(watches))]
    t_start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    listener.wait_count(before + n, timeout)
    lat: dict[str, list[float]] = {f"cam{c}": [] for c in range(len(watches))}
    for name, (cam, t) in closes.items():
        if name in listener.got:
            lat[f"cam{cam}"].append((listener.got[name] - t) * 1e3)
        (watches[cam] / name).unlink(missing_ok=True)
    t_end = max((listener.got[k] for k in closes if k in listener.got), default=time.time())
    return lat, t_end - t_start


def soak(
    watches: list[Path],
    images: list[bytes],
    listener: VerdictListener,
    minutes: float,
    rate: float,
) -> int:
    """Steady load for ``minutes`` at ``rate`` images/s over all cameras; returns images."""
    end = time.monotonic() + 60.0 * minutes
    names: list[tuple[int, str]] = []
    i = 0
    next_at = time.monotonic()
    while time.monotonic() < end:
        cam = i % len(watches)
        name = f"soak{i:07d}.png"
        drop(watches[cam], name, images[i % len(images)])
        names.append((cam, name))
        i += 1
        next_at += 1.0 / rate
        while names and names[0][1] in listener.got:  # the camera's ring buffer
            c, k = names.pop(0)
            (watches[c] / k).unlink(missing_ok=True)
        time.sleep(max(0.0, next_at - time.monotonic()))
    return i


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class VerdictListener:
    """Subscriber recording the receive time of each verdict by image name."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.got: dict[str, float] = {}
        self.labels: dict[str, int] = {}
        self.cond = threading.Condition()
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench", protocol=mqtt.MQTTv5)

        def on_connect(cl: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
            cl.subscribe("ngcal/bench/+/verdict", qos=1)
            self.ready.set()

        c.on_connect = on_connect
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        self.ready.wait(10)
        time.sleep(0.2)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        t = time.time()
        body = json.loads(msg.payload)
        with self.cond:
            self.got.setdefault(body["image"], t)
            self.labels[body["verdict"]] = self.labels.get(body["verdict"], 0) + 1
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: len(self.got) >= n, timeout=timeout)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drain_socket(sock: socket.socket) -> None:
    """Read and discard sd_notify datagrams (STATUS, WATCHDOG) like systemd would."""
    while True:
        try:
            sock.recv(4096)
        except OSError:
            return


def drop(watch: Path, name: str, data: bytes) -> float:
    """Write to a hidden temp name, then rename into the folder; returns the rename time."""
    tmp = watch / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, watch / name)
    return time.time()


def sustained_phase(
    args: argparse.Namespace,
    pid: int,
    watch: Path,
    images: list[bytes],
    listener: VerdictListener,
    bare_scorer: BareScorer,
) -> dict[str, Any]:
    """``--images`` written as fast as taken (``--lead`` ahead), in segments; bare between."""
    n = args.images
    out: dict[str, Any] = {"_bare_samples": []}
    if n <= 0:
        return out
    base = len(listener.got)
    seg = max(1, min(args.segment, n))
    rss_warm = None
    rss_samples = []
    written = deleted = 0
    names: list[str] = []
    busy_s = daemon_cpu = 0.0
    while written < n:
        seg_start, seg_end = written, min(n, written + seg)
        cpu0 = cpu_seconds(pid)
        t_start = None
        while written < seg_end or len(listener.got) - base < seg_end:
            done = len(listener.got) - base
            if written < seg_end and written - done < args.lead:
                name = f"img{written:06d}.png"
                t = drop(watch, name, images[written % len(images)])
                t_start = t_start or t
                names.append(name)
                written += 1
            else:
                with listener.cond:
                    listener.cond.wait(timeout=0.05)
            while deleted < len(names) and names[deleted] in listener.got:
                (watch / names[deleted]).unlink(missing_ok=True)
                deleted += 1
        t_end = max(listener.got[k] for k in names[seg_start:seg_end])
        busy_s += t_end - (t_start or t_end)
        daemon_cpu += cpu_seconds(pid) - cpu0
        if rss_warm is None and written >= n // 10:
            rss_warm = rss_mb(pid)
        rss_samples.append((written, round(rss_mb(pid), 1)))
        out["_bare_samples"].append(bare_scorer.sample())
        log(f"sustained {written}/{n}, {written / busy_s:.2f} img/s")
    received = sum(1 for k in names if k in listener.got)
    ips = received / busy_s
    bare = out["_bare_samples"]
    bare_ips = float(np.mean([b["score_only"] for b in bare]))
    bare_cpu = float(np.mean([b["cpu_ms_per_image"] for b in bare]))
    daemon_cpu_ms = 1e3 * daemon_cpu / received
    out.update(
        {
            "sustained_images": n,
            "sustained_received": received,
            "images_per_second": round(ips, 2),
            "sustained_throughput_ratio": round(ips / bare_ips, 3),
            "daemon_cpu_ms_per_image": round(daemon_cpu_ms, 2),
            "bare_scorer_cpu_ms_per_image": round(bare_cpu, 2),
            "cpu_throughput_ratio": round(bare_cpu / daemon_cpu_ms, 3),
            "rss_growth_sustained": None
            if not rss_warm
            else round((rss_samples[-1][1] - rss_warm) / rss_warm, 4),
        }
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0, help="images in the sustained run (0: none)")
    ap.add_argument("--latency-images", type=int, default=300)
    ap.add_argument("--bundle", type=Path, default=REPO / "runs" / "tile" / "bundle")
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get("NGCAL_DATA", REPO / ".." / "shared" / "data" / "magnetic_tile" / "tile")
        ),
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--lead", type=int, default=64, help="most files ahead of the verdicts")
    ap.add_argument("--segment", type=int, default=1000, help="images per throughput segment")
    ap.add_argument("--bare-images", type=int, default=100, help="images per bare sample")
    ap.add_argument("--cameras", type=int, default=4, help="cameras writing at once (burst)")
    ap.add_argument("--burst-images", type=int, default=2000, help="images in the burst")
    ap.add_argument("--burst-rounds", type=int, default=4, help="burst rounds (bare between)")
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="steady load after the burst")
    ap.add_argument("--soak-pace", type=float, default=0.5, help="x bare decode+score rate")
    ap.add_argument("--sample-s", type=float, default=5.0, help="backlog/RSS/fd sample period")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ngcal-daemon-bench-"))
    broker = daemon = None
    try:
        bundle = prepare_bundle(args.bundle, work)
        images = source_images(args.data)
        log(f"{len(images)} source images from {args.data}; bundle {args.bundle}")
        bare_scorer = BareScorer(bundle, images, args.bare_images, args.batch, args.backend)
        bare = bare_scorer.sample()
        log(
            f"bare scorer {bare['score_only']:.1f} img/s (score only), "
            f"{bare['with_decode']:.1f} img/s with decode"
        )

        port = free_port()
        (work / "broker").mkdir()
        conf = work / "broker" / "mosquitto.conf"
        import getpass

        conf.write_text(
            f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\n"
            "allow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
        )
        broker = subprocess.Popen(
            ["/usr/sbin/mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        watch = work / "watch"
        watch.mkdir()
        watches = [work / f"watch{c}" for c in range(args.cameras)]
        for w in watches:
            w.mkdir()
        extra_cams = "".join(f"  - id: cam{c}\n    watch: {w}\n" for c, w in enumerate(watches))
        cfg = work / "daemon.yaml"
        cfg.write_text(f"""device_id: bench
bundle: {bundle}
state_dir: {work / "state"}
cameras:
  - id: cam
    watch: {watch}
{extra_cams}runtime:
  backend: {args.backend}
  threads: 1
  batch_size: {args.batch}
intake:
  rescan_seconds: 30
  queue_size: 256
mqtt:
  host: 127.0.0.1
  port: {port}
service:
  status_interval_s: 10
""")
        listener = VerdictListener(port)
        sock_path = work / "notify.sock"
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(str(sock_path))
        ns.settimeout(120)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), OMP_NUM_THREADS="1")
        daemon_log = open(work / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        daemon = subprocess.Popen(
            serve_argv(cfg),
            env=env,
            stderr=daemon_log,
        )
        while b"READY=1" not in ns.recv(4096):
            pass
        ns.settimeout(None)
        threading.Thread(target=drain_socket, args=(ns,), daemon=True).start()
        log("daemon ready")

        # ---- latency, paced at half the bare decode+score rate
        interval = 2.0 / bare["with_decode"]
        closes: dict[str, float] = {}
        for i in range(args.latency_images):
            name = f"lat{i:05d}.png"
            closes[name] = drop(watch, name, images[i % len(images)])
            time.sleep(interval)
        listener.wait_count(args.latency_images, 120)
        lat = np.array(
            [(listener.got[k] - t) * 1e3 for k, t in closes.items() if k in listener.got]
        )
        for k in closes:
            (watch / k).unlink(missing_ok=True)
        log(f"latency p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms")

        bare_samples = [bare]
        sustained = sustained_phase(args, daemon.pid, watch, images, listener, bare_scorer)
        bare_samples += sustained.pop("_bare_samples")

        # ---- burst: all cameras at once, in rounds; the bare scorer between rounds
        sampler = Sampler(work / "state" / "state.db", daemon.pid, args.sample_s)
        lat_cam: dict[str, list[float]] = {f"cam{c}": [] for c in range(args.cameras)}
        burst_s, burst_bare, burst_cpu = 0.0, [], 0.0
        rounds = max(1, args.burst_rounds)
        for r in range(rounds if args.burst_images else 0):
            burst_bare.append(bare_scorer.sample())
            n_r = args.burst_images // rounds + (r < args.burst_images % rounds)
            cpu0 = cpu_seconds(daemon.pid)
            lat_r, dur = burst_round(watches, images, listener, n_r, f"b{r}", 900)
            burst_cpu += cpu_seconds(daemon.pid) - cpu0
            burst_s += dur
            for k, v in lat_r.items():
                lat_cam[k] += v
            log(f"burst round {r + 1}/{rounds}: {n_r} images in {dur:.1f} s")
            if r == 0:  # warm: every camera's observer and every batch size has run
                rss_start, fd_start = rss_mb(daemon.pid), open_fds(daemon.pid)
                log(f"daemon RSS {rss_start:.1f} MB, {fd_start} fds after the first round")
        if args.burst_images:
            burst_bare.append(bare_scorer.sample())
        burst_n = sum(len(v) for v in lat_cam.values())
        if not args.burst_images:
            rss_start, fd_start = rss_mb(daemon.pid), open_fds(daemon.pid)
        soaked = 0
        if args.soak_minutes > 0:
            rate = args.soak_pace * float(np.mean([b["with_decode"] for b in bare_samples]))
            log(f"soak: {args.soak_minutes} min at {rate:.1f} images/s")
            soaked = soak(watches, images, listener, args.soak_minutes, rate)
            deadline = time.monotonic() + 120
            while sampler.backlog() and time.monotonic() < deadline:
                time.sleep(0.5)
        sampler.stop()
        rss_end, fd_end = rss_mb(daemon.pid), open_fds(daemon.pid)
        log(f"daemon RSS {rss_end:.1f} MB, {fd_end} fds at the end")
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGUSR1)
            time.sleep(1)
            log("daemon did not stop within 60 s:\n" + (work / "daemon.log").read_text()[-8000:])
            raise
        listener.stop()
        bare_scorer.close()
        bare_samples += burst_bare
        bare_ips = float(np.mean([b["score_only"] for b in bare_samples]))
        burst_bare_ips = float(np.mean([b["score_only"] for b in burst_bare])) if burst_bare else 0
        burst_ips = burst_n / burst_s if burst_s else 0.0
        all_burst = np.concatenate([np.asarray(v) for v in lat_cam.values()] or [np.zeros(0)])
        result = {
            "bundle": str(args.bundle),
            "engine": bare_scorer.name,
            "batch_size": args.batch,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "p99_over_p50": round(float(np.percentile(lat, 99) / np.percentile(lat, 50)), 3),
            "latency_images": int(lat.size),
            "latency_pace_images_per_second": round(1.0 / interval, 2),
            "burst_cameras": args.cameras,
            "burst_images": args.burst_images,
            "burst_received": burst_n,
            "burst_rounds": rounds,
            "burst_p50_ms": round(float(np.percentile(all_burst, 50)), 1) if burst_n else None,
            "burst_p99_ms": round(float(np.percentile(all_burst, 99)), 1) if burst_n else None,
            "burst_per_camera": {
                k: {
                    "images": len(v),
                    "p50_ms": round(float(np.percentile(v, 50)), 1),
                    "p99_ms": round(float(np.percentile(v, 99)), 1),
                }
                for k, v in lat_cam.items()
                if v
            },
            "burst_images_per_second": round(burst_ips, 2),
            "burst_bare_scorer_samples": [round(b["score_only"], 2) for b in burst_bare],
            "burst_throughput_ratio": round(burst_ips / burst_bare_ips, 3) if burst_bare else None,
            "burst_throughput_ratio_vs_pipeline": round(
                burst_ips / float(np.mean([b["with_decode"] for b in burst_bare])), 3
            )
            if burst_bare
            else None,
            "burst_daemon_cpu_ms_per_image": round(1e3 * burst_cpu / burst_n, 2)
            if burst_n
            else None,
            "burst_bare_scorer_cpu_ms_per_image": round(
                float(np.mean([b["cpu_ms_per_image"] for b in burst_bare])), 2
            )
            if burst_bare
            else None,
            **sustained,
            "throughput_ratio": round(burst_ips / burst_bare_ips, 3)
            if burst_bare
            else sustained.get("sustained_throughput_ratio"),
            "bare_scorer_images_per_second": round(bare_ips, 2),
            "soak_minutes": args.soak_minutes,
            "soak_images": soaked,
            "soak_received": sum(1 for k in listener.got if k.startswith("soak")),
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_growth": round((rss_end - rss_start) / rss_start, 4),
            "fd_start": fd_start,
            "fd_end": fd_end,
            "fd_growth": fd_end - fd_start,
            "outbox_backlog": [[t, b] for t, b, _, _ in sampler.rows],
            "rss_fd_samples": [[t, r, f] for t, _, r, f in sampler.rows],
            "verdict_counts": listener.labels,
            "note": (
                "burst latency: file closed (rename returned) -> verdict received by a "
                "subscriber (the broker forwards before it PUBACKs the daemon); the bare "
                "scorer is sampled before and after every burst round (interleaved); "
                "rss/fd growth from after the first burst round (warm) to the end of the soak; "
                "cpu ms/image: the daemon's (decode, hash, score, store, publish) against the "
                "bare scorer's (score only), a load-independent cross-check"
            ),
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
        print(json.dumps(result, indent=2))
        lost = burst_n != args.burst_images or result["soak_received"] != soaked
        return 1 if lost or sustained.get("sustained_received", 0) != args.images else 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if broker is not None:
            broker.terminate()
            broker.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
