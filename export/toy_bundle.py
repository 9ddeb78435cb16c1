"""A tiny torch-free bundle with a hand-built ONNX graph, for tests and demos of the edge path.

The graph honours the bundle contract (input ``image`` float32 [N,3,S,S], dynamic N;
outputs ``anomaly_map`` [N,S,S] and ``image_score`` [N]) with a rule simple enough to
check by hand::

    anomaly_map[n, y, x] = mean_c image[n, c, y, x] ** 2
    image_score[n]       = max_{y,x} anomaly_map[n, y, x]

It is written exactly like a real export (files first, manifest last with every sha256),
so bundle loading, tamper detection, install and the scorers can be tested without torch
or a fitted model. Needs the ``onnx`` package (offline extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ngcal.core.files import atomic_write_bytes, sha256_bytes
from ngcal.core.manifest import (
    BackboneSpec,
    BundleManifest,
    PatchCoreSpec,
    Preprocessing,
    write_manifest,
)
from ngcal.core.scoresets import ScoreSet, save_scoreset
from ngcal.core.thresholds import ThresholdFile, save_thresholds


def toy_onnx_bytes(*, opset: int = 17) -> bytes:
    """Serialized ONNX model of the toy rule (see module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "S", "S"])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", "S", "S"])
    score = helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["N"])
    nodes = [
        helper.make_node("Mul", ["image", "image"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["anomaly_map"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["anomaly_map"], ["image_score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "ngcal_toy", [x], [amap, score])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ngcal-toy"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def toy_score(batch: np.ndarray) -> np.ndarray:
    """The toy graph's image scores computed in numpy, float32 [N]."""
    return np.asarray((batch.astype(np.float32) ** 2).mean(axis=1).max(axis=(1, 2)), np.float32)


def write_toy_bundle(
    out: str | os.PathLike[str],
    *,
    image_size: int = 32,
    model_sha256: str | None = None,
    thresholds: float | None = None,
    normal_scores: int = 20,
) -> Path:
    """Write a complete toy bundle into ``out`` (created; must not hold a manifest yet).

    ``model_sha256`` defaults to a hash derived from ``image_size``; ``thresholds``, when
    given, writes an unhashed ``thresholds.json`` with that value bound to the model.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    onnx_bytes = toy_onnx_bytes()
    atomic_write_bytes(root / "model.onnx", onnx_bytes)
    msha = model_sha256 or sha256_bytes(f"ngcal-toy-{image_size}".encode())
    rng = np.random.default_rng(image_size)
    save_scoreset(
        root / "scores" / "normal_loo.json",
        ScoreSet(
            source="normal_loo",
            scores=rng.gamma(4.0, 0.05, size=normal_scores),
            item_ids=tuple(f"train/good/{i:03d}.png" for i in range(normal_scores)),
            model_sha256=msha,
        ),
    )
    h = max(1, image_size // 8)
    manifest = BundleManifest(
        model_sha256=msha,
        backbone=BackboneSpec(name="toy", layers=(), weights="none", weights_sha256="0" * 64),
        preprocessing=Preprocessing(image_size=image_size),
        patchcore=PatchCoreSpec(
            feature_dim=1,
            raw_feature_dim=1,
            feature_map_size=(h, h),
            coreset_ratio=1.0,
            coreset_size=1,
            num_train_images=normal_scores,
            image_score="max",
        ),
        extra={"toy": "anomaly_map = mean_c(image**2); image_score = max(anomaly_map)"},
    )
    write_manifest(root, manifest)
    if thresholds is not None:
        save_thresholds(
            root / "thresholds.json",
            ThresholdFile(value=thresholds, mode="fixed", method="fixed", model_sha256=msha),
        )
    return root
