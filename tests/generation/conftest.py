"""Generation test fixtures: a tiny procedural MVTec-style category and a model fitted on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

N_TRAIN = 14
IMAGE_SIZE = 64


def _texture(rng: np.random.Generator, size: int = 72) -> np.ndarray:
    """A grey, tile-like image: smooth gradient, vertical streaks and pixel noise (uint8)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    streaks = np.sin(2 * np.pi * (xx * 9 + rng.uniform(0, 1)))
    img = 120 + 30 * yy + 8 * streaks + rng.normal(0, 4, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<tmp>/cat`` with train/good (14 grey images) and test/{good,scratch} (2 each)."""
    root = tmp_path_factory.mktemp("glass") / "cat"
    rng = np.random.default_rng(0)
    for split, n in (("train/good", N_TRAIN), ("test/good", 2), ("test/scratch", 2)):
        d = root / split
        d.mkdir(parents=True)
        for i in range(n):
            img = _texture(rng)
            if "scratch" in split:
                img[30:34, 10:60] = 250
            Image.fromarray(img, mode="L").save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_category: Path) -> Path:
    """A PatchCore fitted by ``ngcal fit`` on every train image of ``tiny_category`` (64 px)."""
    import torch  # noqa: F401

    from ngcal.cli.main import main

    out = tiny_category.parent / "model"
    rc = main(
        [
            "fit", "--data", str(tiny_category), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--cv-folds", "0", "--coreset-ratio", "0.25",
            "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def demo_ng_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small procedural demo category (96 px) whose test defects come with masks."""
    from ngcal.generation.demo_data import make_demo_category

    root = tmp_path_factory.mktemp("diffusion") / "demo"
    return make_demo_category(root, n_train=14, n_test_good=2, n_test_per_defect=2, size=96)


@pytest.fixture(scope="session")
def demo_ng_model(demo_ng_category: Path) -> Path:
    """A PatchCore fitted by ``ngcal fit`` on ``demo_ng_category`` (64 px input)."""
    import torch  # noqa: F401

    from ngcal.cli.main import main

    out = demo_ng_category.parent / "model"
    rc = main(
        [
            "fit", "--data", str(demo_ng_category), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--cv-folds", "0", "--coreset-ratio", "0.25",
            "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    return out
