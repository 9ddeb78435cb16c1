"""The diffusion quality gate: each check passes a plausible sample and fails a bad one."""

from __future__ import annotations

import numpy as np

from ngcal.generation.diffusion.gate import (
    GateConfig,
    check_background,
    check_copy,
    check_drawn,
    check_feature,
    check_label,
    check_seam,
    derived_mask,
    loo_spread,
    nn_median,
    seam_limit,
    verdict,
)

CFG = GateConfig()


def _texture(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.clip(120 + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _target(size: int = 48) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[16:32, 12:36] = True
    return m


def _defect(good: np.ndarray, target: np.ndarray, seed: int = 1) -> np.ndarray:
    """A plausible defect: a darker, equally grainy region, composited inside the target."""
    paint = _texture(seed, good.shape[0]).astype(np.int16) - 30
    out = good.copy()
    out[target] = np.clip(paint, 0, 255).astype(np.uint8)[target]
    return out


def test_background_exact_passes_and_a_changed_outside_pixel_fails() -> None:
    good, tgt = _texture(0), _target()
    ng = _defect(good, tgt)
    assert check_background(good, ng, tgt).passed
    bad = ng.copy()
    bad[0, 0, 1] ^= 1  # one channel of one pixel outside the mask, off by one
    c = check_background(good, bad, tgt)
    assert c.passed is False and c.value == 1.0


def test_drawn_fails_when_nothing_was_drawn() -> None:
    good, tgt = _texture(0), _target()
    assert check_drawn(good, _defect(good, tgt), tgt, CFG).passed
    assert check_drawn(good, good.copy(), tgt, CFG).passed is False


def test_label_iou_fails_when_the_change_covers_a_small_part_of_the_target() -> None:
    good, tgt = _texture(0), _target()
    ng = _defect(good, tgt)
    full = check_label(derived_mask(good, ng, tgt, CFG.change_tau), tgt, CFG)
    assert full.passed and full.value is not None and full.value > 0.8
    corner = np.zeros_like(tgt)
    corner[16:20, 12:16] = True
    partial = _defect(good, corner)
    c = check_label(derived_mask(good, partial, tgt, CFG.change_tau), tgt, CFG)
    assert c.passed is False and c.value is not None and c.value < CFG.min_iou


def test_seam_fails_on_a_flat_bright_paste_and_passes_matching_grain() -> None:
    good, tgt = _texture(0), _target()
    same_grain = good.copy()
    same_grain[tgt] = _texture(5)[tgt]  # other noise, same statistics: no visible boundary
    assert check_seam(same_grain, tgt, CFG.max_seam).passed
    pasted = good.copy()
    pasted[tgt] = 250
    c = check_seam(pasted, tgt, CFG.max_seam)
    assert c.passed is False and c.value is not None and c.value > CFG.max_seam


def test_seam_limit_follows_the_products_own_real_ng_but_never_drops_below_the_floor() -> None:
    good, tgt = _texture(0), _target()
    pasted = good.copy()
    pasted[tgt] = 250
    assert seam_limit([], CFG) == CFG.max_seam
    assert seam_limit([(pasted, tgt)], CFG) > CFG.max_seam  # a sharp real defect raises it


def test_near_copy_fails_on_a_rotated_training_crop_and_is_not_applicable_without_crops() -> None:
    train = _defect(_texture(3, 32), _target(32), seed=4)
    mask = np.rot90(_target(32))
    copied = np.ascontiguousarray(np.rot90(train))
    c = check_copy(copied, mask, [train], CFG)
    assert c.passed is False and c.value == 0.0
    assert check_copy(_defect(_texture(8, 32), mask, seed=9), mask, [train], CFG).passed
    assert check_copy(copied, mask, [], CFG).passed is None


def test_feature_fails_when_the_ng_is_no_nearer_to_real_ng_than_the_good_image() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(5.0, 1.0, (40, 8))
    good_f = rng.normal(0.0, 1.0, (10, 8))
    near_f = rng.normal(5.0, 1.0, (10, 8))
    d_good, d_near = nn_median(good_f, real), nn_median(near_f, real)
    assert check_feature(d_near, d_good).passed
    assert check_feature(d_good, d_good).passed is False  # NG features = good features
    assert check_feature(None, None).passed is None


def test_verdict_lists_only_failed_applicable_checks() -> None:
    good, tgt = _texture(0), _target()
    checks = [
        check_background(good, good, tgt),
        check_drawn(good, good, tgt, CFG),
        check_copy(good, tgt, [], CFG),
    ]
    ok, failed = verdict(checks)
    assert not ok and failed == ["drawn"]


def test_feature_accepts_within_the_real_ngs_own_spread_and_fails_beyond_it() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(5.0, 1.0, (30, 8))
    b = rng.normal(5.0, 1.0, (30, 8)) + 2.0  # a second real NG of the type, a little apart
    spread = loo_spread([a, b])
    assert spread is not None and spread > 0
    assert loo_spread([a]) is None  # one reference: no spread
    # farther than the good image was, but as near as the real NG are to each other: passes
    assert check_feature(spread * 0.9, spread * 0.5, spread).passed
    c = check_feature(spread * 1.5, spread * 0.5, spread)  # beyond both: fails
    assert c.passed is False and c.limit == spread
    assert check_feature(spread * 0.9, spread * 0.5, None).passed is False
