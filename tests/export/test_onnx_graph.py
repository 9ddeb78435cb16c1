"""The exported graph: every score rule and chunking agree with torch; the map operators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.torch


def _variant(tiny_model: Path, rule: str) -> object:
    from ngcal.patchcore.io import load_model
    from ngcal.patchcore.model import PatchCore

    pc = load_model(tiny_model).module
    return PatchCore(
        pc.embedder, pc.memory_bank, image_size=pc.image_size, image_score=rule, topk=3
    ).eval()


@pytest.mark.parametrize("rule", ["topk_mean", "reweighted_max", "max"])
def test_exported_graph_matches_torch_for_each_rule(
    tiny_model: Path, tmp_path: Path, rule: str
) -> None:
    """With the bank split in many chunks, ORT's scores and maps equal the torch model's."""
    import onnxruntime as ort

    from ngcal.export.onnx_graph import ExportPatchCore, export_onnx
    from ngcal.export.parity import parity_inputs, torch_scores

    pc = _variant(tiny_model, rule)
    m = pc.memory_bank.shape[0]  # type: ignore[attr-defined]
    assert m > 8
    mod = ExportPatchCore(pc, chunk=4, levels_chunk=5).eval()  # type: ignore[arg-type]
    x = parity_inputs(_pre(pc))  # type: ignore[arg-type]
    ref = torch_scores(pc, x)
    mine = torch_scores(mod, x)
    np.testing.assert_allclose(mine[0], ref[0], rtol=1e-5, atol=1e-5)
    out = tmp_path / "m.onnx"
    export_onnx(pc, out)  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    amap, score = sess.run(["anomaly_map", "image_score"], {"image": x})
    scale = float(np.abs(ref[0]).max())
    assert np.abs(score - ref[0]).max() <= 1e-4 * scale
    assert np.abs(amap - ref[1]).max() <= 1e-4 * float(np.abs(ref[1]).max())
    assert amap.shape == (len(x), 64, 64) and score.shape == (len(x),)
    # Lite0's TF-"same" padding is folded into its convolutions (export.onnx_passes)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Pad" not in ops and "Conv" in ops
    # index-free rules search per feature level, with channels-last Resizes of the products
    assert mod.factored is (rule != "reweighted_max")
    one = sess.run(["image_score"], {"image": x[:1]})[0]  # dynamic batch
    assert one.shape == (1,)


def _pre(pc: object) -> object:
    from ngcal.core.manifest import Preprocessing

    return Preprocessing(image_size=pc.image_size)  # type: ignore[attr-defined]


def test_map_operators_reproduce_the_module_map(tiny_model: Path) -> None:
    """A_y D A_x^T equals upsample + reflect pad + Gaussian on random patch maps."""
    from ngcal.export.onnx_graph import feature_grid, map_operators

    pc = _variant(tiny_model, "max")
    grid = feature_grid(pc)  # type: ignore[arg-type]
    ops = map_operators(pc, grid)  # type: ignore[arg-type]
    assert ops is not None
    a_y, a_x = ops
    assert a_y.shape == (64, grid[0]) and a_x.shape == (64, grid[1])
    d = torch.rand(2, *grid, generator=torch.Generator().manual_seed(5))
    ref = pc.anomaly_map(d.reshape(2, -1), grid)  # type: ignore[attr-defined]
    torch.testing.assert_close(a_y @ d @ a_x.t(), ref, rtol=1e-5, atol=1e-5)


def test_non_linear_map_falls_back_to_the_module(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the map stops being linear, export keeps the module's own map (and stays exact)."""
    from ngcal.export.onnx_graph import ExportPatchCore
    from ngcal.export.parity import parity_inputs, torch_scores

    pc = _variant(tiny_model, "max")
    orig = pc.anomaly_map  # type: ignore[attr-defined]
    monkeypatch.setattr(pc, "anomaly_map", lambda dist, grid: orig(dist, grid) ** 2)
    mod = ExportPatchCore(pc).eval()  # type: ignore[arg-type]
    assert mod.fast_map is False
    x = parity_inputs(_pre(pc))  # type: ignore[arg-type]
    np.testing.assert_allclose(torch_scores(mod, x)[1], torch_scores(pc, x)[1], rtol=1e-6)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_scores(tiny_model: Path, tmp_path: Path) -> None:
    """The dynamo exporter (opset 18) is a working alternative with the same scores."""
    import onnxruntime as ort

    from ngcal.export.onnx_graph import export_onnx
    from ngcal.export.parity import parity_inputs, torch_scores

    pc = _variant(tiny_model, "topk_mean")
    _, opset = export_onnx(pc, tmp_path / "d.onnx", exporter="dynamo")  # type: ignore[arg-type]
    assert opset >= 18
    x = parity_inputs(_pre(pc))  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["image_score"], {"image": x})[0]
    ref = torch_scores(pc, x)[0]
    assert np.abs(got - ref).max() <= 1e-4 * float(np.abs(ref).max())
