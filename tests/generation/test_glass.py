"""GLASS pipeline on a tiny fitted model: CLI outputs, determinism, held-out scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ngcal.cli.main import main  # noqa: E402
from ngcal.core.errors import ArtifactError  # noqa: E402
from ngcal.core.images import load_rgb, resize_rgb  # noqa: E402
from ngcal.core.scoresets import load_scoreset, load_scoresets  # noqa: E402
from ngcal.generation.glass import GlassOptions, generate_glass, radius_unit  # noqa: E402

pytestmark = pytest.mark.torch
SEVERITIES = (0.5, 3.0)


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


FAST = dict(severities=SEVERITIES, count=6, epochs=1, pool_images=4, hidden=32, device="cpu")


def test_cli_writes_score_sets_images_masks_and_sheet(
    tiny_model: Path, tiny_category: Path, tmp_path: Path
) -> None:
    """`ngcal generate glass` writes one tagged set per severity, LAS PNGs whose binary masks
    cover exactly the changed pixels, and a contact sheet; scores grow with severity."""
    out = tmp_path / "g"
    rc = main(
        [
            "generate", "glass", "--model", str(tiny_model), "--data", str(tiny_category),
            "--out", str(out), "--severities", "0.5,3", "--count", "6", "--epochs", "1",
            "--pool-images", "4", "--hidden", "32", "--device", "cpu", "--no-progress",
        ]
    )  # fmt: skip
    assert rc == 0
    sets = {(s.source, s.severity): s for s in load_scoresets([out / "scores"])}
    assert set(sets) == {("glass_feature", 0.5), ("glass_feature", 3.0), ("glass_image", None)}
    for s in sets.values():
        assert len(s) == 6 and len(set(s.item_ids)) == 6
        assert all(i.startswith("train/good/") for i in s.item_ids)
        assert s.model_sha256 and s.meta["r0_stat"] == "loo_patch_nn_p50"
    low, high = sets[("glass_feature", 0.5)], sets[("glass_feature", 3.0)]
    assert np.median(high.scores) > np.median(low.scores)
    index = json.loads((out / "las" / "index.json").read_text())["items"]
    assert len(index) == 6
    for row in index:
        img = _png(out / "las" / row["image"])
        mask_png = _png(out / "las" / row["mask"])
        assert set(np.unique(mask_png)) <= {0, 255}
        mask = mask_png == 255
        src = resize_rgb(load_rgb(tiny_category / row["source"]), 64, "bicubic")
        changed = (img != src).any(axis=2)
        assert mask.any() and not (changed & ~mask).any()
        assert changed[mask].mean() > 0.7
    assert _png(out / "contact_sheet.png").shape[2] == 3
    assert json.loads((out / "glass_run.json").read_text())["r0"] > 0


def test_fixed_seed_gives_identical_outputs(
    tiny_model: Path, tiny_category: Path, tmp_path: Path
) -> None:
    """Two runs with one seed write identical scores and LAS images; another seed differs."""
    a = generate_glass(
        tiny_model, tiny_category, tmp_path / "a", GlassOptions(**FAST), progress=False
    )  # type: ignore[arg-type]  # noqa: E501
    b = generate_glass(
        tiny_model, tiny_category, tmp_path / "b", GlassOptions(**FAST), progress=False
    )  # type: ignore[arg-type]  # noqa: E501
    c = generate_glass(
        tiny_model,
        tiny_category,
        tmp_path / "c",
        GlassOptions(**FAST, seed=1),
        progress=False,  # type: ignore[arg-type]
    )
    for x, y in zip(a.feature_sets, b.feature_sets, strict=True):
        assert np.array_equal(x.scores, y.scores) and x.item_ids == y.item_ids
    assert np.array_equal(a.image_set.scores, b.image_set.scores)
    for name in ("las/images/0000.png", "las/masks/0000_mask.png", "contact_sheet.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not np.array_equal(a.feature_sets[0].scores, c.feature_sets[0].scores)


def test_held_out_scoring_matches_leave_one_out(tiny_model: Path, tiny_category: Path) -> None:
    """Scoring a training image without its own bank rows reproduces the fit's LOO score,
    and is never lower than scoring it against the full bank."""
    from ngcal.core.images import load_and_preprocess
    from ngcal.generation.heldout import HeldOutScorer, bank_sources, training_index
    from ngcal.patchcore.io import load_model

    loaded = load_model(tiny_model)
    index = training_index(tiny_model, tiny_category, loaded.manifest.patchcore.num_train_images)
    loo = load_scoreset(tiny_model / "scores" / "normal_loo.json")
    scorer = HeldOutScorer(
        loaded.module, bank_sources(tiny_model, loaded.module.memory_bank.shape[0])
    )
    for t in index[:4]:
        x = torch.from_numpy(load_and_preprocess(t.sample.path, loaded.preprocessing))[None]
        with torch.no_grad():
            feats = loaded.module.embed(x)
            _, full = loaded.module.head(feats)
        _, held = scorer.head(feats, [t.fit_index])
        expected = loo.scores[loo.item_ids.index(t.sample.item_id)]
        assert float(held[0]) == pytest.approx(expected, rel=1e-4)
        assert float(held[0]) >= float(full[0]) - 1e-5


def test_radius_unit_needs_the_fit_statistic() -> None:
    """A model without leave-one-out NN statistics is refused with the field named."""
    assert radius_unit({"loo_patch_nn_p50": 2.5}, "m") == (2.5, "loo_patch_nn_p50")
    with pytest.raises(ArtifactError, match="loo_patch_nn_p50"):
        radius_unit({"other": 1.0}, "m")


def test_cli_rejects_bad_options(tiny_model: Path, tiny_category: Path, tmp_path: Path) -> None:
    """Malformed severities stop argparse (exit 2); a non-positive one is a ConfigError (rc 2)."""
    base = ["generate", "glass", "--model", str(tiny_model), "--data", str(tiny_category),
            "--out", str(tmp_path / "x"), "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main([*base, "--severities", "a,b"])
    assert e.value.code == 2
    assert main([*base, "--severities", "0,1"]) == 2


def test_glass_and_diffusion_refuse_a_non_square_model_input() -> None:
    """A model fitted with --aspect keep (input_hw) is refused by name, never given NG drawn
    on a square canvas; a square input passes with its side."""
    from ngcal.core.errors import ConfigError
    from ngcal.core.manifest import Preprocessing
    from ngcal.generation.glass import square_side

    assert square_side(Preprocessing(image_size=96), "ngcal generate glass") == 96
    assert square_side(Preprocessing(image_size=96, input_hw=(96, 96)), "x") == 96
    with pytest.raises(ConfigError, match=r"ngcal generate glass.*96 x 64"):
        square_side(Preprocessing(image_size=96, input_hw=(96, 64)), "ngcal generate glass")
