"""Where the bundle's time goes: the backbone alone and the nearest-neighbour search alone.

Usage::

    python benchmarks/latency_parts.py --data <category dir> [--model M] [--bundle B]

Prints ONE JSON object (progress on stderr; ``--model``/``--bundle`` as in ``latency.py``):

* ``ort_backbone_ms``/``torch_backbone_ms``: the backbone part alone (image -> pooled
  feature levels) in each runtime, and ``torch_nn_ms`` torch's own search, timed
  interleaved one image at a time. ``ort_over_torch_floor`` = their ratio: the lowest
  end-to-end ``ort_over_torch_p50`` reachable while the exact search costs both runtimes
  alike ((a + S) / (b + S) >= a / b for a <= b).
* ``nn_ms``: onnxruntime time of the bundle's own search (per feature level where the
  export factors it) on one image's real patch features; ``nn_over_flop_bound``: over the
  matmul FLOP bound of the direct search, 2*P*M*D flops (``nn_gflop``) at the rate of a
  big fp32 matmul measured in this run (best of torch and onnxruntime, ``matmul_gflops``);
  goal <= 2. ``nn_over_own_flop_bound``: over the factored search's own, smaller FLOP count
  (``nn_gflop_own``: 2*M*(P*(1+D_0) + P_1*D_1)).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from timing import (
    common_args,
    ensure_model_and_bundle,
    log,
    machine,
    matmul_gflops,
    ort_session_of,
    stats_ms,
    timed,
    timed_images,
)


def bench_nn(exp: Any, x1: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """onnxruntime p50 of the exported nearest-neighbour search alone on one image's patches
    (the bundle's own form, with the export's graph rewrite) and its matmul FLOPs.
    ``exp``: the model's ``ExportPatchCore``; ``x1`` one preprocessed image [1, 3, S, S]."""
    import torch

    from ngcal.export.onnx_passes import resize_channels_last
    from ngcal.patchcore.nn_search import factored_flops

    class NN(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = exp.nearest(q)[0]
            return out

    class Levels(torch.nn.Module):
        def forward(
            self, fine: torch.Tensor, coarse: torch.Tensor, feats: torch.Tensor
        ) -> torch.Tensor:
            out: torch.Tensor = exp.nearest_levels([fine, coarse], feats)
            return out

    with torch.inference_mode():
        levels = exp.embedder.levels(torch.from_numpy(x1))
        feats = exp.embedder.combine(levels)
    q = feats.reshape(-1, feats.shape[-1]).contiguous()
    factored = bool(exp.factored) and len(levels) == 2
    if factored:
        module: torch.nn.Module = Levels()
        args = tuple(t.contiguous() for t in (levels[0], levels[1], feats))
        names = ["fine", "coarse", "feats"]
    else:
        module, args, names = NN(), (q,), ["q"]
    sess = ort_session_of(module, args, names, threads, resize_channels_last)
    feed = [{n: a.numpy() for n, a in zip(names, args, strict=True)}]
    p50, _ = stats_ms(timed(lambda f: sess.run(None, f), feed, repeats))
    p, d = q.shape
    m = exp.bank_rows
    grids = [(int(lv.shape[2]), int(lv.shape[3])) for lv in levels]
    direct, fact = factored_flops(grids, [int(lv.shape[1]) for lv in levels])
    return {
        "nn_ms": p50,
        "nn_gflop": 2.0 * p * m * d / 1e9,
        "nn_gflop_own": 2.0 * m * (fact if factored else direct) / 1e9,
        "nn_factored": float(factored),
        "patches": p,
        "bank_rows": m,
        "dim": d,
    }


def bench_backbone(
    pc: Any, exp: Any, x: np.ndarray, threads: int, repeats: int
) -> dict[str, float]:
    """p50 of the backbone part alone (image -> pooled feature levels) in onnxruntime (the
    export's embedder: static "same" padding folded into the Convs) and in torch eager, and
    of torch's own search, interleaved one image at a time (``*_ms``).
    ``pc``: the torch model (PatchCore); ``exp``: its ``ExportPatchCore``."""
    import torch

    from ngcal.export.onnx_passes import fold_pads_into_convs

    class Backbone(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
            return list(exp.embedder.levels(image))

    sess = ort_session_of(
        Backbone(), (torch.from_numpy(x[:1]),), ["image"], threads, fold_pads_into_convs
    )

    def ort_backbone(a: np.ndarray) -> object:
        return sess.run(None, {"image": a})

    def torch_backbone(a: np.ndarray) -> object:
        with torch.inference_mode():
            return pc.embedder.levels(torch.from_numpy(a))

    with torch.inference_mode():
        feeds = []
        for i in range(len(x)):
            levels = pc.embedder.levels(torch.from_numpy(x[i : i + 1]))
            feeds.append((levels, pc.embedder.combine(levels)))

    def torch_search(k: int) -> object:
        levels, feats = feeds[k]
        with torch.inference_mode():
            if pc.factored(levels):
                return pc.level_patch_scores(levels, feats)
            return pc.patch_scores(feats)

    singles = [x[i : i + 1] for i in range(len(x))]
    fns = {"ort_backbone": ort_backbone, "torch_backbone": torch_backbone}
    times: dict[str, list[float]] = {name: [] for name in [*fns, "torch_nn"]}
    for fn in fns.values():
        timed(fn, singles, 0, warmup=3)
    timed(torch_search, [0], 0, warmup=2)
    for r in range(repeats):
        k = r % len(singles)
        for name, fn in fns.items():
            times[name] += timed(fn, [singles[k]], 1, warmup=0)
        times["torch_nn"] += timed(torch_search, [k], 1, warmup=0)
    return {f"{name}_ms": stats_ms(t)[0] for name, t in times.items()}


def measure_parts(pc: Any, x: np.ndarray, threads: int, repeats: int) -> dict[str, Any]:
    """Every figure of this script for the torch model ``pc`` on images ``x``."""
    from ngcal.export.onnx_graph import ExportPatchCore

    exp = ExportPatchCore(pc).eval()  # the bundle's graph, as a torch module
    mm = matmul_gflops(threads)
    gflops = max(mm.values())
    nn = bench_nn(exp, x[:1], threads, repeats)
    log(f"matmul {mm}; nn {nn}")
    parts = bench_backbone(pc, exp, x, threads, repeats)
    log(f"parts {parts}")
    bound_ms = nn["nn_gflop"] / gflops * 1e3
    return {
        "ort_backbone_ms": parts["ort_backbone_ms"],
        "torch_backbone_ms": parts["torch_backbone_ms"],
        "torch_nn_ms": parts["torch_nn_ms"],
        "ort_over_torch_floor": parts["ort_backbone_ms"] / parts["torch_backbone_ms"],
        "nn_ms": nn["nn_ms"],
        "nn_flop_bound_ms": bound_ms,
        "nn_over_flop_bound": nn["nn_ms"] / bound_ms,
        "nn_gflop": nn["nn_gflop"],
        "nn_gflop_own": nn["nn_gflop_own"],
        "nn_own_flop_bound_ms": nn["nn_gflop_own"] / gflops * 1e3,
        "nn_factored": bool(nn["nn_factored"]),
        "nn_over_own_flop_bound": nn["nn_ms"] / (nn["nn_gflop_own"] / gflops * 1e3),
        "matmul_gflops": mm,
        "patches": nn["patches"],
        "memory_bank": [nn["bank_rows"], nn["dim"]],
    }


def main() -> None:
    args = common_args((__doc__ or "").split("\n")[0]).parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from ngcal.core.bundle import open_bundle
    from ngcal.patchcore.io import load_model

    model_dir, bundle_dir = ensure_model_and_bundle(args)
    bundle = open_bundle(bundle_dir)
    _, x = timed_images(args.data, bundle.manifest.preprocessing, args.images)
    log(f"{len(x)} test images at {x.shape[-1]} px, {args.threads} thread(s)")
    result = measure_parts(load_model(model_dir).module, x, args.threads, args.repeats)
    result.update(
        threads=args.threads,
        image_size=bundle.image_size,
        images_timed=len(x),
        repeats=args.repeats,
        **machine(),
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
