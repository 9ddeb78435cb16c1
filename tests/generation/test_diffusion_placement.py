"""Re-placing a real defect: the mask and the defect's pixels move together; guided sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ngcal.generation.diffusion.backend import Reference
from ngcal.generation.diffusion.fewshot import FewShotBackend, FewShotConfig
from ngcal.generation.diffusion.placement import (
    GuidedRequest,
    Placement,
    background,
    fit_placement,
    place_mask,
    random_placement,
    reference_composite,
)
from ngcal.generation.diffusion.targets import draw_placed_target, load_references

S = 48


def _flat(level: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.clip(level + rng.normal(0, 2, (S, S)), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _ref() -> Reference:
    """A dark L-shaped defect at half the grey level of its background (100 -> 50)."""
    img = _flat(100)
    mask = np.zeros((S, S), dtype=bool)
    mask[10:20, 10:13] = True
    mask[17:20, 10:18] = True
    img[mask] = 50
    return Reference(img, mask, "dark", "dark/0")


def test_placement_moves_flips_rotates_and_scales_the_mask_box() -> None:
    ref = _ref()
    same = place_mask(ref.mask, Placement(False, 0, 10, 8, 10, 10), (S, S))
    assert np.array_equal(same, ref.mask)
    turned = place_mask(ref.mask, Placement(True, 1, 8, 10, 30, 2), (S, S))
    box = np.rot90(ref.mask[10:20, 10:18][:, ::-1])
    assert np.array_equal(turned[30:38, 2:12], box) and turned.sum() == ref.mask.sum()
    double = place_mask(ref.mask, Placement(False, 0, 20, 16, 0, 0), (S, S))
    assert double.sum() == 4 * ref.mask.sum()


def test_background_fills_the_mask_from_its_surroundings() -> None:
    ref = _ref()
    bg = background(ref.image, ref.mask)
    assert np.abs(bg[ref.mask] - 100).max() < 4  # the dark defect is gone
    far = np.ones((S, S), dtype=bool)
    far[9:21, 9:19] = False  # the mask's box grown by one pixel
    assert np.array_equal(bg[far], ref.image[far].astype(np.float64))


def test_composite_carries_the_defects_relative_contrast_and_keeps_the_rest_exact() -> None:
    ref = _ref()
    good = _flat(200, seed=1)
    p = Placement(True, 3, 8, 10, 25, 30)
    target = place_mask(ref.mask, p, (S, S))
    out = reference_composite(good, target, ref, p)
    assert np.array_equal(out[~target], good[~target])
    inside = out[target][:, 0].astype(np.float64)
    assert abs(float(np.median(inside)) - 100.0) < 6  # half of the brighter background
    # a target the real mask does not cover (a synthetic blob on the defect's box) is filled
    # with the defect's median level
    blob = np.zeros((S, S), dtype=bool)
    blob[5:15, 30:40] = True
    out2 = reference_composite(
        good, blob, ref, fit_placement(ref.mask, blob, np.random.default_rng(0))
    )
    assert np.array_equal(out2[~blob], good[~blob])
    assert abs(float(np.median(out2[blob][:, 0])) - 100.0) < 6


def test_a_drawn_real_target_is_its_references_mask_under_its_placement() -> None:
    refs = [_ref()]
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(20):
        t = draw_placed_target(refs, (S, S), rng)
        kinds.add(t.kind)
        assert t.reference is refs[0] and t.placement is not None
        if t.kind == "real":
            assert np.array_equal(t.mask, place_mask(refs[0].mask, t.placement, (S, S)))
    assert kinds == {"real", "stroke", "blob"}
    none = draw_placed_target([], (S, S), rng)
    assert none.reference is None and none.placement is None and none.mask.any()


@pytest.mark.torch
def test_guided_sampling_keeps_the_real_defect_and_records_its_strength(
    demo_ng_category: Path,
) -> None:
    size = 64
    refs = load_references([demo_ng_category / "test" / "spot"], size)
    goods = [r.image for r in load_references([demo_ng_category / "test" / "scratch"], size)]
    rng = np.random.default_rng(1)
    reqs = []
    for g in goods:
        t = draw_placed_target(refs, (size, size), rng, real_share=1.0)
        reqs.append(GuidedRequest(g, t.mask, "spot", t.reference, t.placement))
    cfg = FewShotConfig(
        crop=16, channels=(16, 32), train_steps=4, batch_size=4, sample_steps=10, strength=0.2
    )
    b = FewShotBackend(cfg)
    b.prepare(refs, goods, progress=False)
    rows = b.generate(reqs, candidates=2, progress=False)
    plain = FewShotBackend(FewShotConfig(**{**cfg.__dict__, "strength": 1.0}))
    plain.prepare(refs, goods, progress=False)
    plain_rows = plain.generate(reqs, candidates=2, progress=False)
    guided_gap, plain_gap = [], []
    for req, row, prow in zip(reqs, rows, plain_rows, strict=True):
        assert req.reference is not None and req.placement is not None
        comp = reference_composite(req.good, req.target, req.reference, req.placement)
        m = req.target
        for c, pc in zip(row, prow, strict=True):
            assert c.record["guided"] is True and c.record["strength"] == 0.2
            assert c.record["placement"] == req.placement.as_dict()
            assert pc.record["guided"] is False and pc.record["strength"] == 1.0
            assert np.array_equal(c.image[~m], req.good[~m])
            guided_gap.append(np.abs(c.image[m].astype(float) - comp[m]).mean())
            plain_gap.append(np.abs(pc.image[m].astype(float) - comp[m]).mean())
    # the same barely trained model keeps the real defect when started from it, not from noise
    assert np.mean(guided_gap) < 0.7 * np.mean(plain_gap), (guided_gap, plain_gap)


def test_a_defect_on_the_image_edge_stays_on_the_edge_it_touched() -> None:
    mask = np.zeros((S, S), dtype=bool)
    mask[40:, 10:20] = True  # cut by the bottom border
    rng = np.random.default_rng(3)
    for quarter in (False, True):
        for _ in range(16):
            p = random_placement(mask, (S, S), rng, quarter_turns=quarter)
            moved = place_mask(mask, p, (S, S))
            # the bottom border, moved by the flip and turn (rot90 turns counter-clockwise)
            edge = {0: moved[-1], 1: moved[:, -1], 2: moved[0], 3: moved[:, 0]}[p.rot % 4]
            assert edge.any(), p
            if not quarter:
                assert p.rot in (0, 2)


def test_a_strength_outside_zero_to_one_is_a_config_error() -> None:
    from ngcal.core.errors import ConfigError

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            FewShotConfig(strength=bad)
    assert FewShotConfig(strength=1.0).strength == 1.0
