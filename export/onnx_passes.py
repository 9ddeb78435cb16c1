"""Rewrites of the exported ONNX graph that keep its function and make onnxruntime faster:
``fold_pads_into_convs`` and ``resize_channels_last``.

``fold_pads_into_convs``: TF-"same" padding (EfficientNet-Lite's stride-2 convolutions,
``timm`` ``Conv2dSame``) exports as an explicit zero ``Pad`` before the ``Conv``, often
asymmetric (0 before, 1 after). onnxruntime runs such a Pad as its own pass, and on CPU it
also breaks the blocked-layout (NCHWc) chain around it, so each Pad costs a reorder out of
and back into that layout. ONNX ``Conv`` takes asymmetric ``pads`` itself, so a constant
zero Pad over the spatial axes folds into the Conv that alone reads it: the reorders go and
the outputs stay bitwise equal (figures: ``docs/decisions/0005``). TensorRT's parser maps
asymmetric Conv pads to pre- and post-padding.

The Pad's amounts must be constants: the export view gives the padding layers static
amounts for the graph's fixed input size (``onnx_graph.static_same_padding``), and the
constant chain the TorchScript exporter leaves for them (a reversed Slice it does not fold)
is evaluated here with ``onnx.reference``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` when it depends on initializers and Constant nodes only."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producer = {o: n for n in g.node for o in n.output}
    graph_inputs = {i.name for i in g.input}
    needed: set[int] = set()
    stack, seen = [name], set()
    while stack:
        v = stack.pop()
        if v in seen or v in inits or v == "":
            continue
        seen.add(v)
        node = producer.get(v)
        if node is None or v in graph_inputs:
            return None  # a graph input: not constant
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in g.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    sub = helper.make_graph(
        nodes,
        "constant_chain",
        [],
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
        [inits[i] for i in sorted(used) if i in inits],
    )
    from onnx.reference import ReferenceEvaluator

    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    outputs = ReferenceEvaluator(sub_model).run(None, {})
    value = outputs[0] if isinstance(outputs, list) else next(iter(outputs.values()))
    return np.asarray(value)


def _attribute(node: onnx.NodeProto, name: str) -> object | None:
    for a in node.attribute:
        if a.name == name:
            value: object = helper.get_attribute_value(a)
            return value
    return None


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Fold every constant zero ``Pad`` (spatial axes only) whose one consumer is a ``Conv``
    into that Conv's ``pads``; returns how many were folded. ``model`` is changed in place;
    nodes left without a consumer are removed (``remove_dead_nodes``)."""
    g = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    folded: list[onnx.NodeProto] = []
    for pad in g.node:
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or len(pad.input) < 2:
            continue
        mode = _attribute(pad, "mode")
        if mode not in (None, b"constant"):
            continue
        readers = consumers.get(pad.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        conv = readers[0]
        if conv.input[0] != pad.output[0] or _attribute(conv, "auto_pad") not in (None, b"NOTSET"):
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue  # explicit axes input (opset 18+): not worth the generality
        amounts = _constant_value(model, pad.input[1])
        fill = _constant_value(model, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else None
        if amounts is None or (fill is not None and np.any(np.asarray(fill) != 0)):
            continue
        amounts_list = [int(v) for v in np.asarray(amounts).ravel()]
        rank = len(amounts_list) // 2
        begin, end = amounts_list[:rank], amounts_list[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(amounts_list) < 0:
            continue  # pads batch/channel axes, or crops: not a Conv padding
        spatial = begin[2:] + end[2:]
        old = _attribute(conv, "pads")
        old_list = [int(v) for v in old] if isinstance(old, list) else [0] * len(spatial)
        if len(old_list) != len(spatial):
            continue
        new = [a + b for a, b in zip(old_list, spatial, strict=True)]
        for a in list(conv.attribute):
            if a.name in ("pads", "auto_pad"):
                conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        g.node.remove(pad)
    if folded:
        remove_dead_nodes(model)
        log.info("folded %d Pad node(s) into Conv pads", len(folded))
    return len(folded)


def resize_channels_last(model: onnx.ModelProto) -> int:
    """Rewrite ``Transpose(0,3,1,2) -> Resize(scales [1, 1, a, b]) -> Transpose(0,2,3,1)``
    as one ``Resize(scales [1, a, b, 1])`` on the channels-last tensor; returns how many.

    The export's factored search upsamples product maps whose channels are bank rows: in
    channels-last layout onnxruntime's bilinear Resize is much faster than over the
    channels-first maps the traced graph has (``docs/decisions/0005``), and both Transposes
    (full copies) go. The same numbers: Resize is separable per axis,
    and each axis keeps its scale. Only constant scales, and only when each intermediate
    tensor has the one reader, are rewritten."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    rewritten: list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto, np.ndarray]] = []
    for resize in g.node:
        if resize.op_type != "Resize" or len(resize.input) < 3 or not resize.input[2]:
            continue
        if len(resize.input) > 3 and resize.input[3]:
            continue  # sizes given: not this pattern
        first = producer.get(resize.input[0])
        readers = consumers.get(resize.output[0], [])
        if first is None or first.op_type != "Transpose" or len(readers) != 1:
            continue
        second = readers[0]
        if second.op_type != "Transpose" or len(consumers.get(first.output[0], [])) != 1:
            continue
        if _attribute(first, "perm") != [0, 3, 1, 2] or _attribute(second, "perm") != [0, 2, 3, 1]:
            continue
        if {first.output[0], resize.output[0]} & outputs:
            continue
        scales = _constant_value(model, resize.input[2])
        if scales is None or scales.shape != (4,) or scales[0] != 1 or scales[1] != 1:
            continue
        rewritten.append((first, resize, second, scales))
    for first, resize, second, scales in rewritten:
        a, b = (float(v) for v in scales[2:])
        name = f"{resize.name or resize.output[0]}_scales_nhwc"
        g.initializer.append(
            numpy_helper.from_array(np.array([1.0, a, b, 1.0], dtype=np.float32), name)
        )
        resize.input[0] = first.input[0]
        resize.input[2] = name
        resize.output[0] = second.output[0]
        g.node.remove(first)
        g.node.remove(second)
    if rewritten:
        remove_dead_nodes(model)
        log.info("rewrote %d channels-first Resize(s) as channels-last", len(rewritten))
    return len(rewritten)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` reads, subgraphs (If/Loop bodies) included."""
    read: set[str] = set()
    for n in graph.node:
        read.update(n.input)
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                read |= _names_read(sub) | {o.name for o in sub.output}
    return read


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove nodes none of whose outputs is read (by a node, a subgraph or as a graph
    output), and initializers nothing reads; returns the number of nodes removed."""
    g = model.graph
    removed = 0
    while True:
        read = _names_read(g) | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    read = _names_read(g) | {i.name for i in g.input}
    for init in [i for i in g.initializer if i.name not in read]:
        g.initializer.remove(init)
    return removed
