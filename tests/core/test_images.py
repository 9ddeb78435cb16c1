"""Edge preprocessing (numpy, ``ngcal.core.images``) is what the PatchCore training path feeds.

Three checks: (1) the fit path's batch loader returns exactly the edge arrays; (2) the
features the fit path extracts equal the embedder applied to edge arrays; (3) the numpy
definition matches an independent torchvision pipeline (PIL resize, ToTensor, Normalize)
for the image kinds a line camera produces.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ngcal.core.images import load_and_preprocess
from ngcal.core.manifest import Preprocessing

DATA = Path(
    os.environ.get(
        "NGCAL_DATA",
        Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "magnetic_tile" / "tile",
    )
)
SPEC = Preprocessing(image_size=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Grayscale, RGB, palette, RGBA and non-square images, plus two real tiles if present."""
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = []
    gray = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(p := root / "gray.png")
    paths.append(p)
    rgb = rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb, mode="RGB").save(p := root / "rgb.jpg", quality=90)
    paths.append(p)
    Image.fromarray(rgb, mode="RGB").convert("P").save(p := root / "pal.png")
    paths.append(p)
    rgba = np.dstack([rgb, np.full((70, 70), 200, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(p := root / "rgba.png")
    paths.append(p)
    if (DATA / "train" / "good").is_dir():
        paths += sorted((DATA / "train" / "good").glob("*.png"))[:2]
    return paths


def test_fit_batch_loader_returns_the_edge_arrays(images: list[Path]) -> None:
    """``patchcore.io.load_batch`` (used by fit and evaluate) == ``load_and_preprocess``."""
    import torch  # noqa: F401

    from ngcal.patchcore.io import load_batch

    batch, ok, errors = load_batch(images, SPEC)
    assert errors == [] and ok == list(range(len(images)))
    edge = np.stack([load_and_preprocess(p, SPEC) for p in images])
    assert batch.dtype == np.float32 and batch.shape == (len(images), 3, 64, 64)
    np.testing.assert_array_equal(batch, edge)


def test_fit_features_equal_embedder_on_edge_arrays(images: list[Path]) -> None:
    """Features extracted during fit equal the embedder applied to the edge preprocessing."""
    import timm
    import torch

    from ngcal.patchcore.fitting import extract_features
    from ngcal.patchcore.model import PatchEmbedder

    torch.manual_seed(0)
    bb = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3)
    ).eval()
    emb = PatchEmbedder(bb).eval()
    fit_feats = extract_features(emb, images, SPEC, batch_size=3, device="cpu", progress=False)
    edge = torch.from_numpy(np.stack([load_and_preprocess(p, SPEC) for p in images]))
    with torch.inference_mode():
        ref = emb(edge)
    torch.testing.assert_close(fit_feats, ref, rtol=1e-5, atol=1e-5)


def test_numpy_matches_torchvision_reference(images: list[Path]) -> None:
    """The numpy definition equals PIL->RGB, Resize(bicubic), ToTensor, Normalize(0.5, 0.5)."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize((64, 64), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=list(SPEC.mean), std=list(SPEC.std)),
        ]
    )
    for p in images:
        with Image.open(p) as im:
            ref = tf(im.convert("RGB")).numpy()
        got = load_and_preprocess(p, SPEC)
        assert got.shape == ref.shape == (3, 64, 64), p.name
        assert np.abs(got - ref).max() <= 1e-6, p.name
