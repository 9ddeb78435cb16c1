"""``pretrained`` backend: a local Stable Diffusion inpainting folder, prompt-only (0 real NG).

The pipeline (``diffusers.StableDiffusionInpaintPipeline``, Rombach et al. CVPR 2022) is
loaded from a local folder with ``local_files_only=True``: nothing is ever downloaded. It
works at the defect's scale: the window around the target mask is cropped, resized to the
model's ``resolution``, inpainted under the prompt of the defect type, resized back and
composited with a mask feathered *inside* the target, so every pixel outside the mask keeps
the good image's exact value. Reference-guided and LoRA modes (DefectFill, Song et al. CVPR
2025) are not implemented: with real NG, the ``fewshot`` backend learns from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ngcal.core.errors import ArtifactError, ConfigError

from .backend import Candidate, Reference, Request
from .fewshot import ZERO_NG_GROUP
from .windows import blend_inside, feather, mask_window, take, take_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainedConfig:
    """Where the local inpainting model is and how it is sampled."""

    model_path: str
    resolution: int = 512
    min_side: int = 64
    steps: int = 30
    guidance: float = 7.5
    prompt: str = "a {group} defect on the surface of an industrial part, close-up photo"
    negative_prompt: str = "clean, smooth, flawless"
    feather: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"pretrained resolution {self.resolution} must be a multiple of 8")
        if self.steps < 1:
            raise ConfigError("pretrained steps must be >= 1")


class PretrainedBackend:
    """The ``pretrained`` backend (see the module docstring)."""

    name = "pretrained"

    def __init__(self, config: PretrainedConfig, *, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.pipe: object | None = None

    def prepare(
        self, references: Sequence[Reference], goods: Sequence[np.ndarray], *, progress: bool
    ) -> dict[str, object]:
        """Load the pipeline from the local folder (offline); references are not used."""
        from diffusers import StableDiffusionInpaintPipeline

        path = Path(self.config.model_path)
        if not (path / "model_index.json").is_file():
            raise ArtifactError(
                f"--model-path {path}: no model_index.json (not a diffusers folder)"
            )
        t0 = time.perf_counter()
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(  # type: ignore[no-untyped-call]
                str(path),
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=dtype,
            )
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(
                f"--model-path {path}: cannot load the inpainting pipeline: {e}"
            ) from e
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=not progress, desc="inpaint")
        self.pipe = pipe
        if references:
            log.info(
                "pretrained backend: %d real NG given, used only as gate evidence", len(references)
            )
        return {
            "backend": self.name,
            "config": asdict(self.config),
            "mode": "prompt",
            "load_seconds": time.perf_counter() - t0,
            "train_seconds": 0.0,
        }

    def training_crops(self) -> list[np.ndarray]:
        """Nothing is learnt from the product's images in the prompt-only mode."""
        return []

    def generate(
        self, requests: Sequence[Request], *, candidates: int, progress: bool
    ) -> list[list[Candidate]]:
        """Inpaint each request's window ``candidates`` times (seeds ``seed + n``)."""
        from PIL import Image

        if self.pipe is None:
            raise ConfigError("pretrained: generate() before prepare()")
        c = self.config
        out: list[list[Candidate]] = []
        n = 0
        for r in requests:
            win = mask_window(r.target, min_side=c.min_side)
            crop = take(r.good, win, c.resolution)
            cm = take_mask(r.target, win, c.resolution)
            alpha = feather(r.target, c.feather)
            kind = "surface" if r.group == ZERO_NG_GROUP else r.group.replace("_", " ")
            prompt = c.prompt.format(group=kind)
            row = []
            for _ in range(candidates):
                gen = torch.Generator().manual_seed(c.seed + n)
                n += 1
                result = self.pipe(  # type: ignore[operator]
                    prompt=prompt,
                    negative_prompt=c.negative_prompt,
                    image=Image.fromarray(crop, mode="RGB"),
                    mask_image=Image.fromarray(cm.astype(np.uint8) * 255, mode="L"),
                    height=c.resolution,
                    width=c.resolution,
                    num_inference_steps=c.steps,
                    guidance_scale=c.guidance,
                    generator=gen,
                    output_type="np",
                )
                painted = (np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)
                row.append(
                    Candidate(
                        image=blend_inside(r.good, painted, win, alpha),
                        crop=painted,
                        crop_mask=cm,
                        record={"window": win.as_list(), "prompt": prompt},
                    )
                )
            out.append(row)
        return out
