"""Edge daemon benchmark: latency file-closed -> verdict, sustained throughput, RSS growth.

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
   10% of the images and at the end gives ``rss_growth``.

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000, help="images in the throughput run")
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
        cfg = work / "daemon.yaml"
        cfg.write_text(f"""device_id: bench
bundle: {bundle}
state_dir: {work / "state"}
cameras:
  - id: cam
    watch: {watch}
runtime:
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
            [sys.executable, "-m", "ngcal.cli.main", "-v", "serve", "--config", str(cfg)],
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

        # ---- sustained throughput and RSS, in segments; between segments (daemon idle)
        # the bare scorer is sampled, so both see the same neighbours' load on shared CPUs
        base = len(listener.got)
        n = args.images
        seg = max(1, min(args.segment, n))
        rss_warm = None
        rss_samples = []
        bare_samples = [bare]
        written = 0
        names: list[str] = []
        deleted = 0
        busy_s = 0.0
        daemon_cpu = 0.0
        while written < n:
            seg_start, seg_end = written, min(n, written + seg)
            cpu0 = cpu_seconds(daemon.pid)
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
            daemon_cpu += cpu_seconds(daemon.pid) - cpu0
            if rss_warm is None and written >= n // 10:
                rss_warm = rss_mb(daemon.pid)
            rss_samples.append((written, rss_mb(daemon.pid)))
            bare_samples.append(bare_scorer.sample())
            log(
                f"{written}/{n} verdicts, {written / busy_s:.2f} img/s, bare "
                f"{bare_samples[-1]['score_only']:.2f} img/s, RSS {rss_samples[-1][1]:.1f} MB"
            )
        received = sum(1 for k in names if k in listener.got)
        rss_end = rss_mb(daemon.pid)
        ips = received / busy_s
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
        bare_ips = float(np.mean([b["score_only"] for b in bare_samples]))
        bare_pipe = float(np.mean([b["with_decode"] for b in bare_samples]))
        bare_cpu = float(np.mean([b["cpu_ms_per_image"] for b in bare_samples]))
        daemon_cpu_ms = 1e3 * daemon_cpu / received
        result = {
            "bundle": str(args.bundle),
            "engine": bare_scorer.name,
            "images": n,
            "received": received,
            "batch_size": args.batch,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "p99_over_p50": round(float(np.percentile(lat, 99) / np.percentile(lat, 50)), 3),
            "latency_images": int(lat.size),
            "latency_pace_images_per_second": round(1.0 / interval, 2),
            "images_per_second": round(ips, 2),
            "bare_scorer_images_per_second": round(bare_ips, 2),
            "bare_scorer_samples": [round(b["score_only"], 2) for b in bare_samples],
            "bare_pipeline_images_per_second": round(bare_pipe, 2),
            "throughput_ratio": round(ips / bare_ips, 3),
            "throughput_ratio_vs_pipeline": round(ips / bare_pipe, 3),
            "daemon_cpu_ms_per_image": round(daemon_cpu_ms, 2),
            "bare_scorer_cpu_ms_per_image": round(bare_cpu, 2),
            "cpu_throughput_ratio": round(bare_cpu / daemon_cpu_ms, 3),
            "rss_warm_mb": None if rss_warm is None else round(rss_warm, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_growth": None if not rss_warm else round((rss_end - rss_warm) / rss_warm, 4),
            "rss_samples_mb": [(k, round(v, 1)) for k, v in rss_samples],
            "verdict_counts": listener.labels,
            "note": (
                "throughput over segments of --segment images; the bare scorer is sampled "
                "before and after every segment (same load from neighbours on shared CPUs); "
                "cpu_throughput_ratio = bare CPU ms/image over daemon CPU ms/image"
            ),
            "cpu_count": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
        return 0 if received == n else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
        if broker is not None:
            broker.terminate()
            broker.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
