"""ONNX rewrites: a constant zero Pad folds into its Conv with the same outputs; others stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _pad_conv_model(
    pads: list[int], *, mode: str = "constant", fill: float = 0.0, extra_reader: bool = False
) -> onnx.ModelProto:
    """x [1,2,9,9] -> Pad(pads, mode, fill) -> Conv 3x3 stride 2 (+ Relu of the padded
    tensor as a second reader when ``extra_reader``)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    nodes = [
        helper.make_node(
            "Constant",
            [],
            ["pads"],
            value=helper.make_tensor("pads_t", TensorProto.INT64, [8], pads),
        ),
        helper.make_node(
            "Constant",
            [],
            ["fill"],
            value=helper.make_tensor("fill_t", TensorProto.FLOAT, [], [fill]),
        ),
        helper.make_node("Pad", ["x", "pads", "fill"], ["xp"], mode=mode),
        helper.make_node("Conv", ["xp", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 1, 0]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None, None])]
    if extra_reader:
        nodes.append(helper.make_node("Relu", ["xp"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 2, None, None]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 9, 9])],
        outputs,
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(None, {"x": x})]


def test_asymmetric_zero_pad_folds_into_the_conv_with_identical_output() -> None:
    from ngcal.export.onnx_passes import fold_pads_into_convs

    model = _pad_conv_model([0, 0, 0, 1, 0, 0, 2, 1])  # top 0/left 1, bottom 2/right 1
    x = np.random.default_rng(1).normal(size=(1, 2, 9, 9)).astype(np.float32)
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Conv"]  # Pad gone, its dead Constant inputs too
    conv_pads = next(a for a in model.graph.node[0].attribute if a.name == "pads").ints
    assert list(conv_pads) == [1, 1, 3, 1]  # the Conv's own [1,0,1,0] plus the Pad's
    after = _run(model, x)
    np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"mode": "reflect"}, "reflect padding is not a Conv's zero padding"),
        ({"fill": 1.5}, "a non-zero fill value"),
        ({"extra_reader": True}, "the padded tensor has another reader"),
    ],
)
def test_pads_a_conv_cannot_take_are_left(kwargs: dict[str, object], why: str) -> None:
    from ngcal.export.onnx_passes import fold_pads_into_convs

    model = _pad_conv_model([0, 0, 0, 1, 0, 0, 2, 1], **kwargs)  # type: ignore[arg-type]
    assert fold_pads_into_convs(model) == 0, why
    assert [n.op_type for n in model.graph.node].count("Pad") == 1


def test_channel_padding_is_not_folded() -> None:
    from ngcal.export.onnx_passes import fold_pads_into_convs

    model = _pad_conv_model([0, 1, 0, 0, 0, 0, 0, 0])  # pads the channel axis
    assert fold_pads_into_convs(model) == 0


def test_dead_node_removal_keeps_what_outputs_need() -> None:
    from ngcal.export.onnx_passes import remove_dead_nodes

    model = _pad_conv_model([0, 0, 0, 0, 0, 0, 0, 0])
    model.graph.node.append(helper.make_node("Relu", ["y"], ["unused"]))
    assert remove_dead_nodes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Constant", "Constant", "Pad", "Conv"]
    assert {i.name for i in model.graph.initializer} == {"w", "b"}


def _transpose_resize_model(perm_in: list[int], scales: list[float]) -> onnx.ModelProto:
    """x [1,4,4,6] -> Transpose(perm_in) -> Resize(scales, linear, half_pixel) -> Transpose back."""
    back = [perm_in.index(i) for i in range(4)]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=perm_in),
        helper.make_node(
            "Resize",
            ["t", "", "scales"],
            ["r"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Transpose", ["r"], ["y"], perm=back),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None, 6])],
        [numpy_helper.from_array(np.array(scales, dtype=np.float32), "scales")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_first_resize_becomes_one_channels_last_resize() -> None:
    from ngcal.export.onnx_passes import resize_channels_last

    model = _transpose_resize_model([0, 3, 1, 2], [1.0, 1.0, 2.0, 2.0])
    x = np.random.default_rng(2).normal(size=(1, 4, 4, 6)).astype(np.float32)
    before = _run(model, x)
    assert resize_channels_last(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Resize"]
    after = _run(model, x)
    assert after[0].shape == (1, 8, 8, 6)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("perm", "scales"),
    [
        ([0, 2, 3, 1], [1.0, 1.0, 2.0, 2.0]),  # another layout change
        ([0, 3, 1, 2], [1.0, 2.0, 2.0, 2.0]),  # scales the channel axis too
    ],
)
def test_other_transpose_resize_patterns_are_left(perm: list[int], scales: list[float]) -> None:
    from ngcal.export.onnx_passes import resize_channels_last

    model = _transpose_resize_model(perm, scales)
    assert resize_channels_last(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Transpose", "Resize", "Transpose"]
