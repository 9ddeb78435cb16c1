"""Timing helpers shared by the latency benchmarks (``latency*.py``): what they time and how.

Each latency script answers one question and prints ONE JSON object on stdout (progress
on stderr). They share: the model and bundle they time (fitted and exported on demand),
the test images, interleaved wall-clock timing (runtimes alternate image by image, so a
load change on the shared CPU hits all of them alike and their ratios stay meaningful),
onnxruntime sessions opened like the edge's, the matmul rate that FLOP bounds divide by,
and a description of the machine the figures came from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
#: The anchor: anomalib 2.7 PatchCore, same backbone, ONNX in onnxruntime CPU, batch 1,
#: 2 threads, measured once elsewhere (README, "anchor" column).
ANOMALIB_ORT_MS = 32.0
ANOMALIB_TORCH_MS = 54.0
ANOMALIB_AUROC = 0.862
ANCHOR = {
    "anomalib_ort_ms": ANOMALIB_ORT_MS,
    "anomalib_torch_ms": ANOMALIB_TORCH_MS,
    "anomalib_auroc": ANOMALIB_AUROC,
    "anomalib_threads": 2,
}
#: One timed call: a runtime's scoring of one input.
Runtime = Callable[[np.ndarray], object]


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the JSON), tagged with the script's name."""
    print(f"[{Path(sys.argv[0]).stem}] {msg}", file=sys.stderr, flush=True)


def common_args(description: str, *, needs_data: bool = True) -> argparse.ArgumentParser:
    """The options every latency script takes: what to time, threads, how many samples."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", required=needs_data, type=Path, help="MVTec-layout category dir")
    ap.add_argument("--model", help="model dir (default: fit one under --work)")
    ap.add_argument("--bundle", help="bundle dir (default: export --model under --work)")
    ap.add_argument("--work", help="where to fit/export when not given (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="threads of torch and onnxruntime")
    ap.add_argument("--images", type=int, default=16, help="distinct test images timed")
    ap.add_argument("--repeats", type=int, default=64, help="batch-1 timings per runtime")
    return ap


def stats_ms(samples: Sequence[float], per: int = 1) -> tuple[float, float]:
    """(p50, p99) in milliseconds of per-item times from batch times in seconds."""
    arr = np.asarray(samples) * 1e3 / per
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def timed(
    fn: Callable[[T], object], inputs: Sequence[T], repeats: int, warmup: int = 3
) -> list[float]:
    """Wall time in seconds of ``fn(x)`` for each input, cycling through ``inputs``
    ``repeats`` times after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    out = []
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def bench_runtimes(
    fns: dict[str, Runtime], x: np.ndarray | dict[str, np.ndarray], repeats: int
) -> dict[str, dict[str, float]]:
    """Batch-1 and batch-8 per-image p50/p99 (``p50_ms``, ``b8_p50_ms``...) of each
    runtime in ``fns``, interleaved image by image. ``x``: one input array [n, 3, S, S] for
    all, or one per runtime name (profiles at different input sizes)."""
    xs = x if isinstance(x, dict) else {name: x for name in fns}
    singles = {n: [a[i : i + 1] for i in range(len(a))] for n, a in xs.items()}
    eights = {
        n: [np.roll(a, -8 * k, axis=0)[:8] for k in range(max(1, len(a) // 8))]
        for n, a in xs.items()
    }
    out: dict[str, dict[str, float]] = {}
    for inputs, n, per, tag in (
        (singles, repeats, 1, ""),
        (eights, max(5, repeats // 4), 8, "b8_"),
    ):
        times: dict[str, list[float]] = {name: [] for name in fns}
        for name, fn in fns.items():
            timed(fn, inputs[name], 0, warmup=3)
        for r in range(n):
            for name, fn in fns.items():
                own = inputs[name]
                times[name] += timed(fn, [own[r % len(own)]], 1, warmup=0)
        for name in fns:
            p50, p99 = stats_ms(times[name], per=per)
            out.setdefault(name, {}).update({f"{tag}p50_ms": p50, f"{tag}p99_ms": p99})
    return out


def ort_options(threads: int) -> Any:
    """onnxruntime session options of a timed session: ``threads`` intra-op threads, one
    inter-op thread, every graph optimisation (as ``ngcal.core.ort_backend``)."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return o


def matmul_gflops(threads: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n x n fp32 matmul in torch and in onnxruntime (best of 5 each): the
    rate the FLOP bounds divide by."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    flops = 2.0 * n**3
    ta = torch.from_numpy(a)
    torch_best = min(timed(lambda m: torch.mm(m, m), [ta], 5, warmup=1))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "a"], ["c"])],
        "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(
        model.SerializeToString(), ort_options(threads), providers=["CPUExecutionProvider"]
    )
    ort_best = min(timed(lambda m: sess.run(None, {"a": m}), [a], 5, warmup=1))
    return {"torch_gflops": flops / torch_best / 1e9, "ort_gflops": flops / ort_best / 1e9}


def ort_session_of(
    module: Any,
    args: tuple[Any, ...],
    names: list[str],
    threads: int,
    graph_pass: Callable[[Any], int] | None = None,
) -> Any:
    """An onnxruntime CPU session of ``module`` traced on ``args`` (opset 17, the legacy
    exporter, as ``ngcal export``), after ``graph_pass(model)`` rewrote the graph the way the
    export does (it returns how many nodes it changed)."""
    import onnx
    import onnxruntime as ort
    import torch

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        path = Path(d) / "part.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module, args, str(path), input_names=names, opset_version=17, dynamo=False
            )
        model = onnx.load(str(path))
        if graph_pass is not None and graph_pass(model):
            onnx.save(model, str(path))
        return ort.InferenceSession(
            str(path), ort_options(threads), providers=["CPUExecutionProvider"]
        )


def ensure_model_and_bundle(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--model`` and ``--bundle``, fitted (``ngcal fit``, 256 px, default coreset) and/or
    exported (``ngcal export``) under ``--work`` where not given."""
    from ngcal.cli.main import main as ngcal

    work = Path(args.work or tempfile.mkdtemp(prefix="ngcal-latency-"))
    model = Path(args.model) if args.model else work / "model"
    if not args.model:
        log(f"fitting a model into {model} (256 px, default coreset; minutes)")
        fit = ["fit", "--data", str(args.data), "--out", str(model), "--quiet"]
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only our JSON
            if ngcal([*fit, "--threads", str(args.threads)]) != 0:
                raise SystemExit("fit failed")
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    if not args.bundle:
        log(f"exporting {model} -> {bundle}")
        with contextlib.redirect_stdout(sys.stderr):
            if ngcal(["export", "--model", str(model), "--out", str(bundle)]) != 0:
                raise SystemExit("export failed")
    return model, bundle


def timed_images(data: Path, spec: Any, n: int) -> tuple[list[Path], np.ndarray]:
    """``n`` test images spread over every defect type and good, preprocessed by ``spec``
    (a bundle's ``Preprocessing``) to [n, 3, S, S]."""
    from ngcal.core.dataset import load_category
    from ngcal.core.images import load_and_preprocess

    test = load_category(data).test
    idx = np.linspace(0, len(test) - 1, num=min(n, len(test))).astype(int)
    paths = [test[i].path for i in idx]
    return paths, np.stack([load_and_preprocess(p, spec) for p in paths])


def bundle_auroc(bundle: Path, data: Path, threads: int) -> float:
    """Image AUROC of the bundle on the whole test split, scored by onnxruntime."""
    from ngcal.core.bundle import open_bundle
    from ngcal.core.dataset import load_category
    from ngcal.core.images import load_and_preprocess
    from ngcal.core.metrics import auroc
    from ngcal.core.runtime import open_scorer

    b = open_bundle(bundle)
    s = open_scorer(b, threads=threads)
    test = load_category(data).test
    scores: list[float] = []
    labels: list[int] = []
    for i in range(0, len(test), 8):
        chunk = test[i : i + 8]
        batch = np.stack([load_and_preprocess(t.path, b.manifest.preprocessing) for t in chunk])
        scores.extend(s.score(batch).image_scores.tolist())
        labels.extend(int(t.label or 0) for t in chunk)
    return float(auroc(np.asarray(labels), np.asarray(scores)))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> dict[str, object]:
    """The CPU, its core count and the load average at the end of the run (other
    processes share these cores, so say how loaded it was)."""
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())}
