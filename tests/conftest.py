"""Suite-wide settings and shared fixtures.

One compute thread (two threads collapse on shared CI cores). The shared magnetic-tile data
is ``$NGCAL_DATA`` or ``<repo>/../shared/data/magnetic_tile/tile``; tests that need it skip
(with the path in the reason) only when it is absent; ``small_model`` is a PatchCore model
directory fitted once per session through the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


def pytest_configure(config: object) -> None:
    """Pin torch to one thread if (and only if) something already imported it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


REPO = Path(__file__).resolve().parents[1]
DATA = Path(
    os.environ.get("NGCAL_DATA", REPO / ".." / "shared" / "data" / "magnetic_tile" / "tile")
).resolve()

SMALL_SIZE = 128
N_TRAIN = 16


@pytest.fixture(scope="session")
def tile_data() -> Path:
    """The magnetic-tile category folder (MVTec layout)."""
    if not (DATA / "train" / "good").is_dir():
        pytest.skip(f"shared data not found at {DATA} (set NGCAL_DATA)")
    return DATA


@pytest.fixture(scope="session")
def small_category(tile_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout copy (symlinks): 16 train, 6 good test, 3+3 defective with masks."""
    root = tmp_path_factory.mktemp("tile_small")
    picks = {"train/good": N_TRAIN, "test/good": 6, "test/blowhole": 3, "test/crack": 3}
    for rel, count in picks.items():
        src = sorted((tile_data / rel).iterdir())
        step = max(1, len(src) // count)
        dst = root / rel
        dst.mkdir(parents=True)
        for p in src[::step][:count]:
            (dst / p.name).symlink_to(p)
            defect = rel.split("/")[1]
            mask = tile_data / "ground_truth" / defect / f"{p.stem}_mask.png"
            if rel.startswith("test/") and mask.is_file():
                (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                (root / "ground_truth" / defect / mask.name).symlink_to(mask)
    return root


@pytest.fixture(scope="session")
def small_model(small_category: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir fitted through the CLI on the small category at 128 px, 4 folds."""
    from ngcal.cli.main import main

    out = tmp_path_factory.mktemp("models") / "small"
    rc = main(
        [
            "fit",
            "--data",
            str(small_category),
            "--out",
            str(out),
            "--image-size",
            str(SMALL_SIZE),
            "--coreset-ratio",
            "0.05",
            "--cv-folds",
            "4",
            "--quiet",
        ]
    )
    assert rc == 0
    return out
