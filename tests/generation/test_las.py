"""LAS: blended images, binary masks aligned with the changed pixels, textures, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ngcal.core.errors import ConfigError
from ngcal.generation.las import blend, contact_sheet, synthesize
from ngcal.generation.textures import TextureBank, glass_augment, procedural


def _good_images(n: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    base = rng.integers(90, 140, size=(size, size, 1)).astype(np.uint8)
    return [np.repeat(np.clip(base + i, 0, 255).astype(np.uint8), 3, axis=2) for i in range(n)]


def test_blend_changes_only_inside_mask() -> None:
    """Pixels outside the mask are bit-identical; inside, the texture shows (beta < 1)."""
    img = np.full((16, 16, 3), 100, np.uint8)
    tex = np.full((16, 16, 3), 200, np.uint8)
    m = np.zeros((16, 16), bool)
    m[4:8, 4:12] = True
    out = blend(img, tex, m, 0.25)
    assert np.array_equal(out[~m], img[~m])
    assert (out[m] == 175).all()
    with pytest.raises(ConfigError):
        blend(img, tex, m, 1.5)


def test_las_mask_binary_and_aligned_with_changed_pixels() -> None:
    """The LAS mask is boolean, nothing changes outside it, nearly all of it changed."""
    imgs = _good_images(4)
    bank = TextureBank(size=64, own_images=imgs)
    rng = np.random.default_rng(0)
    for _ in range(8):
        s = synthesize(imgs[0], bank, (8, 8), rng)
        assert s.mask.dtype == bool and s.mask.shape == (64, 64) and s.mask.any()
        changed = (s.image != imgs[0]).any(axis=2)
        assert not (changed & ~s.mask).any(), "pixels changed outside the mask"
        assert changed[s.mask].mean() > 0.7, "mask covers mostly unchanged pixels"
        assert 0.2 <= s.beta <= 0.8
        ys, xs = np.nonzero(s.mask)
        assert s.cells[ys // 8, xs // 8].all()


def test_las_is_deterministic_for_a_seed() -> None:
    """Same seed -> identical image and mask; another seed -> a different sample."""
    imgs = _good_images(3)
    bank = TextureBank(size=64, own_images=imgs)
    a = synthesize(imgs[1], bank, (8, 8), np.random.default_rng(7))
    b = synthesize(imgs[1], bank, (8, 8), np.random.default_rng(7))
    c = synthesize(imgs[1], bank, (8, 8), np.random.default_rng(8))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not (np.array_equal(a.image, c.image) and np.array_equal(a.mask, c.mask))


def test_texture_sources_and_augment_shapes() -> None:
    """Procedural and augmented textures are uint8 RGB of the requested size; kinds drawn vary."""
    rng = np.random.default_rng(2)
    t = procedural(48, rng)
    assert t.shape == (48, 48, 3) and t.dtype == np.uint8 and t.std() > 0
    a = glass_augment(t, rng)
    assert a.shape == t.shape and a.dtype == np.uint8
    bank = TextureBank(size=48, own_images=_good_images(2, 48))
    kinds = {bank.draw(rng)[1] for _ in range(20)}
    assert kinds == {"self", "procedural"}


def test_texture_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A user texture folder is read and used; a missing folder is a ConfigError."""
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 77, np.uint8)).save(tmp_path / "t.png")
    bank = TextureBank(size=32, folder=tmp_path, kinds=("folder",))
    tex, kind = bank.draw(np.random.default_rng(0))
    assert kind == "folder" and tex.shape == (32, 32, 3)
    with pytest.raises(ConfigError):
        TextureBank(size=32, folder=tmp_path / "nope")


def test_contact_sheet_draws_outlines() -> None:
    """The sheet has one tile per sample and red outline pixels where masks have edges."""
    img = np.full((32, 32, 3), 128, np.uint8)
    m = np.zeros((32, 32), bool)
    m[8:24, 8:24] = True
    sheet = contact_sheet([(img, m, "a"), (img, m, "b")], columns=2, tile=64)
    assert sheet.shape[1] == 128
    red = (sheet[..., 0] == 255) & (sheet[..., 1] == 0) & (sheet[..., 2] == 0)
    assert red.sum() > 50
