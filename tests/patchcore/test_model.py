"""PatchCore module: image-score rules and anomaly map against direct cdist computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: E402

from ngcal.core.errors import ConfigError
from ngcal.patchcore.model import PatchCore, PatchEmbedder  # noqa: E402

pytestmark = pytest.mark.torch


class TwoScales(torch.nn.Module):
    """A parameter-free stand-in backbone: the input at strides 2 and 4."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]


def make(rule: str, *, topk: int = 3, sigma: float = 4.0) -> PatchCore:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 6, generator=g)
    return PatchCore(
        PatchEmbedder(TwoScales()),
        bank,
        image_size=32,
        image_score=rule,
        topk=topk,
        reweight_neighbors=4,
        smoothing_sigma=sigma,
    ).eval()


def reference_patch_scores(m: PatchCore, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    feats = m.embed(x)
    d = torch.cdist(feats.reshape(x.shape[0], -1, feats.shape[-1]), m.memory_bank[None])
    return d.min(dim=2).values, d.argmin(dim=2)


def test_embed_shape_and_local_average() -> None:
    """embed: [N,3,S,S] -> [N,S/2,S/2,6]; channels are 3x3 averages, coarse map upsampled."""
    m = make("max")
    x = torch.randn(2, 3, 32, 32)
    f = m.embed(x)
    assert f.shape == (2, 16, 16, 6)
    fine = F.avg_pool2d(F.avg_pool2d(x, 2), 3, 1, 1)
    assert torch.allclose(f[..., :3], fine.permute(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("rule", ["max", "topk_mean"])
def test_simple_rules_match_cdist(rule: str) -> None:
    """max and top-k mean of the patch distances equal the cdist-based values."""
    m = make(rule, topk=5)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        _, score = m(x)
        d, _ = reference_patch_scores(m, x)
    ref = d.max(dim=1).values if rule == "max" else d.topk(5, dim=1).values.mean(1)
    assert torch.allclose(score, ref, atol=1e-4)


@pytest.mark.parametrize("rule", ["max", "topk_mean", "reweighted_max"])
def test_patch_scores_index_only_when_the_rule_needs_it(rule: str) -> None:
    """Distances equal cdist for every rule; the bank index comes only with reweighted_max."""
    m = make(rule)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        dist, idx = m.patch_scores(m.embed(x))
        d, i = reference_patch_scores(m, x)
    assert torch.allclose(dist, d, atol=1e-4)
    if rule == "reweighted_max":
        assert idx is not None and torch.equal(idx, i)
    else:
        assert idx is None


def test_reweighted_max_follows_paper_eq7() -> None:
    """reweighted_max = (1 - softmax(||m_test - n||)[m*]) * s* over m*'s b nearest bank rows."""
    m = make("reweighted_max")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        _, score = m(x)
        d, idx = reference_patch_scores(m, x)
        feats = m.embed(x).reshape(2, -1, 6)
    bank = m.memory_bank
    for i in range(2):
        s_star, p = d[i].max(dim=0)
        m_test = feats[i, p]
        m_star = int(idx[i, p])
        nb = torch.cdist(bank[m_star][None], bank)[0].topk(4, largest=False).indices
        assert int(nb[0]) == m_star
        dist = torch.linalg.norm(bank[nb] - m_test, dim=1)
        expected = (1 - torch.softmax(dist, dim=0)[0]) * s_star
        assert float(score[i]) == pytest.approx(float(expected), rel=1e-4)
        assert float(score[i]) < float(s_star)


def test_anomaly_map_size_and_smoothing_keeps_constants() -> None:
    """The map has the input size, is the bilinear upsampling of the patch distances without
    smoothing, and Gaussian smoothing of a constant map returns the constant."""
    m = make("max")
    dist = torch.full((1, 16 * 16), 2.5)
    amap = m.anomaly_map(dist, (16, 16))
    assert amap.shape == (1, 32, 32)
    assert torch.allclose(amap, torch.full_like(amap, 2.5), atol=1e-5)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        amap, _ = make("max", sigma=0.0)(x)
        d, _ = reference_patch_scores(m, x)
    up = F.interpolate(d.reshape(1, 1, 16, 16), size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(amap, up[:, 0], atol=1e-4)


def test_unknown_rule_is_refused() -> None:
    """An unknown image score rule fails at construction, naming it."""
    with pytest.raises(ConfigError, match="median"):
        make("median")


@pytest.mark.parametrize("rule", ["max", "topk_mean"])
def test_forward_searches_per_level_with_the_same_values(rule: str) -> None:
    """``forward`` takes the factored search (two levels, no projection, no index) and
    returns ``head(embed(x))``'s map and scores; with a projection it searches directly."""
    m = make(rule, topk=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert m.factored(m.embedder.levels(x))
        amap, score = m(x)
        ref_map, ref_score = m.head(m.embed(x))
    assert torch.allclose(score, ref_score, atol=1e-4)
    assert torch.allclose(amap, ref_map, atol=1e-4)
    projected = PatchCore(
        PatchEmbedder(TwoScales(), projection=torch.eye(6)[:, :4]),
        torch.randn(60, 4, generator=torch.Generator().manual_seed(0)),
        image_size=32,
        image_score=rule,
        topk=5,
    ).eval()
    with torch.inference_mode():
        assert not projected.factored(projected.embedder.levels(x))
        assert not make("reweighted_max").factored(m.embedder.levels(x))
