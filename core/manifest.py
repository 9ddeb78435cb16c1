"""Schemas of the model directory and the bundle, and their hash-verified load.

A model directory (written by ``ngcal fit``) and a bundle (written by ``ngcal export``)
are both a folder with ``manifest.json`` plus the files it lists, each with its sha256.
The manifest is written last, so a folder without one is incomplete by definition.

Layout of a model directory::

    manifest.json            ModelManifest
    backbone.safetensors     backbone weights (so a model dir loads without the weights package)
    memory_bank.npy          float32 [M, D]  coreset of locally aware patch features
    memory_bank_source.npy   int32 [M]       index of the training image each row came from
    projection.npy           float32 [C, D]  optional random projection (C = raw channels)
    scores/normal_loo.json   ScoreSet        leave-one-out scores of the training images
    scores/normal_holdout.json ScoreSet      K-fold cross-fitted scores of the training images
    scores/*.json            ScoreSet        other score sets (synthetic, real)
    thresholds.json          ThresholdFile   optional

A bundle adds ``model.onnx`` (and engines built on the device) and copies the score sets
and thresholds; see ``BundleManifest``.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ArtifactError
from .files import atomic_write_json, read_json, sha256_file
from .version import ngcal_version

MANIFEST_NAME = "manifest.json"
MODEL_SCHEMA: Final = "ngcal.model/1"
BUNDLE_SCHEMA: Final = "ngcal.bundle/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    """One file of an artifact folder: its sha256 and size in bytes."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Preprocessing(_Strict):
    """How an image becomes the model's input tensor; identical offline and on the edge.

    Steps: decode; grayscale or palette images are converted to RGB by replicating the
    luminance channel; resize to ``hw`` (``input_hw`` when set, else ``image_size`` x
    ``image_size``) with ``resample``; scale to [0, 1]; subtract ``mean`` and divide by
    ``std`` per channel; layout CHW float32. Manifests without ``input_hw`` (square inputs)
    read as before.
    """

    image_size: int = Field(
        ge=32, le=2048, description="square input side in pixels (the long side with input_hw)"
    )
    input_hw: tuple[int, int] | None = Field(
        default=None, description="input (height, width) in pixels when not square"
    )
    resample: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    grayscale: Literal["replicate"] = "replicate"

    @model_validator(mode="after")
    def _sides(self) -> Preprocessing:
        if self.input_hw is not None and not all(32 <= v <= 2048 for v in self.input_hw):
            raise ValueError(f"input_hw {self.input_hw}: each side must be in [32, 2048]")
        return self

    @property
    def hw(self) -> tuple[int, int]:
        """The model input's (height, width) in pixels."""
        return self.input_hw if self.input_hw is not None else (self.image_size, self.image_size)


class BackboneSpec(_Strict):
    """The feature extractor: timm name, layers taken, and which weights."""

    name: str = Field(description="timm model name, e.g. tf_efficientnet_lite0")
    layers: tuple[int, ...] = Field(description="timm features_only out_indices")
    weights: str = Field(description="where the weights came from: package, path or timm")
    weights_sha256: str = Field(description="sha256 of the weights file (or of the state dict)")


class CandidateEvidence(_Strict):
    """One candidate of a fit-time choice and its evidence (``ngcal.patchcore.selection``)."""

    candidate: str = Field(description="e.g. 'topk_mean_10' or '288x256'")
    separation: float = Field(description="AUROC, held-out good vs synthetic NG")
    tpr_at_p99: float = Field(description="synthetic NG share above the good scores' p99")
    ms_per_image: float | None = Field(default=None, description="fit-time scoring cost")
    beats_default: float | None = Field(
        default=None, description="share of bootstrap resamples separating better than the default"
    )


class FitChoice(_Strict):
    """A setting ``fit`` chose from good images and synthetic NG only, with the evidence."""

    setting: str = Field(description="what was chosen: 'image_score' or 'geometry'")
    chosen: str
    n_normal: int = Field(ge=0, description="held-out good images scored")
    n_ng: int = Field(ge=0, description="synthetic NG images scored")
    candidates: tuple[CandidateEvidence, ...] = ()
    note: str | None = Field(
        default=None, description="why a candidate was not compared (e.g. a degenerate mask)"
    )


class PatchCoreSpec(_Strict):
    """Hyper-parameters and sizes of a fitted PatchCore (Roth et al., CVPR 2022)."""

    feature_dim: int = Field(ge=1, description="D, dimension of memory bank rows")
    raw_feature_dim: int = Field(ge=1, description="channels before the optional projection")
    feature_map_size: tuple[int, int] = Field(description="patch grid (h, w) per image")
    neighbourhood: int = Field(default=3, ge=1, description="local aggregation window")
    coreset_ratio: float = Field(gt=0, le=1)
    coreset_size: int = Field(ge=1, description="M, rows of the memory bank")
    num_train_images: int = Field(ge=1)
    image_score: str = Field(description="image score rule, e.g. 'reweighted_max' or 'topk_mean'")
    image_score_k: int = Field(default=1, ge=1, description="k of the image score rule")
    reweight_neighbors: int = Field(default=9, ge=1, description="b of the paper's reweighting")
    smoothing_sigma: float = Field(default=4.0, ge=0, description="Gaussian sigma, input pixels")
    seed: int = 0
    choices: tuple[FitChoice, ...] = Field(
        default=(), description="settings chosen at fit time and their evidence"
    )
    foreground: str | None = Field(
        default=None,
        description="file of the part mask over the patch grid (float32 [h, w]: 1 part, 0 "
        "background; background patches do not count), or None: every patch counts",
    )
    stats: dict[str, float] = Field(
        default_factory=dict,
        description="fit-time statistics, e.g. loo_patch_nn_p50/p90/p99 (feature-space units)",
    )


class ModelManifest(_Strict):
    """``manifest.json`` of a model directory."""

    schema_: Literal["ngcal.model/1"] = Field(default=MODEL_SCHEMA, alias="schema")
    ngcal_version: str = Field(default_factory=ngcal_version)
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    backbone: BackboneSpec
    preprocessing: Preprocessing
    patchcore: PatchCoreSpec
    files: dict[str, FileEntry] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class BundleManifest(_Strict):
    """``manifest.json`` of an exported bundle (see ``ngcal.export``)."""

    schema_: Literal["ngcal.bundle/1"] = Field(default=BUNDLE_SCHEMA, alias="schema")
    ngcal_version: str = Field(default_factory=ngcal_version)
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    model_sha256: str = Field(description="sha256 of the source model's manifest.json")
    backbone: BackboneSpec
    preprocessing: Preprocessing
    patchcore: PatchCoreSpec
    onnx: str = Field(default="model.onnx", description="ONNX file inside the bundle")
    onnx_opset: int = 17
    outputs: tuple[str, ...] = ("anomaly_map", "image_score")
    precision: Literal["fp32", "fp16"] = "fp32"
    parity_max_abs_diff: float | None = Field(
        default=None, description="max |ORT - torch| image score at export time"
    )
    extra: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


AnyManifest = ModelManifest | BundleManifest


def hash_files(root: str | Path, names: list[str]) -> dict[str, FileEntry]:
    """sha256 and size of each named file under ``root`` (names are relative, '/'-separated)."""
    root = Path(root)
    out: dict[str, FileEntry] = {}
    for name in sorted(names):
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{p}: listed in the manifest but missing")
        out[name] = FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
    return out


def list_files(root: str | Path) -> list[str]:
    """Every regular file below ``root`` except the manifest and hidden temp files."""
    root = Path(root)
    names = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and not p.name.startswith("."):
            names.append(rel)
    return names


def write_manifest(
    root: str | Path, manifest: AnyManifest, names: list[str] | None = None
) -> AnyManifest:
    """Hash ``names`` (default: every file in ``root``) into ``manifest`` and write it last."""
    root = Path(root)
    files = hash_files(root, list_files(root) if names is None else names)
    final = manifest.model_copy(update={"files": files})
    atomic_write_json(root / MANIFEST_NAME, final.model_dump(mode="json", by_alias=True))
    return final


def read_manifest(root: str | Path, *, verify: bool = True) -> AnyManifest:
    """Read a model or bundle manifest; with ``verify``, check every listed file's sha256.

    Raises ArtifactError naming the folder, the file and the mismatch.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (expected a model dir or bundle)")
    if not path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST_NAME}; not a model dir or bundle, or incomplete")
    raw = read_json(path)
    schema = raw.get("schema") if isinstance(raw, dict) else None
    cls: type[ModelManifest] | type[BundleManifest]
    if schema == MODEL_SCHEMA:
        cls = ModelManifest
    elif schema == BUNDLE_SCHEMA:
        cls = BundleManifest
    else:
        raise ArtifactError(f"{path}: unknown schema {schema!r}")
    try:
        manifest = cls.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ArtifactError(f"{path}: field {loc!r}: {first['msg']}") from e
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: str | Path, manifest: AnyManifest) -> None:
    """Refuse a folder whose files do not match the manifest's sha256s."""
    root = Path(root)
    for name, entry in manifest.files.items():
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{root}: file {name!r} listed in the manifest is missing")
        if p.stat().st_size != entry.size:
            raise ArtifactError(
                f"{root}: file {name!r} has {p.stat().st_size} bytes, manifest says {entry.size}"
            )
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise ArtifactError(
                f"{root}: file {name!r} sha256 {digest[:12]}... does not match the manifest "
                f"({entry.sha256[:12]}...); refusing a modified or corrupt artifact"
            )


def manifest_sha256(root: str | Path) -> str:
    """sha256 of ``manifest.json``: the identity of a model or bundle."""
    return sha256_file(Path(root) / MANIFEST_NAME)
