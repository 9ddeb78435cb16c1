"""The ``fewshot`` diffusion backend and ``ngcal generate diffusion`` on a tiny demo category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ngcal.cli.main import main
from ngcal.core.scoresets import load_scoreset, load_scoresets
from ngcal.generation.diffusion.backend import Request
from ngcal.generation.diffusion.fewshot import FewShotBackend, FewShotConfig
from ngcal.generation.diffusion.targets import draw_target, load_references

pytestmark = pytest.mark.torch
SIZE = 64
TINY = FewShotConfig(crop=16, channels=(16, 32), train_steps=4, batch_size=4, sample_steps=3)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _requests(category: Path, n: int, seed: int = 0) -> tuple[list[Request], list]:  # type: ignore[type-arg]
    refs = load_references([category / "test" / "spot", category / "test" / "scratch"], SIZE)
    rng = np.random.default_rng(seed)
    goods = [
        np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)))
        for p in sorted((category / "train" / "good").glob("*.png"))[:4]
    ]
    reqs = []
    for j in range(n):
        g = ("spot", "scratch")[j % 2]
        tgt, _ = draw_target([r for r in refs if r.group == g], (SIZE, SIZE), rng)
        reqs.append(Request(goods[j % len(goods)], tgt, g))
    return reqs, refs


def test_references_load_mvtec_pairs_with_masks_and_groups(demo_ng_category: Path) -> None:
    refs = load_references([demo_ng_category / "test" / "spot"], SIZE)
    assert [r.group for r in refs] == ["spot", "spot"]
    assert all(r.image.shape == (SIZE, SIZE, 3) and r.mask.any() for r in refs)


def test_candidates_keep_the_background_bit_exact(demo_ng_category: Path) -> None:
    reqs, refs = _requests(demo_ng_category, 3)
    backend = FewShotBackend(TINY)
    rec = backend.prepare(refs, [r.good for r in reqs], progress=False)
    assert rec["groups"] == ["scratch", "spot"] and rec["zero_ng"] is False
    rows = backend.generate(reqs, candidates=2, progress=False)
    assert [len(r) for r in rows] == [2, 2, 2]
    for req, row in zip(reqs, rows, strict=True):
        for c in row:
            assert np.array_equal(c.image[~req.target], req.good[~req.target])
            assert c.crop.shape == (TINY.crop, TINY.crop, 3)
    assert len(backend.training_crops()) == len(refs)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo_ng_category: Path) -> None:
    reqs, refs = _requests(demo_ng_category, 2)

    def run(seed: int) -> list[np.ndarray]:
        b = FewShotBackend(FewShotConfig(**{**TINY.__dict__, "seed": seed}))
        b.prepare(refs, [r.good for r in reqs], progress=False)
        return [c.image for row in b.generate(reqs, candidates=1, progress=False) for c in row]

    a, b, other = run(3), run(3), run(4)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))
    assert any(x.tobytes() != y.tobytes() for x, y in zip(a, other, strict=True))


def test_zero_ng_mode_trains_on_good_crops_and_paints_inside_the_mask(
    demo_ng_category: Path,
) -> None:
    reqs, _ = _requests(demo_ng_category, 2)
    backend = FewShotBackend(TINY)
    rec = backend.prepare([], [r.good for r in reqs], progress=False)
    assert rec["zero_ng"] is True and rec["groups"] == ["perlin"]
    assert backend.training_crops() == []
    for req, row in zip(reqs, backend.generate(reqs, candidates=1, progress=False), strict=True):
        assert np.array_equal(row[0].image[~req.target], req.good[~req.target])
        assert not np.array_equal(row[0].image[req.target], req.good[req.target])


def test_cli_writes_a_glass_like_folder_that_calibrate_accepts(
    demo_ng_category: Path, demo_ng_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "diff"
    d = demo_ng_category
    rc = main(
        [
            "generate", "diffusion", "--model", str(demo_ng_model), "--data", str(d),
            "--out", str(out), "--ng", str(d / "test" / "spot"), "--ng", str(d / "test" / "dent"),
            "--count", "4", "--candidates", "2", "--train-steps", "3", "--strength", "0.5",
            "--device", "cpu",
            "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    index = json.loads((out / "index.json").read_text())["items"]
    assert len(index) == 8  # every candidate recorded, accepted or not
    checks = {"background", "drawn", "label_iou", "seam", "near_copy", "feature"}
    for row in index:
        assert set(row["checks"]) == checks
        assert row["checks"]["background"]["passed"] is True
        assert row["passed"] == (not row["failed"])
        assert (out / row["image"]).is_file() and (out / row["mask"]).is_file()
        assert _png(out / row["mask"]).shape == (SIZE, SIZE)
        assert row["group"] in ("spot", "dent")
        # every target has a source reference here: each starts from its re-placed defect
        assert row["backend"]["guided"] is True and row["backend"]["strength"] == 0.5
    ss = load_scoreset(out / "scores" / "diffusion.json")
    kept = [r for r in index if r["kept"]]
    assert ss.source == "diffusion" and len(ss) == len(kept)
    assert ss.groups is not None and set(ss.groups) <= {"spot", "dent"}
    assert np.all(np.isfinite(ss.scores))
    run = json.loads((out / "diffusion_run.json").read_text())
    assert run["acceptance_rate"] == len(kept) / 4 and run["candidates"] == 8
    assert _png(out / "contact_sheet.png").ndim == 3
    assert [s.source for s in load_scoresets([out])] == ["diffusion"]
    thr = tmp_path / "thr.json"
    rc = main(["calibrate", "--model", str(demo_ng_model), "--scores", str(out), "--out", str(thr)])
    assert rc == 0 and thr.is_file()
