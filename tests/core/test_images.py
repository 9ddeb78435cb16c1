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
#: a non-square input (height 96, width 64), as ``fit --aspect keep`` writes it
TALL = Preprocessing(image_size=96, input_hw=(96, 64))
SPECS = pytest.mark.parametrize("spec", [SPEC, TALL], ids=["square", "non_square"])


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


@SPECS
def test_fit_batch_loader_returns_the_edge_arrays(images: list[Path], spec: Preprocessing) -> None:
    """``patchcore.io.load_batch`` (used by fit and evaluate) == ``load_and_preprocess``."""
    import torch  # noqa: F401

    from ngcal.patchcore.io import load_batch

    batch, ok, errors = load_batch(images, spec)
    assert errors == [] and ok == list(range(len(images)))
    edge = np.stack([load_and_preprocess(p, spec) for p in images])
    assert batch.dtype == np.float32 and batch.shape == (len(images), 3, *spec.hw)
    np.testing.assert_array_equal(batch, edge)


@SPECS
def test_fit_features_equal_embedder_on_edge_arrays(
    images: list[Path], spec: Preprocessing
) -> None:
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
    fit_feats = extract_features(emb, images, spec, batch_size=3, device="cpu", progress=False)
    edge = torch.from_numpy(np.stack([load_and_preprocess(p, spec) for p in images]))
    with torch.inference_mode():
        ref = emb(edge)
    torch.testing.assert_close(fit_feats, ref, rtol=1e-5, atol=1e-5)


@SPECS
def test_numpy_matches_torchvision_reference(images: list[Path], spec: Preprocessing) -> None:
    """The numpy definition equals PIL->RGB, Resize(bicubic), ToTensor, Normalize(0.5, 0.5)."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize(spec.hw, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )
    for p in images:
        with Image.open(p) as im:
            ref = tf(im.convert("RGB")).numpy()
        got = load_and_preprocess(p, spec)
        assert got.shape == ref.shape == (3, *spec.hw), p.name
        assert np.abs(got - ref).max() <= 1e-6, p.name


def test_square_manifests_without_input_hw_still_read_square() -> None:
    """A preprocessing block written before ``input_hw`` existed reads as the square it was;
    a side outside [32, 2048] is refused."""
    old = Preprocessing.model_validate({"image_size": 256, "resample": "bicubic"})
    assert old.input_hw is None and old.hw == (256, 256)
    assert TALL.hw == (96, 64)
    with pytest.raises(ValueError, match="input_hw"):
        Preprocessing(image_size=96, input_hw=(96, 16))
