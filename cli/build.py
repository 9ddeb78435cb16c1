"""``ngcal build``: fit, generate NG, calibrate, export and evaluate into one build folder.

``ngcal build --data D --out B`` runs the offline job with defaults (good images only, CPU):

    B/model/        PatchCore model (``ngcal fit``); GLASS score sets under scores/glass/
    B/glass/        GLASS synthetic NG (``ngcal generate glass``): LAS images, contact sheet
    B/diffusion/    diffusion NG (``ngcal generate diffusion``), with ``--diffusion`` or ``--ng``
    B/thresholds.json, B/report.html   (``ngcal calibrate``: normal + synthetic + real NG)
    B/bundle/       the verified ONNX bundle with its thresholds and evidence (``ngcal export``)
    B/evaluation.json   (``ngcal evaluate`` on the bundle, where D has a labelled test split)
    B/build.json    each step's input hashes, options, time and summary
    B/logs/<step>.txt   what each step printed

Each step calls the command's own ``run`` in this process. A step whose inputs (hashes of
the files it reads, and its options) match ``build.json`` and whose outputs exist and read
back (hashes verified, current formats) is reused, not redone; a changed input reruns that
step and everything after it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: generator -> the third-party module its extra brings (imported lazily by the generator)
GENERATOR_NEEDS = {"diffusion": "diffusers"}
log = logging.getLogger(__name__)

BUILD_FILE = "build.json"
BUILD_SCHEMA = "ngcal.build/1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal build``."""
    p.add_argument("--data", required=True, type=Path, help="category folder (MVTec layout)")
    p.add_argument("--out", required=True, type=Path, help="build folder (resumable)")
    p.add_argument("--ng", type=Path, default=None, help="folder of confirmed real NG images")
    p.add_argument(
        "--diffusion", action="store_true", help="also generate diffusion NG (when installed)"
    )
    p.add_argument("--config", type=Path, default=None, help="build.yaml with step options")
    p.add_argument("--force", action="store_true", help="redo every step")


def _config_model() -> Any:
    """The pydantic model of ``build.yaml`` (built lazily: pydantic only when needed)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class _Section(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    class Fit(_Section):
        #: None: ``ngcal fit`` chooses the geometry (``--auto``); a side pins it
        image_size: int | None = Field(default=None, ge=32)
        #: ``ngcal fit --auto``: image-score rule and part mask chosen from good images and
        #: synthetic NG (and the geometry too when ``image_size`` is None)
        auto: bool = True
        max_images: int | None = Field(default=None, ge=1)
        coreset_ratio: float = Field(default=0.01, gt=0, le=1)
        cv_folds: int = Field(default=5, ge=0)
        seed: int = 0

    class Glass(_Section):
        epochs: int = Field(default=10, ge=1)
        count: int = Field(default=64, ge=1)
        pool_images: int = Field(default=16, ge=1)
        hidden: int = Field(default=1024, ge=1)

    class Diffusion(_Section):
        # None: ``ngcal generate diffusion``'s own default
        count: int | None = Field(default=None, ge=1)
        candidates: int | None = Field(default=None, ge=1)
        train_steps: int | None = Field(default=None, ge=1)

    class Calibrate(_Section):
        # None: ``ngcal calibrate``'s own default
        mode: Literal["cost", "target_fpr", "f1", "miss_rate"] | None = None
        prevalence: float | None = Field(default=None, gt=0, lt=1)
        cost_ratio: float | None = Field(default=None, gt=0)
        target_fpr: float | None = Field(default=None, gt=0, lt=1)
        title: str | None = None

    class BuildConfig(_Section):
        fit: Fit = Fit()
        glass: Glass = Glass()
        diffusion: Diffusion = Diffusion()
        calibrate: Calibrate = Calibrate()

    return BuildConfig


def load_build_config(path: Path | None) -> Any:
    """``build.yaml`` (sections fit, glass, calibrate; unknown keys are errors), or defaults."""
    import yaml
    from pydantic import ValidationError

    from ngcal.core.errors import ConfigError

    model = _config_model()
    if path is None:
        return model()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return model.model_validate(raw)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({e})") from e
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"{path}: {loc}: {first['msg']}") from e


# ---------------------------------------------------------------------- hashing


def tree_fingerprint(root: Path, *, under: tuple[str, ...] = ()) -> str:
    """Hash of every file's relative path, size and mtime under ``root`` (or its ``under``)."""
    h = hashlib.sha256()
    bases = [root / u for u in under] if under else [root]
    for base in bases:
        if not base.exists():
            h.update(f"missing:{base.relative_to(root)}".encode())
            continue
        for f in sorted(base.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha(path: Path) -> str:
    """sha256 of a file, or 'missing'."""
    from ngcal.core.files import sha256_file

    return sha256_file(path) if path.is_file() else "missing"


# ---------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One step: the command it runs, what it reads (hashed) and what it must leave behind."""

    name: str
    what: str
    command: str
    argv: list[str]
    inputs: Callable[[], dict[str, str]]
    outputs: tuple[Path, ...]
    after: Callable[[str], dict[str, Any]] | None = None
    #: reads the outputs back (raises NgcalError when they are corrupt or of an older
    #: format); a step is reused only when this passes
    check: Callable[[], object] | None = None


def call_command(command: str, argv: list[str]) -> tuple[int, str]:
    """Run ``ngcal <command> <argv>`` through its module's ``run`` here; (rc, its stdout)."""
    mod = importlib.import_module(f"ngcal.cli.{command}")
    parser = argparse.ArgumentParser(prog=f"ngcal {command}")
    mod.add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = command
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = int(mod.run(args) or 0)
    return rc, buf.getvalue()


class Build:
    """The steps of one build folder and the record of what each last ran on."""

    def __init__(self, args: argparse.Namespace, cfg: Any) -> None:
        from ngcal.core.dataset import is_mvtec_category

        self.data: Path = args.data
        self.out: Path = args.out
        self.ng: Path | None = args.ng
        self.cfg = cfg
        self.force: bool = args.force
        #: diffusion NG when asked for, or when real NG with masks are given (it paints
        #: defects from them); real NG without masks still count in calibrate
        self.wants_diffusion: bool = bool(args.diffusion)
        if args.ng is not None and not args.diffusion:
            from ngcal.generation.diffusion.targets import has_masks

            self.wants_diffusion = has_masks(args.ng)
            if not self.wants_diffusion:
                log.warning(
                    "%s: no NG image has a mask (x.png + x_mask.png, or an MVTec "
                    "ground_truth/ folder), so no diffusion NG is learnt from them; they "
                    "still count as confirmed real NG in calibrate",
                    args.ng,
                )
        self.record_path = self.out / BUILD_FILE
        self.record: dict[str, Any] = {"schema": BUILD_SCHEMA, "steps": {}}
        if self.record_path.is_file():
            old = json.loads(self.record_path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and old.get("schema") == BUILD_SCHEMA:
                self.record = old
        self.labelled = is_mvtec_category(self.data) and (self.data / "test").is_dir()

    # paths
    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def bundle(self) -> Path:
        return self.out / "bundle"

    def steps(self) -> list[Step]:
        """The steps this build runs, in order."""
        from ngcal.core.bundle import open_bundle
        from ngcal.core.manifest import MANIFEST_NAME, read_manifest
        from ngcal.core.thresholds import load_thresholds

        c = self.cfg
        o = self.out

        def model_sha() -> str:
            return file_sha(self.model / MANIFEST_NAME)

        fit = c.fit
        steps = [
            Step(
                "fit",
                "PatchCore memory bank from the good images",
                "fit",
                [
                    *("--data", str(self.data), "--out", str(self.model)),
                    *(() if fit.image_size is None else ("--image-size", str(fit.image_size))),
                    *(("--auto",) if fit.auto else ()),
                    "--seed",
                    str(fit.seed),
                    *("--coreset-ratio", str(fit.coreset_ratio), "--cv-folds", str(fit.cv_folds)),
                    *(() if fit.max_images is None else ("--max-images", str(fit.max_images))),
                    "--quiet",
                ],
                lambda: {"data": tree_fingerprint(self.data, under=("train",))},
                (self.model / MANIFEST_NAME,),
                check=lambda: read_manifest(self.model, verify=True),
            ),
        ]
        g = c.glass
        steps.append(
            Step(
                "glass",
                "GLASS synthetic NG (feature- and image-space anomalies)",
                "generate",
                [
                    *("glass", "--model", str(self.model), "--data", str(self.data)),
                    *("--out", str(o / "glass"), "--seed", str(fit.seed)),
                    *("--epochs", str(g.epochs), "--count", str(g.count)),
                    *("--pool-images", str(g.pool_images), "--hidden", str(g.hidden)),
                    "--no-progress",
                ],
                lambda: {"model": model_sha()},
                (o / "glass" / "glass_run.json", self.model / "scores" / "glass"),
                after=lambda _out: self._adopt_scoresets(o / "glass" / "scores", "glass"),
            )
        )
        if self.wants_diffusion and _has_generator("diffusion"):
            d = c.diffusion
            d_argv = [
                *("diffusion", "--model", str(self.model), "--data", str(self.data)),
                *("--out", str(o / "diffusion"), "--seed", str(fit.seed), "--no-progress"),
            ]
            for flag, value in (
                ("--count", d.count),
                ("--candidates", d.candidates),
                ("--train-steps", d.train_steps),
            ):
                if value is not None:
                    d_argv += [flag, str(value)]
            if self.ng is not None:
                d_argv += ["--ng", str(self.ng)]
            steps.append(
                Step(
                    "diffusion",
                    "diffusion NG (defects painted from the real NG, or zero-NG), gated",
                    "generate",
                    d_argv,
                    lambda: {
                        "model": model_sha(),
                        "ng": "none" if self.ng is None else tree_fingerprint(self.ng),
                    },
                    (o / "diffusion" / "diffusion_run.json", self.model / "scores" / "diffusion"),
                    after=lambda _out: self._adopt_scoresets(
                        o / "diffusion" / "scores", "diffusion"
                    ),
                )
            )
        cal = c.calibrate
        title = cal.title or f"ngcal calibration: {self.data.resolve().name}"
        cal_argv = [
            *("--model", str(self.model), "--out", str(o / "thresholds.json")),
            *("--report", str(o / "report.html"), "--title", title),
        ]
        for flag, value in (
            ("--mode", cal.mode),
            ("--prevalence", cal.prevalence),
            ("--cost-ratio", cal.cost_ratio),
            ("--target-fpr", cal.target_fpr),
        ):
            if value is not None:
                cal_argv += [flag, str(value)]
        if self.ng is not None:
            cal_argv += ["--real-ng", str(self.ng)]
        steps.append(
            Step(
                "calibrate",
                "threshold from normal, synthetic and real NG scores; HTML report",
                "calibrate",
                cal_argv,
                lambda: {
                    "model": model_sha(),
                    "evidence": tree_fingerprint(self.model, under=("scores",)),
                    "ng": "none" if self.ng is None else tree_fingerprint(self.ng),
                },
                (o / "thresholds.json", o / "report.html"),
                check=lambda: load_thresholds(o / "thresholds.json"),
            )
        )
        steps.append(
            Step(
                "export",
                "verified ONNX bundle (parity-checked against torch) with the thresholds",
                "export",
                [
                    *("--model", str(self.model), "--out", str(self.bundle)),
                    *("--thresholds", str(o / "thresholds.json")),
                ],
                lambda: {
                    "model": model_sha(),
                    "evidence": tree_fingerprint(self.model, under=("scores",)),
                    "thresholds": file_sha(o / "thresholds.json"),
                },
                (self.bundle / MANIFEST_NAME,),
                check=lambda: open_bundle(self.bundle),
            )
        )
        if self.labelled:
            steps.append(
                Step(
                    "evaluate",
                    "the bundle on the labelled test split (onnxruntime)",
                    "evaluate",
                    [
                        *("--model", str(self.bundle), "--data", str(self.data), "--json"),
                        *("--csv", str(o / "evaluation.csv"), "--quiet"),
                    ],
                    lambda: {
                        "bundle": file_sha(self.bundle / MANIFEST_NAME),
                        "thresholds": file_sha(self.bundle / "thresholds.json"),
                        "test": tree_fingerprint(self.data, under=("test",)),
                    },
                    (o / "evaluation.json",),
                    after=self._save_evaluation,
                )
            )
        return steps

    def _adopt_scoresets(self, folder: Path, name: str) -> dict[str, Any]:
        """Copy generated score sets into the model's ``scores/<name>/``: calibrate reads them
        there and export ships them in the bundle as the daemon's recalibration evidence."""
        from ngcal.core.scoresets import load_scoresets, save_scoreset

        dest = self.model / "scores" / name
        shutil.rmtree(dest, ignore_errors=True)
        sets = load_scoresets([folder])
        for i, s in enumerate(sets):
            save_scoreset(dest / f"{name}_{i:02d}.json", s)
        return {"score_sets": len(sets), "items": sum(len(s) for s in sets)}

    def _save_evaluation(self, stdout: str) -> dict[str, Any]:
        result = json.loads(stdout.strip().splitlines()[-1])
        (self.out / "evaluation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return {k: result.get(k) for k in ("image_auroc", "pixel_auroc", "fpr", "fnr", "n_test")}

    # running
    def run_step(self, step: Step) -> tuple[str, float]:
        """Run or reuse one step; returns ('ran' | 'reused', seconds it took when it ran)."""
        from ngcal.core.errors import NgcalError

        key = _key(step.argv, step.inputs())
        old = self.record["steps"].get(step.name, {})
        if not self.force and old.get("key") == key and all(p.exists() for p in step.outputs):
            try:
                if step.check is not None:
                    step.check()
                return "reused", float(old.get("seconds", 0.0))
            except NgcalError as e:
                log.info(
                    "step %s: its outputs do not read back (%s); running it again", step.name, e
                )
        t0 = time.perf_counter()
        rc, stdout = call_command(step.command, step.argv)
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{step.name}.txt").write_text(stdout, encoding="utf-8")
        if rc:
            raise NgcalError(f"step {step.name} exited {rc}; its output is in {logs}")
        summary = step.after(stdout) if step.after is not None else {}
        seconds = time.perf_counter() - t0
        # inputs are hashed again after the run: a step that rewrote its own inputs
        # (glass adds score sets to the model) must not invalidate itself
        self.record["steps"][step.name] = {
            "key": _key(step.argv, step.inputs()),
            "argv": ["ngcal", step.command, *step.argv],
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "summary": summary,
        }
        self._save()
        return "ran", seconds

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2), encoding="utf-8")
        tmp.replace(self.record_path)


def _key(argv: list[str], inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps([argv, inputs], sort_keys=True).encode()).hexdigest()


def _has_generator(name: str) -> bool:
    """``ngcal generate <name>`` exists and its package imports (its extra is installed)."""
    from ngcal.cli.generate import GENERATORS

    if name not in GENERATORS:
        return False
    try:
        importlib.import_module(f"ngcal.generation.{name}")
    except ImportError:
        return False
    needs = GENERATOR_NEEDS.get(name)
    return needs is None or importlib.util.find_spec(needs) is not None


def _auroc(x: float | None) -> str:
    return "n/a" if x is None else f"{float(x):.3f}"


def summary_lines(build: Build, times: list[tuple[str, str, float]]) -> list[str]:
    """The end-of-build summary: a step table, then quality and the threshold's trade-off."""
    from ngcal.cli.readable import pct, seconds, table, trade_off
    from ngcal.core.thresholds import load_thresholds

    rows = [[name, how, seconds(s)] for name, how, s in times]
    lines = [table(rows, header=["step", "", "time"])]
    t = load_thresholds(build.bundle / "thresholds.json")
    sentence = trade_off(t)
    lines.append(sentence[:1].upper() + sentence[1:])
    ev = build.out / "evaluation.json"
    if build.labelled and ev.is_file():
        e = json.loads(ev.read_text(encoding="utf-8"))
        lines.append(
            f"On the labelled test split ({e.get('n_test')} images): image AUROC "
            f"{_auroc(e.get('image_auroc'))}; at this threshold {pct(e.get('fpr'))} of "
            f"good parts rejected, {pct(e.get('fnr'))} of defective ones missed."
        )
    else:
        lines.append("No labelled test split in the data: no AUROC (evaluate skipped).")
    lines.append(
        f"Bundle {build.bundle} (verified, thresholds and evidence inside); "
        f"report {build.out / 'report.html'}; record {build.record_path}"
    )
    return lines


def run_build(args: argparse.Namespace, *, say: Callable[[str], None] = print) -> Build:
    """Run every step of a build, saying what each does and how long it took."""
    from ngcal.core.dataset import is_mvtec_category
    from ngcal.core.errors import DataError

    if not args.data.is_dir():
        raise DataError(f"--data {args.data}: folder does not exist")
    if not is_mvtec_category(args.data):
        raise DataError(
            f"--data {args.data}: needs the MVTec-AD layout: good images in train/good "
            "(optionally test/good and test/<defect> to evaluate)"
        )
    build = Build(args, load_build_config(args.config))
    build.out.mkdir(parents=True, exist_ok=True)
    steps = build.steps()
    if build.wants_diffusion and not _has_generator("diffusion"):
        say('[build] diffusion NG: not in this install (pip install "ngcal[diffusion]"); skipped')
    times: list[tuple[str, str, float]] = []
    for i, step in enumerate(steps, 1):
        say(f"[build {i}/{len(steps)}] {step.name}: {step.what} ...")
        how, secs = build.run_step(step)
        from ngcal.cli.readable import seconds

        times.append((step.name, how, secs))
        done = "reused (inputs unchanged)" if how == "reused" else f"done in {seconds(secs)}"
        say(f"[build {i}/{len(steps)}] {step.name}: {done}")
    for line in summary_lines(build, times):
        say(line)
    return build


def run(args: argparse.Namespace) -> int:
    """Build; the exit code is 0 when every step succeeded."""
    run_build(args)
    sys.stdout.flush()
    return 0
