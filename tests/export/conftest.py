"""A tiny PatchCore fitted once per session on the procedural demo category (64 px)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout category (numpy + Pillow, no third-party data)."""
    from ngcal.generation.demo_data import make_demo_category

    return make_demo_category(
        tmp_path_factory.mktemp("demo") / "cat",
        n_train=8,
        n_test_good=3,
        n_test_per_defect=1,
        size=96,
        seed=3,
    )


@pytest.fixture(scope="session")
def tiny_model(demo_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory fitted through the real CLI at 64 px (a few seconds)."""
    import torch  # noqa: F401

    from ngcal.cli.main import main

    out = tmp_path_factory.mktemp("model") / "model"
    rc = main(
        [
            "fit",
            "--data",
            str(demo_category),
            "--out",
            str(out),
            "--image-size",
            "64",
            "--coreset-ratio",
            "0.05",
            "--cv-folds",
            "0",
            "--quiet",
        ]
    )
    assert rc == 0
    return out
