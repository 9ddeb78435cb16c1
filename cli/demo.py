"""``ngcal demo``: the whole loop on procedural parts, offline, in a few minutes on a CPU.

1. writes a procedural demo category (machined-surface parts; scratch, spot, dent defects);
2. ``ngcal build`` on it with fast settings (small images, a short GLASS run);
3. starts a private Mosquitto on a free loopback port and the daemon (``ngcal serve``);
4. drops test images into the camera folder and prints each verdict as it arrives;
5. plays the operator over MQTT as an MES would: ``cmd/confirm`` for real NG and a false
   alarm (or a good part), then ``cmd/recalibrate``; shows the ``recalibration`` event;
6. stops the daemon and the broker and says where the bundle, report and state are.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE, CAMERA, PREFIX = "demo-box", "cam1", "ngcal"
#: share of a defect's contrast kept in the faint parts
FAINT_STRENGTH = 0.25

FAST_BUILD = """# ngcal demo's fast settings: small images, a short GLASS run
fit: {{image_size: {size}, cv_folds: 3}}
glass: {{epochs: 2, count: 16, pool_images: 8, hidden: 256}}
calibrate: {{title: "ngcal calibration: demo part (procedural machined surface)",
            prevalence: {prevalence}, cost_ratio: {cost_ratio}}}
"""
#: the demo line's operating point: 10 % of parts defective, a miss costs 20 false rejects
PREVALENCE, COST_RATIO = 0.1, 20.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal demo``."""
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--image-size", type=int, default=96, help="model input side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo data and generators")
    p.add_argument("--train-images", type=int, default=30, help="good images to fit on")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the line")


def say(text: str) -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class Part:
    """One image dropped on the line: its file and what it really is."""

    name: str
    source: Path
    truth: str  # "good" or the defect kind


def pick_parts(data: Path, faint_dir: Path, *, seed: int) -> list[Part]:
    """Ten good and six defective test images (two of each defect), and one faint defect of
    each kind (what a line tends to miss), in a seeded order."""
    import numpy as np
    from PIL import Image

    from ngcal.generation.demo_data import DEFECTS, defective_part

    parts: list[Part] = []
    for kind_dir in sorted((data / "test").iterdir()):
        take = 10 if kind_dir.name == "good" else 2
        for i, f in enumerate(sorted(kind_dir.glob("*.png"))[:take]):
            parts.append(Part(f"part{len(parts):02d}_{kind_dir.name}{i}.png", f, kind_dir.name))
    faint_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1000)
    with Image.open(parts[0].source) as first:
        size = first.size[0]
    for kind in DEFECTS:
        img, _mask = defective_part(rng, size, kind, strength=FAINT_STRENGTH)
        path = faint_dir / f"{kind}_faint.png"
        Image.fromarray(img, mode="L").save(path)
        parts.append(Part(f"part{len(parts):02d}_{kind}_faint.png", path, kind))
    random.Random(seed).shuffle(parts)
    return parts


def drop(part: Part, camera: Path) -> None:
    """Copy an image into the camera folder the way a camera does: temp name, then rename."""
    tmp = camera / f".{part.name}.tmp"
    shutil.copyfile(part.source, tmp)
    tmp.replace(camera / part.name)


def run(args: argparse.Namespace) -> int:
    """The whole loop; every failure is an NgcalError with what to do about it."""
    from ngcal.cli.build import run_build
    from ngcal.cli.demo_line import Broker, find_mosquitto
    from ngcal.cli.readable import seconds
    from ngcal.generation.demo_data import make_demo_category

    t_start = time.perf_counter()
    out: Path = args.out
    find_mosquitto()  # fail before any work when the broker is missing
    data, build_dir, line = out / "data", out / "build", out / "line"
    say("ngcal demo: the whole loop on procedural parts, offline (about 1-3 minutes on a CPU)")
    if not (data / "train" / "good").is_dir():
        say(f"[demo] writing the procedural demo category to {data} (a few seconds)")
        make_demo_category(
            data,
            n_train=args.train_images,
            n_test_good=10,
            n_test_per_defect=4,
            size=128,
            seed=args.seed,
        )
    cfg = out / "build.yaml"
    cfg.write_text(
        FAST_BUILD.format(size=args.image_size, prevalence=PREVALENCE, cost_ratio=COST_RATIO),
        encoding="utf-8",
    )
    say(
        "[demo] ngcal build: fit PatchCore (~15 s), generate GLASS NG (~5-20 s), calibrate "
        "(~5 s), export ONNX (~5 s), evaluate (~1 s)"
    )
    build_args = argparse.Namespace(
        data=data, out=build_dir, ng=None, diffusion=False, config=cfg, force=False
    )
    build = run_build(build_args, say=lambda s: say("\n".join("  " + x for x in s.splitlines())))
    say("[demo] starting a private Mosquitto broker on a free loopback port")
    broker = Broker(line / "broker")
    broker.start()
    try:
        rc = _line(args, build.bundle, line, broker.port, data)
    finally:
        broker.stop()
    say(f"[demo] broker stopped; whole demo took {seconds(time.perf_counter() - t_start)}")
    say(f"[demo] bundle:  {build.bundle}")
    say(f"[demo] report:  {build_dir / 'report.html'}")
    say(f"[demo] state:   {line / 'state'} (see it: ngcal status --state-dir {line / 'state'})")
    say(f"[demo] daemon:  config {line / 'daemon.yaml'}, log {line / 'daemon.log'}")
    return rc


def _line(args: argparse.Namespace, bundle: Path, line: Path, port: int, data: Path) -> int:
    """Daemon + MES on the running broker: verdicts, confirmations, recalibration."""
    from ngcal.cli.demo_line import DaemonProcess, Mes, daemon_config
    from ngcal.cli.readable import seconds

    shutil.rmtree(line / "state", ignore_errors=True)
    shutil.rmtree(line / "camera", ignore_errors=True)
    config = daemon_config(
        line,
        bundle=bundle,
        port=port,
        device=DEVICE,
        camera=CAMERA,
        prevalence=PREVALENCE,
        cost_ratio=COST_RATIO,
    )
    mes = Mes(port, prefix=PREFIX, device=DEVICE)
    daemon = DaemonProcess(config, line / "daemon.log")
    say(f"[demo] starting the daemon: ngcal serve --config {config} (a few seconds)")
    t0 = time.perf_counter()
    daemon.start()
    try:
        _wait_for(
            mes,
            daemon,
            args.timeout,
            lambda t, b: t.endswith("/availability") and b == "online",
            what="availability 'online'",
        )
        say(f"[demo] daemon online after {seconds(time.perf_counter() - t0)}")
        operator = Operator(mes, daemon, args.timeout)
        parts = pick_parts(data, line / "faint", seed=args.seed)
        verdicts = operator.watch_line(parts, line / "camera")
        operator.confirm(verdicts)
        operator.recalibrate()
    finally:
        mes.close()
        say("[demo] stopping the daemon (SIGTERM: it drains, publishes offline, exits)")
        rc = daemon.stop()
        say(f"[demo] daemon exited with code {rc}")
    return 0 if rc == 0 else 1


def _wait_for(
    mes: Any, daemon: Any, timeout: float, match: Any, *, since: int = 0, what: str
) -> tuple[int, str, Any]:
    """The first message from ``since`` on that matches; checks the daemon is still alive."""
    from ngcal.core.errors import NgcalError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.check_alive()
        got = mes.find(match, since, min(0.5, deadline - time.monotonic()))
        if got is not None:
            return got  # type: ignore[no-any-return]
    raise NgcalError(f"no {what} arrived within {timeout:g} s; see {daemon.log}")


class Operator:
    """The MES and its operator: watches verdicts, confirms, asks for a recalibration."""

    def __init__(self, mes: Any, daemon: Any, timeout: float) -> None:
        self.mes, self.daemon, self.timeout = mes, daemon, timeout

    def watch_line(self, parts: list[Part], camera: Path) -> list[tuple[Part, dict[str, Any]]]:
        """Drop each part and print its verdict as it arrives (a small live table)."""
        from ngcal.cli.readable import num

        say(f"[demo] dropping {len(parts)} images into {camera}; verdicts arrive over MQTT:")
        say(f"  {'image':24s} {'really':8s} {'verdict':7s} {'score':>8s} {'threshold':>9s}")
        by_name = {p.name: p for p in parts}
        got: list[tuple[Part, dict[str, Any]]] = []
        for part in parts:
            drop(part, camera)
            time.sleep(0.15)
        since = 0
        while len(got) < len(parts):
            index, _topic, body = self._wait(
                lambda t, b: t.endswith("/verdict"),
                since=since,
                what="verdict",
            )
            since = index + 1
            seen = by_name.get(Path(str(body.get("image"))).name)
            if seen is None:
                continue
            got.append((seen, body))
            flag = "" if (body["verdict"] == "NG") == (seen.truth != "good") else "  <- wrong"
            say(
                f"  {seen.name:24s} {seen.truth:8s} {body['verdict']:7s} "
                f"{num(body.get('score')):>8s} {num(body.get('threshold')):>9s}{flag}"
            )
        return got

    def _wait(self, match: Any, *, since: int, what: str) -> tuple[int, str, Any]:
        return _wait_for(self.mes, self.daemon, self.timeout, match, since=since, what=what)

    def _ack(self, rid: str, since: int) -> dict[str, Any]:
        _i, _topic, body = self._wait(
            lambda t, b: (
                t.endswith("/cmd/ack") and isinstance(b, dict) and b.get("request_id") == rid
            ),
            since=since,
            what=f"cmd/ack for {rid}",
        )
        return body  # type: ignore[no-any-return]

    def confirm(self, verdicts: list[tuple[Part, dict[str, Any]]]) -> None:
        """Confirm every defective part NG and the false alarms (or the top good part) OK."""
        from ngcal.cli.readable import num

        ng = [(p, v) for p, v in verdicts if p.truth != "good"]
        good = sorted(
            ((p, v) for p, v in verdicts if p.truth == "good"),
            key=lambda pv: -float(pv[1].get("score") or 0.0),
        )
        false_alarms = [(p, v) for p, v in good if v["verdict"] == "NG"]
        ok = false_alarms or good[:1]
        say(
            f"[demo] the operator confirms {len(ng)} real NG and "
            + (
                f"{len(ok)} false alarm(s) OK"
                if false_alarms
                else "(no false alarm this run) the highest-scoring good part OK"
            )
            + f", over MQTT: {PREFIX}/{DEVICE}/cmd/confirm"
        )
        for part, v, label in [*((p, v, "NG") for p, v in ng), *((p, v, "OK") for p, v in ok)]:
            mark = self.mes.mark()
            rid = self.mes.command("confirm", {"msg_id": v["msg_id"], "label": label})
            ack = self._ack(rid, mark)
            say(
                f"  confirm {part.name} {label} (score {num(v.get('score'))}): "
                f"ack {ack['status']}" + (f" ({ack['reason']})" if ack.get("reason") else "")
            )

    def recalibrate(self) -> None:
        """``cmd/recalibrate``; print the ack and the recalibration event (moved or why not)."""
        from ngcal.cli.readable import num

        say(f"[demo] the MES asks for a recalibration: {PREFIX}/{DEVICE}/cmd/recalibrate")
        mark = self.mes.mark()
        rid = self.mes.command("recalibrate", {})
        ack = self._ack(rid, mark)
        _i, _topic, event = self._wait(
            lambda t, b: t.endswith("/recalibration"),
            since=mark,
            what="recalibration event",
        )
        from ngcal.cli.demo_line import GAIN_LEVEL, MAX_STEP, MIN_REAL_NG
        from ngcal.cli.readable import pct, trade_off
        from ngcal.core.thresholds import ThresholdFile

        old = ThresholdFile.model_validate(event["old"])
        evidence = (event.get("audit") or {}).get("evidence") or {}
        real = ", ".join(f"{v} {k}" for k, v in sorted(evidence.items()) if k.startswith("real"))
        say(f"  evidence: {real or 'no confirmations'} plus the bundle's normal and GLASS sets")
        if event.get("applied") and event.get("new"):
            new = ThresholdFile.model_validate(event["new"])
            move = (new.value - old.value) / abs(old.value)
            limit = pct(MAX_STEP, digits=0)
            say(
                f"[demo] recalibration applied (ack {ack['status']}): threshold "
                f"v{old.version} {num(old.value)} -> v{new.version} {num(new.value)} "
                f"({'+' if move >= 0 else ''}{pct(move)}; the step limit is {limit})"
            )
            say(f"  before: {trade_off(old)}")
            say(f"  now:    {trade_off(new)}")
        else:
            proposed = event.get("proposed")
            say(
                f"[demo] recalibration not applied (ack {ack['status']}): threshold stays "
                f"v{old.version} {num(old.value)}"
                + (f"; proposed {num(proposed.get('value'))}" if proposed else "")
            )
        say(
            f"  guard rails (at least {MIN_REAL_NG} confirmed NG, steps of at most "
            f"{pct(MAX_STEP, digits=0)}, a cost gain at least {pct(GAIN_LEVEL, digits=0)} sure;"
            f" the daemon's default is 90%): {event.get('reason')}"
        )
