"""The exported graph: a fitted PatchCore as one ONNX model, image tensor in, map and score out.

``ExportPatchCore`` wraps ``ngcal.patchcore.model.PatchCore`` and computes the same
function (the parity check bounds the difference, ``export.parity``) in a form that
traces at opset 17 and runs fast in onnxruntime:

* the embedding and the image-score rule are the module's own code, with the backbone's
  TF-"same" padding fixed for the graph's input size (``static_same_padding``) so that
  ``onnx_passes`` can fold it into the convolutions;
* the nearest-neighbour search is the module's own (``ngcal.patchcore.nn_search``) with
  trace-friendly options: per feature level where the module factors it, else one MatMul
  per bank chunk; the bank is a constant of the graph;
* the part mask (when the model has one) is the module's ``masked``: one Mul by a
  constant [h*w] vector, so the graph keeps one fixed size;
* the anomaly map (upsampling, reflect pad, Gaussian: linear and separable) is
  ``A_y @ D @ A_x^T`` with two constant matrices measured from the module
  (``map_operators``), or the module's own map when that check fails.

Why these choices and what they were measured against: ``docs/decisions/0003`` (bank in
the graph), ``0004`` (exporter), ``0005`` (rewrites), ``0002`` (per-level search).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn import functional as F

from ngcal.core.errors import ArtifactError
from ngcal.patchcore.model import PatchCore, PatchEmbedder
from ngcal.patchcore.nn_search import (
    LEVELS_CHUNK,
    gemm_blocks,
    nearest_distance_gemm,
    nearest_distance_levels,
    nearest_gemm,
    squared_norms,
)

from .onnx_passes import fold_pads_into_convs, resize_channels_last

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "image_score")
#: Bank rows per MatMul of the exported direct search (``docs/decisions/0005``).
EXPORT_CHUNK = 512
#: Bank rows per step of the exported per-level search: torch's (``docs/decisions/0002``).
LEVELS_EXPORT_CHUNK = LEVELS_CHUNK
Exporter = Literal["legacy", "dynamo"]


def feature_grid(pc: PatchCore) -> tuple[int, int]:
    """Patch grid (h, w) the embedder produces at the model's input size."""
    with torch.inference_mode():
        feats = pc.embed(torch.zeros(1, 3, *pc.image_hw))
    return int(feats.shape[1]), int(feats.shape[2])


class StaticSamePadConv(nn.Module):
    """A TF-"same" convolution (timm ``Conv2dSame``) at one known input size: the zero
    padding it computes from the input's shape on every call, fixed as constant amounts
    (left, right, top, bottom), which ``onnx_passes.fold_pads_into_convs`` folds into the
    exported Conv. Same weights, same output at that size."""

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int]) -> None:
        super().__init__()
        from timm.layers.padding import pad_same_arg

        self.conv = conv
        self.pads = tuple(
            int(v)
            for v in pad_same_arg(
                list(input_hw), list(conv.kernel_size), list(conv.stride), list(conv.dilation)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.conv.weight, self.conv.bias
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), w, b, c.stride, 0, c.dilation, c.groups)


def static_same_padding(
    embedder: PatchEmbedder, image_size: int | tuple[int, int]
) -> PatchEmbedder:
    """The embedder with each timm ``Conv2dSame`` replaced by a ``StaticSamePadConv`` for
    ``image_size`` inputs (a copy; ``embedder`` itself is left as is). Without such layers
    (ResNets) it is returned unchanged."""
    from timm.layers.conv2d_same import Conv2dSame

    names = [n for n, m in embedder.named_modules() if isinstance(m, Conv2dSame)]
    if not names:
        return embedder
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        embedder.get_submodule(n).register_forward_hook(
            lambda _m, inp, _out, n=n: sizes.__setitem__(n, tuple(inp[0].shape[-2:]))
        )
        for n in names
    ]
    try:
        with torch.inference_mode():
            hw = (image_size, image_size) if isinstance(image_size, int) else image_size
            embedder(torch.zeros(1, 3, *hw))
    finally:
        for h in hooks:
            h.remove()
    static = copy.deepcopy(embedder)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = static.get_submodule(parent_name) if parent_name else static
        conv = cast(nn.Conv2d, static.get_submodule(n))
        setattr(parent, child, StaticSamePadConv(conv, sizes[n]))
    return static


def map_operators(pc: PatchCore, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Separable operators (A_y [S, h], A_x [S, w]) with ``anomaly_map(D) = A_y D A_x^T``.

    Measured by pushing row and column indicator maps through ``pc.anomaly_map``; returns
    None when the reconstruction of random maps misses by more than 1e-5 (relative).
    """
    h, w = grid
    with torch.inference_mode():
        rows = torch.eye(h)[:, :, None].expand(h, h, w).reshape(h, h * w)
        cols = torch.eye(w)[:, None, :].expand(w, h, w).reshape(w, h * w)
        a_y = pc.anomaly_map(rows.contiguous(), grid).mean(dim=2).t().contiguous()
        a_x = pc.anomaly_map(cols.contiguous(), grid).mean(dim=1).t().contiguous()
        test = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 4.0
        ref = pc.anomaly_map(test.reshape(3, h * w), grid)
        approx = a_y @ test @ a_x.t()
        err = float((approx - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > 1e-5:
        log.warning("anomaly map is not separable-linear (rel err %.2e); exporting it as is", err)
        return None
    return a_y, a_x


class ExportPatchCore(nn.Module):
    """Export view of a PatchCore: image [N,3,H,W] -> (anomaly_map [N,H,W], image_score [N])."""

    bank_blocks: torch.Tensor
    map_rows: torch.Tensor
    map_cols_t: torch.Tensor

    def __init__(
        self,
        pc: PatchCore,
        *,
        chunk: int = EXPORT_CHUNK,
        levels_chunk: int = LEVELS_EXPORT_CHUNK,
        fast_map: bool = True,
    ) -> None:
        super().__init__()
        self.pc = pc
        # the graph's input size is fixed: TF-"same" padding becomes constant, and foldable
        self.embedder = static_same_padding(pc.embedder, pc.image_hw)
        with torch.inference_mode():
            levels = pc.embedder.levels(torch.zeros(1, 3, *pc.image_hw))
        #: (D_l, h_l, w_l) of each feature level, finest (the patch grid) first
        self.level_shapes = [
            (int(lv.shape[1]), int(lv.shape[2]), int(lv.shape[3])) for lv in levels
        ]
        _, h, w = self.level_shapes[0]
        self.grid = (h, w)
        self.chunk = int(chunk)
        self.levels_chunk = int(levels_chunk)
        self.bank_rows = int(pc.memory_bank.shape[0])
        self.need_index = pc.needs_index
        # the factored search when the model's own forward takes it and every coarse grid
        # divides the patch grid (integer Resize scales, see nearest_levels)
        self.factored = pc.factored(levels) and all(
            h % hl == 0 and w % wl == 0 for _, hl, wl in self.level_shapes[1:]
        )
        blocks = (
            gemm_blocks(pc.bank_gemm, self.levels_chunk) if self.factored else torch.zeros(0, 0, 0)
        )
        self.register_buffer("bank_blocks", blocks, persistent=False)
        ops = map_operators(pc, self.grid) if fast_map else None
        self.fast_map = ops is not None
        a_y, a_x = ops if ops is not None else (torch.zeros(0, 0), torch.zeros(0, 0))
        self.register_buffer("map_rows", a_y)
        self.register_buffer("map_cols_t", a_x.t().contiguous())

    def nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q [P, D] -> (distance [P], nearest bank row [P] or None when not needed): the
        model's own search (``nn_search``) with the export's chunk."""
        if not self.need_index:
            return nearest_distance_gemm(q, self.pc.bank_gemm, chunk=self.chunk), None
        return nearest_gemm(q, self.pc.bank_gemm, chunk=self.chunk)

    def nearest_levels(self, levels: list[torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """levels [N, D_l, h_l, w_l], feats [N, h, w, D] -> distance [N * h * w]: the model's
        per-level search (``nn_search.nearest_distance_levels``) in its traceable form.

        The coarse products are upsampled with bank rows as the last axis, which
        ``onnx_passes.resize_channels_last`` turns from Transpose-Resize-Transpose into one
        Resize over axes 1 and 2 (onnxruntime's channels-first Resize over the bank rows is
        slow); the operand blocks are constants of the graph."""
        return nearest_distance_levels(
            [lv.permute(0, 2, 3, 1) for lv in levels],
            self.bank_blocks,
            squared_norms(feats).reshape(-1),
            rows=self.bank_rows,
            traceable=True,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [N,3,H,W] -> (anomaly_map [N,H,W], image_score [N])."""
        levels = self.embedder.levels(x)
        feats = self.embedder.combine(levels)
        n, h, w, d = feats.shape
        if self.factored:
            dist, idx = self.nearest_levels(levels, feats), None
        else:
            dist, idx = self.nearest(feats.reshape(n * h * w, d))
        dist = self.pc.masked(dist.reshape(n, h * w))  # the part mask: one constant Mul
        if idx is not None:
            idx = idx.reshape(n, h * w)
        score = self.pc.image_scores(feats, dist, idx)
        if self.fast_map:
            amap = torch.matmul(torch.matmul(self.map_rows, dist.reshape(n, h, w)), self.map_cols_t)
        else:
            amap = self.pc.anomaly_map(dist, (h, w))
        return amap, score


def export_onnx(
    pc: PatchCore,
    out: str | Path,
    *,
    exporter: Exporter = "legacy",
    opset: int = 17,
    fast_map: bool = True,
) -> tuple[ExportPatchCore, int]:
    """Write ``pc`` as ONNX to ``out`` (input ``image`` with dynamic batch); returns the
    export module and the opset actually written.
    """
    import onnx

    module = ExportPatchCore(pc, fast_map=fast_map).eval()
    example = torch.zeros(2, 3, *pc.image_hw)
    out = Path(out)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation; we chose it knowingly (above)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # tracer notes on Python ints taken from constant shapes (bank size, top-k)
        warnings.filterwarnings("ignore", category=getattr(torch.jit, "TracerWarning", Warning))
        # the static pads' reversed Slice, which it leaves unfolded: onnx_passes evaluates it
        warnings.filterwarnings(
            "ignore", message="Constant folding - Only steps=1", category=UserWarning
        )
        options: dict[str, Any] = (
            {
                "opset_version": opset,
                "dynamic_axes": {name: {0: "N"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                "do_constant_folding": True,
                "dynamo": False,
            }
            if exporter == "legacy"
            else {
                "opset_version": max(opset, 18),
                "dynamic_shapes": {"x": {0: torch.export.Dim("N", min=1, max=256)}},
                "dynamo": True,
                "verbose": False,
            }
        )
        try:
            torch.onnx.export(
                module,
                (example,),
                str(out),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                **options,
            )
        except Exception as e:
            raise ArtifactError(f"{out}: ONNX export failed ({type(e).__name__}: {e})") from e
    model = onnx.load(str(out))
    if fold_pads_into_convs(model) + resize_channels_last(model):
        onnx.save(model, str(out))
    onnx.checker.check_model(model)
    written = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    if names_in != [INPUT_NAME] or names_out != list(OUTPUT_NAMES):
        raise ArtifactError(f"{out}: exported I/O {names_in} -> {names_out}, expected the contract")
    return module, int(written)
