"""PatchCore as one export-ready ``nn.Module`` (Roth et al., "Towards Total Recall in
Industrial Anomaly Detection", CVPR 2022).

``embed``: backbone feature maps at two strides, each averaged over its 3x3 neighbourhood
(the paper's locally aware patch features, eq. 2), the coarser map bilinearly upsampled to
the finer grid, concatenated along channels and optionally multiplied by a fixed random
projection. ``head``: exact nearest-neighbour distance of every patch to the memory bank
(chunked matmul, see ``nn_search``), an image score and an anomaly map bilinearly
upsampled to the input size and smoothed by a fixed Gaussian (sigma 4 px). ``forward``
computes the same distances per feature level where that is cheaper (``factored``).

An optional part mask over the patch grid (``foreground``, learnt at fit time from good
images: ``patchcore.foreground``) multiplies the patch distances before the image score
and the map, so background patches (distance 0) never count.

The image score is one of ``rules.IMAGE_SCORE_RULES`` (``rules``: max, top-k mean, the
paper's reweighted max), computed by the same code at fit time and in the exported graph.
Everything in ``forward`` is static given the bank: no data-dependent Python branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nn_search import (
    DEFAULT_CHUNK,
    LEVELS_CHUNK,
    factored_flops,
    gemm_blocks,
    gemm_operand,
    knn_bank,
    nearest_distance_gemm,
    nearest_distance_levels,
    nearest_gemm,
    squared_norms,
)
from .rules import IMAGE_SCORE_RULES, ImageRule
from .rules import image_scores as rule_scores

__all__ = ["IMAGE_SCORE_RULES", "PatchCore", "PatchEmbedder", "gaussian_kernel1d"]


class PatchEmbedder(nn.Module):
    """Backbone + local aggregation + concatenation (+ projection): [N,3,H,W] -> [N,h,w,D]."""

    projection: torch.Tensor

    def __init__(
        self,
        backbone: nn.Module,
        *,
        neighbourhood: int = 3,
        projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.neighbourhood = int(neighbourhood)
        self.has_projection = projection is not None
        self.register_buffer(
            "projection", projection.float() if projection is not None else torch.zeros(0, 0)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features of a batch: float32 [N, h, w, D], (h, w) = finest grid."""
        return self.combine(self.levels(x))

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's maps, each averaged over its k x k neighbourhood: [N, D_l, h_l, w_l],
        finest first (channels-last memory on CPU)."""
        if not torch.onnx.is_in_onnx_export():
            x = x.contiguous(memory_format=torch.channels_last)  # faster on CPU (blocked layout)
        maps = self.backbone(x)
        k = self.neighbourhood
        return [
            F.avg_pool2d(m, kernel_size=k, stride=1, padding=k // 2, count_include_pad=True)
            if k > 1
            else m
            for m in maps
        ]

    def combine(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """``levels`` -> patch features [N, h, w, D]: coarser maps bilinearly upsampled to the
        finest grid, concatenated along channels (then projected, when configured)."""
        size = pooled[0].shape[-2:]
        ups = [pooled[0]] + [
            F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pooled[1:]
        ]
        feats = torch.cat(ups, dim=1).permute(0, 2, 3, 1)
        if self.has_projection:
            feats = feats @ self.projection
        return feats


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, size 2 * round(4 sigma) + 1 (as scipy/anomalib truncate at 4)."""
    radius = max(int(4.0 * sigma + 0.5), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


class PatchCore(nn.Module):
    """PatchCore detector: ``forward(x [N,3,H,W]) -> (anomaly_map [N,H,W], image_score [N])``."""

    memory_bank: torch.Tensor
    bank_sq: torch.Tensor
    bank_gemm: torch.Tensor
    bank_blocks: torch.Tensor
    bank_neighbors: torch.Tensor
    gauss: torch.Tensor
    foreground: torch.Tensor

    def __init__(
        self,
        embedder: PatchEmbedder,
        memory_bank: torch.Tensor,
        *,
        image_size: int,
        image_hw: tuple[int, int] | None = None,
        image_score: str = "topk_mean",
        topk: int = 10,
        reweight_neighbors: int = 9,
        smoothing_sigma: float = 4.0,
        chunk: int = DEFAULT_CHUNK,
        foreground: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.image_size = int(image_size)
        #: input (height, width): ``image_size`` square unless given
        self.image_hw = (
            (int(image_hw[0]), int(image_hw[1])) if image_hw else (self.image_size, self.image_size)
        )
        self.rule = ImageRule(image_score, int(topk))
        self.reweight_neighbors = int(reweight_neighbors)
        self.smoothing_sigma = float(smoothing_sigma)
        self.chunk = int(chunk)
        bank = memory_bank.float().contiguous()
        self.register_buffer("memory_bank", bank)
        self.register_buffer("bank_sq", squared_norms(bank))
        self.register_buffer("bank_neighbors", knn_bank(bank, self.reweight_neighbors))
        # derived from the bank at load time; never saved (the bank file is the artifact)
        self.register_buffer("bank_gemm", gemm_operand(bank, self.bank_sq), persistent=False)
        # the per-level search's operand (``forward``), only where the levels stay separable
        blocks = (
            gemm_blocks(self.bank_gemm, LEVELS_CHUNK)
            if not embedder.has_projection
            else torch.zeros(0, 0, 0)
        )
        self.register_buffer("bank_blocks", blocks, persistent=False)
        self.register_buffer(
            "gauss", gaussian_kernel1d(smoothing_sigma) if smoothing_sigma > 0 else torch.ones(1)
        )
        #: part mask over the patch grid, flattened [h*w] (empty: every patch counts)
        self.has_foreground = foreground is not None
        self.register_buffer(
            "foreground",
            foreground.float().reshape(-1).contiguous()
            if foreground is not None
            else torch.ones(0),
        )

    def with_bank(self, bank: torch.Tensor) -> PatchCore:
        """The same detector (embedder shared, every setting kept) over another memory bank
        [M', D], on this module's device, in eval mode."""
        return (
            PatchCore(
                self.embedder,
                bank,
                image_size=self.image_size,
                image_hw=self.image_hw,
                image_score=self.image_score,
                topk=self.topk,
                reweight_neighbors=self.reweight_neighbors,
                smoothing_sigma=self.smoothing_sigma,
                chunk=self.chunk,
                foreground=self.foreground if self.has_foreground else None,
            )
            .to(self.memory_bank.device)
            .eval()
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Locally aware, projected patch features: [N,3,H,W] -> [N,h,w,D]."""
        feats: torch.Tensor = self.embedder(x)
        return feats

    @property
    def image_score(self) -> str:
        """Name of the image score rule (``rule.name``)."""
        return self.rule.name

    @property
    def topk(self) -> int:
        """k of the image score rule (``rule.k``)."""
        return self.rule.k

    @property
    def needs_index(self) -> bool:
        """True when the image score rule needs each patch's nearest bank row."""
        return self.rule.needs_index

    def patch_scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Nearest-bank distance [N, h*w] of every patch, and its bank index [N, h*w] when
        the image score rule needs it (else None: the index-free search is cheaper)."""
        n, h, w, d = feats.shape
        q = feats.reshape(-1, d)
        if not self.needs_index:
            dist = nearest_distance_gemm(q, self.bank_gemm, chunk=self.chunk)
            return dist.reshape(n, h * w), None
        dist, idx = nearest_gemm(q, self.bank_gemm, chunk=self.chunk)
        return dist.reshape(n, h * w), idx.reshape(n, h * w)

    def masked(self, dist: torch.Tensor) -> torch.Tensor:
        """Patch distances [N, h*w] with background patches set to 0 (unchanged without a
        part mask): what the image score and the map are computed from."""
        return dist * self.foreground if self.has_foreground else dist

    def image_scores(
        self, feats: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor | None
    ) -> torch.Tensor:
        """Image score [N] from patch distances [N, P] by ``self.rule`` (``rules``; ``idx``,
        the nearest bank rows [N, P], is only read by ``reweighted_max``)."""
        return rule_scores(self.rule, feats, dist, idx, self.bank_neighbour_rows)

    def bank_neighbour_rows(self, m_star: torch.Tensor) -> torch.Tensor:
        """Bank rows [N, b, D] of the b nearest bank rows of each row ``m_star`` [N] (itself
        first): the neighbourhoods of the reweighted max."""
        nb = self.bank_neighbors.index_select(0, m_star)
        d = self.memory_bank.shape[1]
        return self.memory_bank.index_select(0, nb.reshape(-1)).reshape(-1, nb.shape[1], d)

    def anomaly_map(self, dist: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch distances [N, h*w] -> smoothed map [N, H, W] at the input resolution."""
        n = dist.shape[0]
        m = dist.reshape(n, 1, grid[0], grid[1])
        m = F.interpolate(m, size=self.image_hw, mode="bilinear", align_corners=False)
        if self.smoothing_sigma > 0:
            k = self.gauss.numel()
            r = k // 2
            m = F.pad(m, (r, r, r, r), mode="reflect")
            m = F.conv2d(m, self.gauss.reshape(1, 1, 1, k))
            m = F.conv2d(m, self.gauss.reshape(1, 1, k, 1))
        return m[:, 0]

    def head(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomaly_map [N, H, W], image_score [N]) from patch features [N, h, w, D] (the
        part mask applied to the patch distances first)."""
        dist, idx = self.patch_scores(feats)
        dist = self.masked(dist)
        score = self.image_scores(feats, dist, idx)
        amap = self.anomaly_map(dist, (feats.shape[1], feats.shape[2]))
        return amap, score

    def factored(self, levels: list[torch.Tensor]) -> bool:
        """True when ``forward`` searches per feature level (``nearest_distance_levels``):
        no projection, no index needed, and at most 3/4 of the direct search's FLOPs. Never
        while tracing (the eager form's reused buffers and ``out=`` kernel do not trace; the
        export view calls its ``traceable`` form)."""
        if torch.onnx.is_in_onnx_export() or torch._C._get_tracing_state() is not None:
            return False
        if self.embedder.has_projection or self.needs_index or len(levels) < 2:
            return False
        grids = [(int(lv.shape[2]), int(lv.shape[3])) for lv in levels]
        direct, factored = factored_flops(grids, [int(lv.shape[1]) for lv in levels])
        return 4 * factored <= 3 * direct

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float32 [N,3,H,W] -> (anomaly_map [N,H,W], image_score [N]); the same values as
        ``head(embed(x))``, with the search factored per feature level where that is cheaper
        (``factored``: fewer multiply-adds, same distances to fp32 rounding;
        docs/decisions/0002)."""
        levels = self.embedder.levels(x)
        feats = self.embedder.combine(levels)
        if not self.factored(levels):
            return self.head(feats)
        dist = self.masked(self.level_patch_scores(levels, feats))
        grid = (feats.shape[1], feats.shape[2])
        return self.anomaly_map(dist, grid), self.image_scores(feats, dist, None)

    def level_patch_scores(self, levels: list[torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """``patch_scores``' distances [N, h*w], searched per feature level
        (``nearest_distance_levels``; only where ``factored(levels)``). levels from
        ``embedder.levels``, feats [N, h, w, D] their ``combine``."""
        n, h, w, d = feats.shape
        return nearest_distance_levels(
            [lv.permute(0, 2, 3, 1) for lv in levels],
            self.bank_blocks,
            squared_norms(feats.reshape(-1, d)),
        ).reshape(n, h * w)
