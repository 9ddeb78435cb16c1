"""GLASS on a part-masked model: LAS and GAS regions on the part only, recorded; a model
without a mask (or with an all-ones mask) gets exactly the regions and scores of before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ngcal.generation.glass import GlassOptions, generate_glass
from ngcal.generation.las import contact_sheet
from ngcal.generation.perlin import (
    cells_to_pixels,
    perlin_mask,
    perlin_mask_on_part,
    pool_to_grid,
)

pytestmark = pytest.mark.torch
FAST = dict(severities=(0.5, 3.0), count=6, epochs=1, pool_images=4, hidden=32, device="cpu")
SIZE = 64


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def part_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bright, textured disc (the part, radius 0.3 of the frame) on a dark, noisy belt."""
    root = tmp_path_factory.mktemp("glass_part") / "cat"
    rng = np.random.default_rng(3)
    size = 72
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(14):
        cy, cx = 0.5 + rng.uniform(-0.02, 0.02, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 0.3**2
        img = 30 + rng.normal(0, 6, (size, size))
        part = (
            170 + 10 * np.sin(2 * np.pi * 7 * xx + rng.uniform(0, 6)) + rng.normal(0, 4, img.shape)
        )
        img[disc] = part[disc]
        d = root / "train" / "good"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def part_model(part_category: Path) -> Path:
    """``ngcal fit --foreground on`` on ``part_category`` (64 px): a model with a part mask."""
    from ngcal.cli.main import main

    out = part_category.parent / "model"
    rc = main(
        [
            "fit", "--data", str(part_category), "--out", str(out), "--image-size", str(SIZE),
            "--cv-folds", "0", "--coreset-ratio", "0.25", "--foreground", "on", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def _grid_mask(model: Path) -> np.ndarray:
    return np.load(model / "foreground.npy") > 0.5


def test_cells_to_pixels_pools_back_to_the_same_cells() -> None:
    """Upsampling a grid mask on pool_to_grid's cell boundaries is undone by pooling,
    also where the image side is not a multiple of the grid."""
    rng = np.random.default_rng(0)
    for shape, grid in (((64, 64), (8, 8)), ((70, 50), (8, 6))):
        cells = rng.random(grid) < 0.4
        pix = cells_to_pixels(cells, shape)
        assert pix.shape == shape
        assert np.array_equal(pool_to_grid(pix, grid), cells)


def test_region_on_an_all_ones_part_is_the_plain_glass_region() -> None:
    """With a part covering the frame, the region and the generator state afterwards are
    exactly those of ``perlin_mask``: nothing is redrawn."""
    for seed in range(10):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        plain = perlin_mask((64, 64), (8, 8), a)
        on = perlin_mask_on_part((64, 64), (8, 8), b, np.ones((64, 64), bool))
        assert np.array_equal(plain.pixels, on.mask.pixels) and on.redraws == 0
        assert a.random() == b.random()


def test_regions_lie_inside_a_small_part_and_redraws_are_counted() -> None:
    """Every region lies in the part, pixels and cells; regions cut below one patch cell are
    redrawn (counted), at most ``max_tries`` times; an empty part is refused."""
    from ngcal.core.errors import ConfigError

    grid = np.zeros((8, 8), bool)
    grid[3:5, 2:5] = True  # 6 of 64 cells
    part = cells_to_pixels(grid, (64, 64))
    rng = np.random.default_rng(1)
    regions = [perlin_mask_on_part((64, 64), (8, 8), rng, part, max_tries=5) for _ in range(60)]
    for r in regions:
        assert r.mask.pixels.any() and not (r.mask.pixels & ~part).any()
        assert not (r.mask.cells & ~grid).any()
        assert 0 <= r.redraws <= 4
    assert sum(r.redraws for r in regions) > 0
    with pytest.raises(ConfigError, match="empty"):
        perlin_mask_on_part((64, 64), (8, 8), rng, np.zeros((64, 64), bool))


def test_contact_sheet_outlines_the_part_only_when_given() -> None:
    """The part outline (green) is drawn when a part mask is passed and not otherwise."""
    img = np.full((32, 32, 3), 128, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[2:6, 2:6] = True
    part = np.zeros((32, 32), bool)
    part[8:24, 8:24] = True
    plain = contact_sheet([(img, mask, "x")], tile=64)
    shown = contact_sheet([(img, mask, "x")], tile=64, part=part)
    green = (shown == (0, 200, 0)).all(axis=2)
    assert green.any() and not (plain == (0, 200, 0)).all(axis=2).any()
    assert not green[:16].any()  # outline inside the part's tile rows 16..47 only


def test_glass_places_las_and_gas_on_the_part_and_records_it(
    part_model: Path, part_category: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a masked model every LAS mask and changed pixel lies in the part mask upsampled to
    the image, GAS replaces features only at part positions, and glass_run.json and the
    score sets say the mask was used; with part_mask=False the run says it was not."""
    import ngcal.generation.glass as glass

    grid = _grid_mask(part_model)
    assert 0.1 < grid.mean() < 0.9  # a real part, not the whole frame
    part = cells_to_pixels(grid, (SIZE, SIZE))
    seen: list[torch.Tensor] = []
    real_implant = glass.implant

    def spy(feats: torch.Tensor, cells: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        seen.append(cells.cpu())
        return real_implant(feats, cells, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(glass, "implant", spy)
    out = tmp_path / "on"
    res = generate_glass(part_model, part_category, out, GlassOptions(**FAST), progress=False)  # type: ignore[arg-type]
    assert seen and all(c.any() and not (c.numpy() & ~grid).any() for c in seen)
    index = json.loads((out / "las" / "index.json").read_text())["items"]
    for row in index:
        mask = _png(out / "las" / row["mask"]) == 255
        assert mask.any() and not (mask & ~part).any()
        assert row["redraws"] >= 0
    run = json.loads((out / "glass_run.json").read_text())
    pm = run["part_mask"]
    assert pm["used"] is True and pm["coverage"] == pytest.approx(float(grid.mean()))
    assert pm["las_redraws"] == sum(r["redraws"] for r in index)
    assert res.image_set.meta["part_mask"] is True
    assert all(s.meta["part_mask"] is True for s in res.feature_sets)

    off = generate_glass(
        part_model,
        part_category,
        tmp_path / "off",
        GlassOptions(**FAST, part_mask=False),  # type: ignore[arg-type]
        progress=False,
    )
    assert off.summary["part_mask"] == {
        "used": False,
        "model_has_mask": True,
        "why": "part_mask=False (anywhere)",
    }


def test_a_model_without_a_mask_scores_as_with_an_all_ones_mask(
    tiny_model: Path, tiny_category: Path, tmp_path: Path
) -> None:
    """A model without a part mask gets the same regions and scores as the same model given
    a mask of all ones (the on-part path with nowhere excluded): the no-mask path is
    unchanged, and the on-part path adds nothing but the cut. The record tells them apart."""
    from ngcal.core.files import save_npy
    from ngcal.core.manifest import read_manifest, write_manifest

    ones = tmp_path / "ones"
    shutil.copytree(tiny_model, ones)
    man = read_manifest(ones)
    h, w = man.patchcore.feature_map_size  # type: ignore[union-attr]
    save_npy(ones / "foreground.npy", np.ones((h, w), np.float32))
    spec = man.patchcore.model_copy(update={"foreground": "foreground.npy"})  # type: ignore[union-attr]
    write_manifest(ones, man.model_copy(update={"patchcore": spec}))

    a = generate_glass(
        tiny_model, tiny_category, tmp_path / "a", GlassOptions(**FAST), progress=False
    )  # type: ignore[arg-type]
    b = generate_glass(ones, tiny_category, tmp_path / "b", GlassOptions(**FAST), progress=False)  # type: ignore[arg-type]
    for x, y in zip(a.feature_sets, b.feature_sets, strict=True):
        assert np.array_equal(x.scores, y.scores)
    assert np.array_equal(a.image_set.scores, b.image_set.scores)
    for j in range(6):
        name = f"las/masks/{j:04d}_mask.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.summary["part_mask"]["used"] is False  # type: ignore[index]
    assert b.summary["part_mask"]["used"] is True  # type: ignore[index]
    assert b.summary["part_mask"]["las_redraws"] == 0  # type: ignore[index]


def test_diffusion_targets_lie_on_the_part_of_a_masked_model(
    part_category: Path, part_model: Path, tmp_path: Path
) -> None:
    """``ngcal generate diffusion`` on a model with a part mask (zero-NG mode) paints only
    on the part, as GLASS does: every candidate's label mask lies in the part's pixels, and
    the run record says the mask was used."""
    from ngcal.cli.main import main

    out = tmp_path / "diff"
    rc = main(
        [
            "generate", "diffusion", "--model", str(part_model), "--data", str(part_category),
            "--out", str(out), "--count", "16", "--candidates", "1", "--train-steps", "3",
            "--device", "cpu", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    part = cells_to_pixels(_grid_mask(part_model), (SIZE, SIZE))
    assert 0.05 < part.mean() < 0.95
    rows = json.loads((out / "index.json").read_text())["items"]
    masks = [_png(out / r["mask"]) > 0 for r in rows]
    assert any(m.any() for m in masks)  # something was drawn
    for m in masks:
        assert not (m & ~part).any()
    run = json.loads((out / "diffusion_run.json").read_text())
    assert run["part_mask"]["used"] is True
    assert run["part_mask"]["coverage"] == pytest.approx(float(part.mean()))
