"""Part mask: learnt from good images alone, stored in the model, applied to the patch
scores before the image score in torch and in the exported graph alike; rejected on a
full-frame surface."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ngcal.cli.main import main
from ngcal.core.errors import ArtifactError
from ngcal.core.manifest import ModelManifest, read_manifest
from ngcal.patchcore.foreground import PartMaskLearner, otsu
from ngcal.patchcore.probe_defects import ProbeDefects, paste_defects

pytestmark = pytest.mark.torch

SIZE = 128
RADIUS = 0.3


def part_on_background(rng: np.random.Generator, *, clutter: int | None = None) -> np.ndarray:
    """uint8 [SIZE, SIZE]: a grainy grey disk (a part, centre jittered by 2 px) on a dark
    noisy table with 0-2 bright specks of dust (``clutter`` of them when given)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = SIZE / 2 + rng.uniform(-2, 2, 2)
    part = (yy - cy) ** 2 + (xx - cx) ** 2 < (RADIUS * SIZE) ** 2
    img = 30 + rng.normal(0, 12, (SIZE, SIZE))
    img[part] = 150 + rng.normal(0, 8, int(part.sum()))
    for _ in range(int(rng.integers(0, 3)) if clutter is None else clutter):
        while True:
            by, bx = rng.uniform(6, SIZE - 6, 2)
            if (by - cy) ** 2 + (bx - cx) ** 2 > ((RADIUS + 0.08) * SIZE) ** 2:
                break
        r = rng.uniform(3, 6)
        img[(yy - by) ** 2 + (xx - bx) ** 2 < r * r] = 220
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def part_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 good parts on a cluttered table, MVTec layout (train/good only)."""
    root = tmp_path_factory.mktemp("part") / "cat"
    (root / "train" / "good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(part_on_background(rng)).save(root / "train" / "good" / f"{i:03d}.png")
    return root


def inputs(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 grey images -> model inputs [n, 3, H, W] normalised as Preprocessing does."""
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    return ((x - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()


def test_otsu_effectiveness_tells_a_split_from_a_single_mode() -> None:
    """Two well separated modes split with effectiveness near 1 at a threshold between
    them; one Gaussian mode gives about 2/pi (0.64), a constant row 0."""
    g = torch.Generator().manual_seed(0)
    two = torch.cat([torch.randn(1, 500, generator=g), 8 + torch.randn(1, 500, generator=g)], 1)
    one = torch.randn(1, 1000, generator=g)
    t, eta = otsu(torch.cat([two, one, torch.zeros(1, 1000)]))
    assert 2.0 < float(t[0]) < 6.0 and float(eta[0]) > 0.9
    assert 0.55 < float(eta[1]) < 0.72 and float(eta[2]) == 0.0


def test_mask_covers_the_part_and_not_the_clutter() -> None:
    """On parts on a cluttered table the mask is a clear split that holds the whole disk
    (grown by a patch), nothing near the corners, and passes the degeneracy checks."""
    rng = np.random.default_rng(1)
    learner = PartMaskLearner((16, 16))
    learner.add(inputs([part_on_background(rng) for _ in range(20)]))
    m = learner.mask()
    assert m.problem() is None and m.contrast > 0.8
    yy, xx = np.mgrid[0:16, 0:16] + 0.5
    disk = (yy - 8) ** 2 + (xx - 8) ** 2 < (RADIUS * 16) ** 2
    assert m.grid[disk].all()
    assert m.grid[:3, :3].sum() + m.grid[-3:, -3:].sum() == 0
    assert 0.25 < m.coverage < 0.6


def test_full_frame_surface_is_rejected() -> None:
    """A surface that fills the frame (grain and shading, no background) has no clear
    split: the mask reports a problem, so auto keeps the whole frame."""
    g = torch.Generator().manual_seed(0)
    shade = torch.nn.functional.interpolate(
        torch.rand(20, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bicubic"
    )
    x = (shade + 0.05 * torch.randn(20, 1, SIZE, SIZE, generator=g)).expand(-1, 3, -1, -1)
    learner = PartMaskLearner((16, 16))
    learner.add(x.contiguous())
    assert learner.mask().problem() is not None


def test_probe_defects_land_on_the_part() -> None:
    """With ``allowed`` every synthetic defect is centred on an allowed pixel, so its mass
    lies mostly inside the allowed region."""
    allowed = torch.zeros(64, 64, dtype=torch.bool)
    allowed[20:44, 20:44] = True
    x = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = paste_defects(x, ProbeDefects(area=(0.002, 0.005), seed=0), allowed=allowed)
    changed = (y - x).abs().amax(dim=1) > 1e-6
    for c in changed:
        assert float(c[allowed].sum()) >= 0.5 * float(c.sum()) > 0


def fit(data: Path, out: Path, *extra: str) -> dict[str, object]:
    args = ["fit", "--data", str(data), "--out", str(out), "--image-size", str(SIZE)]
    assert main([*args, "--coreset-ratio", "0.05", "--quiet", *extra]) == 0
    return {}


def test_mask_is_stored_applied_and_exported(
    part_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--foreground on``: the mask file is in the model (hashed, named by the spec); a
    bright speck on the table raises the unmasked model's score but not the masked one's;
    the exported graph's scores and maps equal torch's, background included."""
    from ngcal.core.runtime import open_scorer
    from ngcal.export.bundle_writer import export_bundle
    from ngcal.patchcore.io import load_model

    on, off, bundle = tmp_path / "on", tmp_path / "off", tmp_path / "bundle"
    fit(part_category, on, "--foreground", "on", "--cv-folds", "0")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["foreground"] is True
    fit(part_category, off, "--cv-folds", "0")
    m = read_manifest(on)
    assert isinstance(m, ModelManifest) and m.patchcore.foreground == "foreground.npy"
    assert "foreground.npy" in m.files and 0.2 < m.patchcore.stats["foreground_coverage"] < 0.8
    assert read_manifest(off).patchcore.foreground is None  # type: ignore[union-attr]
    masked, whole = load_model(on).module, load_model(off).module
    rng = np.random.default_rng(5)
    clean = part_on_background(rng, clutter=0)
    dusty = clean.copy()
    dusty[4:16, 4:16] = 220  # a speck in the corner, off the part
    x = inputs([clean, dusty])
    with torch.inference_mode():
        amap, s_on = masked(x)
        _, s_off = whole(x)
    rise_off, rise_on = float(s_off[1] - s_off[0]), float(s_on[1] - s_on[0])
    print(f"speck raises the score by {rise_off:.2f} unmasked, {rise_on:.2f} masked")
    # the speck is an alarm without the mask; with it, only the backbone's receptive
    # field carries a little of it onto the part's patches
    assert rise_off > 0.2 * float(s_off[0]) and rise_on < 0.4 * rise_off
    assert float(amap[1, :8, :8].abs().max()) < 1e-6  # background patches count 0
    export_bundle(on, bundle)
    assert (bundle / "foreground.npy").is_file()
    scorer = open_scorer(bundle, backend="ort-cpu", threads=1)
    try:
        res = scorer.score(x.numpy())
    finally:
        scorer.close()
    np.testing.assert_allclose(res.image_scores, s_on.numpy(), rtol=1e-4, atol=1e-5)
    assert res.anomaly_maps is not None
    np.testing.assert_allclose(res.anomaly_maps, amap.numpy(), rtol=1e-3, atol=1e-4)


def test_auto_records_the_foreground_choice(part_category: Path, tmp_path: Path) -> None:
    """``--auto`` on parts on a table compares whole frame and part mask on held-out good
    vs synthetic NG on the part and records the evidence; the held-out and leave-one-out
    scores follow the choice."""
    out = tmp_path / "auto"
    fit(part_category, out, "--auto", "--cv-folds", "4")
    m = read_manifest(out)
    assert isinstance(m, ModelManifest)
    fg = next(c for c in m.patchcore.choices if c.setting == "foreground")
    assert [c.candidate for c in fg.candidates] == ["whole_frame", "part_mask"]
    assert fg.note is None and fg.n_ng == 16 and fg.chosen in ("whole_frame", "part_mask")
    assert (m.patchcore.foreground is not None) == (fg.chosen == "part_mask")
    assert [c.setting for c in m.patchcore.choices] == ["foreground", "image_score"]


def test_a_corrupt_mask_is_refused(part_category: Path, tmp_path: Path) -> None:
    """A mask of the wrong shape is an ArtifactError naming the file, not a silent
    broadcast (the hash check passes when the manifest is rewritten along with it)."""
    from ngcal.core.files import save_npy
    from ngcal.core.manifest import write_manifest
    from ngcal.patchcore.io import load_model

    out = tmp_path / "on"
    fit(part_category, out, "--foreground", "on", "--cv-folds", "0")
    save_npy(out / "foreground.npy", np.ones((3, 3), np.float32))
    m = read_manifest(out, verify=False)
    write_manifest(out, m)
    with pytest.raises(ArtifactError, match="foreground.npy"):
        load_model(out)
