"""Backbones: the Lite0 weight remap is right, and missing weights fail with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ngcal.core.errors import ConfigError  # noqa: E402
from ngcal.core.files import sha256_file  # noqa: E402
from ngcal.patchcore import backbones  # noqa: E402

pytestmark = pytest.mark.torch

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_remap_puts_chelsea_among_cats() -> None:
    """The remapped package weights classify skimage's cat photo as an ImageNet cat (top-1)."""
    import skimage.data as skimage_data

    from ngcal.core.images import preprocess

    model = backbones.lite0_classifier()
    spec = backbones.default_preprocessing(backbones.LITE0, 224)
    x = torch.from_numpy(preprocess(skimage_data.chelsea(), spec))[None]
    with torch.inference_mode():
        probs = model(x).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert top in IMAGENET_CATS, f"top-1 class {top} is not a cat"
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.5


def test_lite0_features_spec_records_weights_hash() -> None:
    """The default backbone taps strides 8 and 16 and records the package file's sha256."""
    bb = backbones.load_backbone()
    assert bb.strides == (8, 16) and bb.channels == (40, 112)
    assert bb.spec.weights_sha256 == sha256_file(backbones.lite0_weights_path())
    x = torch.zeros(1, 3, 64, 64)
    a, b = bb.module(x)
    assert a.shape[-1] == 8 and b.shape[-1] == 4


def test_remap_rejects_wrong_shapes() -> None:
    """A state dict whose tensor shapes do not fit timm's model is refused, naming the key."""
    src = torch.load(backbones.lite0_weights_path(), map_location="cpu", weights_only=True)
    src["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    target = backbones.create_features_model(backbones.LITE0, (2, 3))
    with pytest.raises(ConfigError, match="_conv_stem.weight"):
        backbones.remap_lite0_state_dict(src, target)


def test_wrn50_without_weights_names_what_is_missing() -> None:
    """WRN50 offline without --weights: ConfigError naming --weights and --allow-download."""
    with pytest.raises(ConfigError, match=r"--weights PATH.*--allow-download"):
        backbones.load_backbone(backbones.WRN50)


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    """A --weights path that does not exist is reported by name."""
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match="nope.safetensors"):
        backbones.load_backbone(backbones.WRN50, weights=missing)


def test_wrn50_from_local_safetensors(tmp_path: Path) -> None:
    """WRN50 layers 2+3 load from a local safetensors checkpoint; its sha256 is recorded."""
    from safetensors.torch import save_file

    ref = backbones.create_features_model(backbones.WRN50, (2, 3))
    path = tmp_path / "wrn50.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = backbones.load_backbone(backbones.WRN50, weights=path)
    assert bb.channels == (512, 1024) and bb.strides == (8, 16)
    assert bb.spec.weights_sha256 == sha256_file(path)
    w = bb.module.state_dict()["layer3.0.conv1.weight"]
    assert torch.equal(w, ref.state_dict()["layer3.0.conv1.weight"])


def test_unknown_backbone_is_a_config_error() -> None:
    """An unsupported backbone name fails with the list of choices."""
    with pytest.raises(ConfigError, match="choose one of"):
        backbones.load_backbone("resnet18")
