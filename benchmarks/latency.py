"""Per-image latency of the exported bundle (onnxruntime CPU) against the torch eager model.

Usage::

    python benchmarks/latency.py --data <category dir> [--model <model dir>] [--bundle <bundle>]

Without ``--model`` it fits one (``ngcal fit``, 256 px, default coreset) and without
``--bundle`` it exports one (``ngcal export``), both under ``--work``. Prints ONE JSON
object on stdout (progress on stderr):

* ``ort_p50_ms``/``ort_p99_ms`` and ``torch_p50_ms``/``torch_p99_ms``: per image, batch 1,
  measured in this run on the same test images, interleaved; ``*_b8_*``: batch 8, per image.
* ``ort_over_torch_p50``: goal <= 0.5.
* ``scorer_rss_mb``: peak RSS of a subprocess that only opens the bundle, decodes and
  scores images with onnxruntime, and asserts torch was never imported. Goal < 400.
* ``image_auroc``: the bundle's image AUROC on the test split (onnxruntime scores);
  ``speedup_vs_anomalib_ort``: the anchor's 32 ms over ``ort_p50_ms``.
* Why the ratio is what it is, from ``latency_parts.py`` on the same images:
  ``ort_backbone_ms``, ``torch_backbone_ms``, ``ort_over_torch_floor``, ``nn_ms``,
  ``nn_over_flop_bound`` (see there), and ``ort_over_torch_floor_at_flop_bound``: the
  ratio if onnxruntime ran its backbone as measured and its search at the search's own
  FLOP bound, with nothing else.

Speed against accuracy (bank fractions, input sizes): ``latency_profiles.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from latency_parts import measure_parts
from timing import (
    ANCHOR,
    ANOMALIB_ORT_MS,
    bench_runtimes,
    bundle_auroc,
    common_args,
    ensure_model_and_bundle,
    log,
    machine,
    timed_images,
)

RSS_SCRIPT = r"""
import json, resource, sys
import numpy as np
from ngcal.core.bundle import open_bundle
from ngcal.core.images import load_and_preprocess
from ngcal.core.runtime import open_scorer
bundle, threads, paths = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
b = open_bundle(bundle)
s = open_scorer(b, backend="ort-cpu", threads=threads)
for p in paths:
    s.score(load_and_preprocess(p, b.manifest.preprocessing)[None])
batch = np.stack([load_and_preprocess(p, b.manifest.preprocessing) for p in paths[:8]])
s.score(batch)
assert "torch" not in sys.modules, "torch was imported by the scorer path"
# VmHWM (peak RSS of this process image): ru_maxrss would include the parent's RSS at fork
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
rss_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_mb": rss_kb / 1024.0, "torch_imported": "torch" in sys.modules}))
"""


def scorer_rss(bundle: Path, paths: list[Path], threads: int) -> dict[str, Any]:
    """Peak RSS of a torch-free subprocess that opens the bundle and scores ``paths``:
    ``rss_mb`` and ``torch_imported``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(bundle), str(threads)],
        input=json.dumps([str(p) for p in paths]),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"scorer subprocess failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    args = common_args((__doc__ or "").split("\n")[0]).parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ngcal.core.bundle import open_bundle
    from ngcal.core.runtime import open_scorer
    from ngcal.patchcore.io import load_model

    model_dir, bundle_dir = ensure_model_and_bundle(args)
    bundle = open_bundle(bundle_dir)
    loaded = load_model(model_dir)
    if bundle.model_sha256 != loaded.sha256:
        raise SystemExit(f"{bundle_dir} was not exported from {model_dir}")
    paths, x = timed_images(args.data, bundle.manifest.preprocessing, args.images)
    log(f"{len(x)} test images at {x.shape[-1]} px, {args.threads} thread(s)")

    scorer = open_scorer(bundle, backend="ort-cpu", threads=args.threads)

    def torch_score(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return loaded.module(torch.from_numpy(batch))

    res = bench_runtimes({"ort": scorer.score, "torch": torch_score}, x, args.repeats)
    ort_res, torch_res = res["ort"], res["torch"]
    log(f"onnxruntime: {ort_res}; torch eager: {torch_res}")
    parts = measure_parts(loaded.module, x, args.threads, args.repeats)
    rss = scorer_rss(bundle_dir, paths, args.threads)
    log(f"scorer subprocess: {rss}")
    auroc = bundle_auroc(bundle_dir, args.data, args.threads)
    spec = bundle.manifest.patchcore
    floor_at_bound = parts["ort_backbone_ms"] + parts.pop("nn_own_flop_bound_ms")
    result = {
        "ort_p50_ms": ort_res["p50_ms"],
        "ort_p99_ms": ort_res["p99_ms"],
        "torch_p50_ms": torch_res["p50_ms"],
        "torch_p99_ms": torch_res["p99_ms"],
        "ort_b8_p50_ms": ort_res["b8_p50_ms"],
        "ort_b8_p99_ms": ort_res["b8_p99_ms"],
        "torch_b8_p50_ms": torch_res["b8_p50_ms"],
        "torch_b8_p99_ms": torch_res["b8_p99_ms"],
        "ort_over_torch_p50": ort_res["p50_ms"] / torch_res["p50_ms"],
        "scorer_rss_mb": rss["rss_mb"],
        "scorer_torch_imported": rss["torch_imported"],
        **parts,
        "ort_over_torch_floor_at_flop_bound": floor_at_bound / torch_res["p50_ms"],
        "image_auroc": auroc,
        "speedup_vs_anomalib_ort": ANOMALIB_ORT_MS / ort_res["p50_ms"],
        "anchor": ANCHOR,
        "threads": args.threads,
        "image_size": bundle.image_size,
        "memory_bank": [spec.coreset_size, spec.feature_dim],
        "coreset_ratio": spec.coreset_ratio,
        "image_score": spec.image_score,
        "precision": bundle.manifest.precision,
        "parity_max_abs_diff": bundle.manifest.parity_max_abs_diff,
        "images_timed": len(x),
        "repeats": args.repeats,
        **machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
