"""``export_bundle``: model directory -> verified bundle (ONNX, optional TensorRT engine).

Order of work, so that nothing half-done is ever visible at ``out``:

1. If a TensorRT engine is requested, open TensorRT and the GPU first (fail fast, with a
   clear BackendError, before any work).
2. Load the model directory (hash-verified) and export the ONNX into a temporary folder
   beside ``out``.
3. Parity: onnxruntime CPU (the edge runtime, ``ngcal.core.runtime``) against torch on
   fixed inputs; over the bound -> ArtifactError and nothing is installed.
4. Copy the score sets (their ``model_sha256`` filled in with the model's): the model's
   own, plus every set the optional thresholds were calibrated on (synthetic NG included,
   from the evidence folder ``ngcal calibrate`` wrote beside them, checked against their
   recorded digests); write the manifest last (sha256 of every file), then the thresholds
   (unhashed but digest-signed, bound to the model by sha256; see ``ngcal.core.bundle``).
5. Install atomically at ``out`` (``install_bundle``: the replaced bundle is kept as
   ``<out>.prev``).
6. TensorRT: build this GPU's engine into ``<out>/engines`` through the same cache the
   device uses (``ngcal.core.trt_backend``) and check its parity too.

Bank fraction (``bank_fraction`` F < 1, the speed knob of the nearest-neighbour search):
the bundle keeps the first ceil(F * M) rows of the memory bank. ``ngcal fit`` stores the
bank in greedy k-center SELECTION order (``patchcore/coreset.py`` appends each pick
to its list and returns it unsorted; ``fitting.py`` writes ``flat[main_idx]`` as is), so
a prefix is exactly the greedy coreset a fit with ``coreset_ratio * F`` would have
selected (same seed, same projection; ``tests/export/test_bank_fraction.py`` checks it).
The torch reference of the parity check uses the same prefix. The model's score sets
(leave-one-out, holdout) were computed against the FULL bank and would understate the
reduced bundle's normal scores, so a reduced bundle ships without them and refuses
``--thresholds``; for a deployable reduced model with matching normal evidence, fit with
``--coreset-ratio`` = ratio * F (the same bank) and export that.

FP16: the ONNX graph stays FP32 (onnxruntime's x86 CPU kernels have no fast FP16 GEMM or
convolution and would only add casts); ``precision`` is recorded in the manifest and is
the default for engines built from the bundle (TensorRT's FP16 builder flag, or the ORT
TensorRT provider's ``trt_fp16_enable``), whose parity uses the looser FP16 bound.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from ngcal.core.bundle import SCORES_DIR, THRESHOLDS_NAME, install_bundle, open_bundle
from ngcal.core.errors import ArtifactError, ConfigError
from ngcal.core.manifest import BundleManifest, write_manifest
from ngcal.core.scoresets import evidence_dir, load_scoreset, load_scoresets, save_scoreset
from ngcal.core.thresholds import ThresholdFile, load_thresholds, save_thresholds

from .parity import RTOL, Parity, check_parity, parity_inputs, torch_scores

if TYPE_CHECKING:
    from ngcal.core.trt_backend import TrtToolkit
    from ngcal.patchcore.model import PatchCore

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class ExportReport:
    """What ``export_bundle`` wrote and measured."""

    bundle: Path
    onnx_bytes: int
    opset: int
    exporter: str
    fast_map: bool
    parity: Parity
    seconds: float
    engine: Path | None = None
    engine_parity: Parity | None = None
    bank_rows: int = 0


def bank_prefix_rows(total: int, fraction: float) -> int:
    """Rows kept of a bank of ``total`` rows at ``fraction`` in (0, 1]: ceil(F * M), >= 1."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--bank-fraction {fraction}: must be in (0, 1]")
    return max(1, min(total, math.ceil(fraction * total - 1e-9)))


def truncate_bank(pc: PatchCore, rows: int) -> PatchCore:
    """A PatchCore sharing ``pc``'s embedder whose bank is the first ``rows`` bank rows."""

    if rows >= pc.memory_bank.shape[0]:
        return pc
    return pc.with_bank(pc.memory_bank[:rows].clone())


def _copy_scoresets(
    model_dir: Path,
    dest: Path,
    model_sha256: str,
    thr: ThresholdFile | None = None,
    thresholds: Path | None = None,
) -> list[str]:
    """Copy the model's score sets, then every other set ``thr`` was calibrated on.

    The thresholds' own sets come from the evidence folder ``ngcal calibrate`` wrote beside
    them (``evidence_dir``); each must match its recorded content digest, so the device
    recalibrates on exactly the evidence that set the first threshold.
    """
    folder = model_dir / "scores"
    names, have = [], set()
    for f in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        for s in load_scoresets([f]):
            rel = f.relative_to(model_dir).as_posix()
            save_scoreset(dest / rel, dataclasses.replace(s, model_sha256=model_sha256))
            names.append(rel)
            have.add(s.content_sha256)
    if thr is None or thresholds is None:
        return names
    if not thr.scoresets:
        log.warning("%s names no score sets (written before ngcal recorded them)", thresholds)
    src = evidence_dir(thresholds)
    for ref in thr.scoresets:
        if ref.sha256 in have:
            continue
        path = src / ref.name
        if not path.is_file():
            raise ArtifactError(
                f"{thresholds}: score set {ref.name} it was calibrated on is missing from "
                f"{src}/; calibrate again or copy the folder along"
            )
        s = load_scoreset(path)
        if s.content_sha256 != ref.sha256:
            raise ArtifactError(f"{path}: content differs from the one {thresholds} names")
        rel = f"{SCORES_DIR}/{ref.name}"
        save_scoreset(dest / rel, dataclasses.replace(s, model_sha256=model_sha256))
        names.append(rel)
        have.add(ref.sha256)
    return names


def export_bundle(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("onnx",),
    precision: str = "fp32",
    thresholds: str | os.PathLike[str] | None = None,
    exporter: str = "legacy",
    parity_images: Sequence[str | os.PathLike[str]] = (),
    parity_rtol: float | None = None,
    max_batch: int = 8,
    toolkit: TrtToolkit | None = None,
    bank_fraction: float = 1.0,
) -> ExportReport:
    """Export ``model_dir`` to a bundle at ``out``; see the module docstring for the steps."""
    import torch

    from ngcal.core.ort_backend import OrtScorer
    from ngcal.patchcore.io import load_model

    from .onnx_graph import export_onnx

    t0 = time.perf_counter()
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format {bad or formats}: use one or more of {list(FORMATS)}")
    if precision not in RTOL:
        raise ConfigError(f"--precision {precision!r}: use fp32 or fp16")
    if exporter not in ("legacy", "dynamo"):
        raise ConfigError(f"exporter {exporter!r}: use legacy or dynamo")
    tk = None
    if "tensorrt" in formats:
        from ngcal.core.trt_backend import load_toolkit

        tk = toolkit if toolkit is not None else load_toolkit()
    if not 0.0 < bank_fraction <= 1.0:
        raise ConfigError(f"--bank-fraction {bank_fraction}: must be in (0, 1]")
    if bank_fraction < 1.0 and thresholds is not None:
        raise ConfigError(
            f"--thresholds with --bank-fraction {bank_fraction}: thresholds calibrated on the "
            "full bank do not hold for a reduced one; fit with a smaller --coreset-ratio instead"
        )
    thr = load_thresholds(Path(thresholds)) if thresholds is not None else None

    loaded = load_model(model_dir)
    full_rows = int(loaded.module.memory_bank.shape[0])
    rows = bank_prefix_rows(full_rows, bank_fraction)
    pc = truncate_bank(loaded.module, rows)
    spec = loaded.manifest.patchcore
    if rows < full_rows:
        log.info("bank fraction %g: first %d of %d rows", bank_fraction, rows, full_rows)
        spec = spec.model_copy(
            update={"coreset_size": rows, "coreset_ratio": spec.coreset_ratio * rows / full_rows}
        )
    if thr is not None and thr.model_sha256 and thr.model_sha256 != loaded.sha256:
        raise ArtifactError(
            f"{thresholds}: thresholds belong to model {thr.model_sha256[:12]}..., "
            f"not to {model_dir} ({loaded.sha256[:12]}...)"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".ngcal-export-{out.name}-", dir=out.parent))
    try:
        module, opset = export_onnx(
            pc,
            tmp / "model.onnx",
            exporter="dynamo" if exporter == "dynamo" else "legacy",
        )
        batch = parity_inputs(loaded.preprocessing, parity_images)
        reference = torch_scores(pc, batch)
        scorer = OrtScorer(tmp / "model.onnx", loaded.preprocessing, threads=1, max_batch=max_batch)
        parity = check_parity(scorer, reference, batch, rtol=parity_rtol or RTOL["fp32"])
        scorer.close()
        log.info("ORT parity: max |diff| %.3g (bound %.3g)", parity.max_abs_diff, parity.tolerance)
        if not parity.ok:
            raise ArtifactError(
                f"{model_dir}: onnxruntime differs from torch by {parity.max_abs_diff:.3g} "
                f"(bound {parity.tolerance:.3g}); bundle not written"
            )
        reduced: dict[str, str] = {}
        if rows < full_rows:
            reduced = {
                "bank_fraction": f"{bank_fraction:g}",
                "bank_rows_source": str(full_rows),
                "bank_selection": "greedy k-center prefix",
                "scoresets": "omitted: computed on the full bank",
            }
        else:
            _copy_scoresets(
                loaded.root,
                tmp,
                loaded.sha256,
                thr,
                None if thresholds is None else Path(thresholds),
            )
        if spec.foreground is not None:  # in the graph already; the file shows what it is
            shutil.copyfile(loaded.root / spec.foreground, tmp / spec.foreground)
        manifest = BundleManifest(
            model_sha256=loaded.sha256,
            backbone=loaded.manifest.backbone,
            preprocessing=loaded.manifest.preprocessing,
            patchcore=spec,
            onnx_opset=opset,
            precision=cast(Literal["fp32", "fp16"], precision),
            parity_max_abs_diff=parity.max_abs_diff,
            extra={
                "exporter": exporter,
                "fast_map": str(module.fast_map).lower(),
                "parity_tolerance": f"{parity.tolerance:.6g}",
                "parity_inputs": str(len(batch)),
                "anomaly_map_max_abs_diff": f"{parity.map_max_abs_diff or 0.0:.6g}",
                "torch": torch.__version__,
                **reduced,
            },
        )
        write_manifest(tmp, manifest)
        if thr is not None:
            save_thresholds(
                tmp / THRESHOLDS_NAME, thr.model_copy(update={"model_sha256": loaded.sha256})
            )
        bundle = install_bundle(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    engine = engine_parity = None
    if tk is not None:
        engine, engine_parity = _build_engine(
            bundle.root, tk, precision, max_batch, batch, reference
        )
    return ExportReport(
        bundle=bundle.root,
        onnx_bytes=(bundle.root / "model.onnx").stat().st_size,
        opset=opset,
        exporter=exporter,
        fast_map=module.fast_map,
        parity=parity,
        seconds=time.perf_counter() - t0,
        engine=engine,
        engine_parity=engine_parity,
        bank_rows=rows,
    )


def _build_engine(
    root: Path,
    toolkit: TrtToolkit,
    precision: str,
    max_batch: int,
    batch: object,
    reference: tuple[object, object],
) -> tuple[Path, Parity]:
    """Build (or reuse) this GPU's engine for the bundle at ``root`` and check its parity."""
    import numpy as np

    from ngcal.core.runtime import engine_cache_dir
    from ngcal.core.trt_backend import engine_paths, open_trt_scorer

    bundle = open_bundle(root)
    cache = engine_cache_dir(bundle, None)
    scorer = open_trt_scorer(
        bundle,
        cache_dir=cache,
        precision=precision,
        max_batch=max_batch,
        toolkit=toolkit,
    )
    ref = (np.asarray(reference[0]), np.asarray(reference[1]))
    parity = check_parity(scorer, ref, np.asarray(batch), rtol=RTOL[precision])
    path = engine_paths(cache, scorer.key)[0]
    scorer.close()
    if not parity.ok:
        raise ArtifactError(
            f"{path}: TensorRT ({precision}) differs from torch by {parity.max_abs_diff:.3g} "
            f"(bound {parity.tolerance:.3g})"
        )
    return path, parity
