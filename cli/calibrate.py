"""``ngcal calibrate``: score sets of a model (and real NG) -> thresholds.json + HTML report.

Reads the model's or bundle's own ``scores/*.json``, every score set under each
``--scores`` folder, and ``--real-ng``: a folder of score-set files (source ``real_ng``) or a
folder of NG images, which are then scored with the model (the model directory through
``ngcal.patchcore``, which needs torch; a bundle through onnxruntime). Only the
stdlib is imported at module top.

The default mode is ``cost``: the factory states its operating point (defect prevalence
and what a miss costs in false rejects) and the threshold minimises expected cost there.
F1 assumes a prevalence that is rarely the line's, and a target FPR ignores misses.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("cost", "target_fpr", "f1", "miss_rate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal calibrate``."""
    from ngcal.core.thresholds import DEFAULT_COST_RATIO, DEFAULT_PREVALENCE

    p.add_argument("--model", required=True, type=Path, help="model directory or bundle")
    p.add_argument(
        "--scores",
        action="append",
        type=Path,
        default=[],
        help="extra folder or file of score sets (repeatable)",
    )
    p.add_argument(
        "--real-ng",
        action="append",
        type=Path,
        default=[],
        help="folder of real_ng score sets, or of confirmed NG images to score",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="cost",
        help="threshold rule (default cost: the operating point decides)",
    )
    p.add_argument("--target-fpr", type=float, default=0.01, help="for --mode target_fpr")
    p.add_argument("--confidence", type=float, default=0.95, help="for --mode target_fpr")
    p.add_argument(
        "--cost-ratio",
        type=float,
        default=DEFAULT_COST_RATIO,
        help=f"a miss costs this many false rejects (cost mode; default {DEFAULT_COST_RATIO:g})",
    )
    p.add_argument(
        "--prevalence",
        type=float,
        default=DEFAULT_PREVALENCE,
        help=f"share of defective parts on the line (cost and f1; default {DEFAULT_PREVALENCE:g})",
    )
    p.add_argument("--miss-rate", type=float, default=0.05, help="for --mode miss_rate")
    p.add_argument(
        "--required-severity",
        type=float,
        default=None,
        help="miss_rate mode: weakest synthetic severity that must be caught",
    )
    p.add_argument(
        "--prior-pseudo-count",
        type=float,
        default=None,
        help="how many real NG the synthetic NG evidence is worth (fusion prior; default 2)",
    )
    p.add_argument(
        "--audit",
        default=None,
        metavar="threshold=T,passed=N,caught=C,checked=n,escaped=x",
        help="random audit of passed parts at the threshold in force T: N passed, C caught, "
        "n of the passed checked, x of them defective; the NG evidence is anchored to the "
        "audited miss rate (decision 0304)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", required=True, type=Path, help="thresholds.json to write")
    p.add_argument("--report", type=Path, default=None, help="HTML report to write")
    p.add_argument("--title", default=None, help="report title (default: names the model's folder)")


def model_identity(root: Path) -> tuple[str, bool]:
    """(model sha256, is_bundle): bundle -> its model_sha256 field; model dir -> manifest hash."""
    from ngcal.core.manifest import BundleManifest, manifest_sha256, read_manifest

    manifest = read_manifest(root, verify=True)
    if isinstance(manifest, BundleManifest):
        return manifest.model_sha256, True
    return manifest_sha256(root), False


def _score_images(root: Path, is_bundle: bool, folder: Path, sha: str) -> Any:
    """Score NG images with the model (lazy torch or onnxruntime import)."""
    import numpy as np

    from ngcal.core.dataset import list_images
    from ngcal.core.scoresets import ScoreSet

    paths = list_images(folder)
    if is_bundle:
        from ngcal.core.bundle import open_bundle
        from ngcal.core.errors import ImageError
        from ngcal.core.images import load_and_preprocess
        from ngcal.core.runtime import open_scorer

        scorer = open_scorer(open_bundle(root), backend="ort-cpu", threads=1)
        ids, scores = [], []
        try:
            for p in paths:
                try:
                    x = load_and_preprocess(p, scorer.preprocessing)[None]
                except ImageError as e:
                    log.warning("skipping %s: %s", p, e.reason)
                    continue
                scores.append(float(scorer.score(x).image_scores[0]))
                ids.append(str(p.relative_to(folder)))
        finally:
            scorer.close()
    else:
        from ngcal.patchcore.io import load_model, score_paths

        scored = score_paths(load_model(root), paths)
        for bad_path, reason in scored.errors:
            log.warning("skipping %s: %s", bad_path, reason)
        bad = {str(p) for p, _ in scored.errors}
        ids = [str(p.relative_to(folder)) for p in paths if str(p) not in bad]
        scores = list(scored.scores)
    return ScoreSet(
        source="real_ng",
        scores=np.asarray(scores),
        item_ids=tuple(ids),
        model_sha256=sha,
        meta={"images": str(folder)},
    )


def save_evidence(thresholds: Path, sets: Any) -> Path:
    """Write every score set used beside ``thresholds`` (``ngcal export`` ships them)."""
    from ngcal.core.scoresets import evidence_dir, save_scoreset

    folder = evidence_dir(thresholds)
    folder.mkdir(parents=True, exist_ok=True)
    for s in sets:
        save_scoreset(folder / s.file_name, s)
    return folder


def run(args: argparse.Namespace) -> int:
    """Calibrate and write thresholds.json (and the report)."""
    from ngcal.calibration.estimate import CalibrationOptions, Provenance, calibrate
    from ngcal.core.errors import ArtifactError, ConfigError, DataError
    from ngcal.core.scoresets import SCORESET_SCHEMA, load_scoresets
    from ngcal.core.thresholds import OperatingPoint, save_thresholds

    root: Path = args.model
    sha, is_bundle = model_identity(root)
    sets = load_scoresets([root / "scores"]) if (root / "scores").is_dir() else []
    sets += load_scoresets(args.scores)
    for folder in args.real_ng:
        has_sets = folder.is_file() or any(
            SCORESET_SCHEMA in f.read_text(errors="ignore")[:200] for f in folder.rglob("*.json")
        )
        if has_sets:
            real = load_scoresets([folder])
            wrong = [s.source for s in real if s.source != "real_ng"]
            if wrong:
                raise ArtifactError(f"{folder}: --real-ng holds score sets of source {wrong[0]!r}")
            sets += real
        else:
            sets.append(_score_images(root, is_bundle, folder, sha))
    foreign = sorted({s.model_sha256 for s in sets if s.model_sha256 and s.model_sha256 != sha})
    if foreign:
        raise ArtifactError(
            f"score sets name model {foreign[0][:12]}..., but {root} is {sha[:12]}..."
        )
    if not sets:
        raise DataError(f"no score sets found under {root / 'scores'} or --scores")
    try:
        op = OperatingPoint(prevalence=args.prevalence, cost_ratio=args.cost_ratio)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise ConfigError(
            f"--prevalence {args.prevalence} / --cost-ratio {args.cost_ratio}: prevalence must "
            "be in (0, 1) and cost ratio > 0"
        ) from e
    options = CalibrationOptions(
        mode=args.mode,
        target_fpr=args.target_fpr,
        confidence=args.confidence,
        operating_point=op,
        miss_rate=args.miss_rate,
        required_severity=args.required_severity,
        seed=args.seed,
    )
    if args.prior_pseudo_count is not None:
        options = dataclasses.replace(options, prior_pseudo_count=args.prior_pseudo_count)
    if args.audit is not None:
        from ngcal.calibration.audit import parse_audit

        options = dataclasses.replace(options, audit=parse_audit(args.audit))
    t = calibrate(sets, options, provenance=Provenance(model_sha256=sha))
    evidence_dir = save_evidence(args.out, sets)
    save_thresholds(args.out, t)
    if args.report is not None:
        from ngcal.calibration.report import write_report

        title = args.title or f"ngcal calibration: {root.resolve().name}"
        write_report(args.report, sets, t, title=title)
    from ngcal.calibration.statements import WARN_MISS_RATE, sentence
    from ngcal.cli.readable import rate

    print(
        f"threshold {t.value:.6g} ({t.mode}, {t.method}); expected FPR {rate(t.expected_fpr)}, "
        f"miss rate {rate(t.expected_fnr)}"
    )
    print(sentence(t))
    ceiling, optimum = t.notes.get("synthetic_ceiling"), t.notes.get("cost_optimum")
    if t.method.endswith("_synthetic_ceiling") and ceiling is not None and optimum is not None:
        print(
            f"capped at the good parts' 99th percentile ({float(ceiling):.6g}; the cost optimum "
            f"on the evidence was {float(optimum):.6g}): the defect evidence is mostly "
            "synthetic, and look-alikes have read easier to catch than real defects "
            "(docs/decisions/0303)"
        )
    if t.notes.get("audit_anchor") is not None:
        n = t.notes
        print(
            f"audit at threshold {float(n['audit_threshold'] or 0):.6g}: {n['audit_anchor']} "
            f"(miss rate there {float(n.get('audit_fused_miss') or 0):.1%} on the evidence, "
            f"{float(n.get('audit_target_miss') or 0):.1%} used; docs/decisions/0304)"
        )
    fnr = t.expected_fnr.value if t.expected_fnr else None
    if fnr is not None and fnr > WARN_MISS_RATE:
        ratio = t.operating_point.cost_ratio if t.operating_point else args.cost_ratio
        print(
            f"warning: about {fnr:.0%} of defects would pass (above {WARN_MISS_RATE:.0%}); "
            f"raise --cost-ratio (now {ratio:g}) to catch more at the price of more false "
            "rejects, or add confirmed defects with --real-ng to measure it"
        )
    print(
        f"evidence: {t.evidence}; wrote {args.out} (score sets in {evidence_dir}/)"
        + (f" and {args.report}" if args.report else "")
    )
    return 0
