"""``pretrained`` backend: a local Stable Diffusion inpainting folder in three modes.

The pipeline (``diffusers.StableDiffusionInpaintPipeline``, Rombach et al. CVPR 2022) is
loaded from a local folder with ``local_files_only=True``: nothing is ever downloaded. It
works at the defect's scale: the window around the target mask is cropped, resized to the
model's ``resolution``, inpainted, resized back and composited with a mask feathered
*inside* the target, so every pixel outside the mask keeps the good image's exact value.

Modes (``resolve_mode`` picks the default: ``lora`` with >= 1 real NG where ``peft`` is
installed, else ``reference`` with >= 1 real NG, else ``prompt``):

- ``prompt`` (0 real NG): inpainted from pure noise under the prompt of the defect type.
- ``reference`` (1 real NG, training-free): the real NG the target was drawn from, moved
  by the very flip/rotation/scale its mask was re-placed with (a ``GuidedRequest``), or
  else the real NG of the type whose mask fits the target best, is painted under the
  target (``pretrained_reference``; the ``fewshot`` backend's init) and that init is noised
  and denoised inside the mask with ``strength`` < 1 (SDEdit), so its look carries over.
- ``lora`` (1-5 real NG, DefectFill-like): LoRA adapters trained on the real NG crops with
  the loss inside the mask (``pretrained_lora``), then sampled under the adapter's token
  prompt, from the reference init when ``lora_strength`` < 1.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ngcal.core.errors import ArtifactError, ConfigError

from .backend import Candidate, Reference, Request
from .fewshot import ZERO_NG_GROUP
from .pretrained_lora import LoraSettings, add_adapters, train_adapters
from .pretrained_reference import Guide, guide_for, reference_init
from .windows import blend_inside, feather, mask_window, take, take_mask

log = logging.getLogger(__name__)

Mode = Literal["prompt", "reference", "lora"]
MODES: tuple[str, ...] = ("auto", "prompt", "reference", "lora")
#: ``strength`` of each mode when the config leaves it unset (1.0: from pure noise)
DEFAULT_STRENGTH: dict[str, float] = {"prompt": 1.0, "reference": 0.6, "lora": 1.0}


def peft_available() -> bool:
    """Whether ``peft`` (the LoRA mode's dependency) is installed."""
    return importlib.util.find_spec("peft") is not None


def resolve_mode(requested: str, n_references: int, *, has_peft: bool | None = None) -> Mode:
    """The mode to run: ``requested`` checked against what is there, or for ``auto``,
    ``lora`` with >= 1 real NG and ``peft`` installed, else ``reference`` with >= 1 real
    NG, else ``prompt``."""
    peft = peft_available() if has_peft is None else has_peft
    if requested not in MODES:
        raise ConfigError(f"pretrained mode {requested!r}: not one of {', '.join(MODES)}")
    if requested == "auto":
        return "lora" if n_references and peft else "reference" if n_references else "prompt"
    if requested in ("reference", "lora") and not n_references:
        raise ConfigError(f"pretrained mode {requested!r} needs at least one real NG (--ng)")
    if requested == "lora" and not peft:
        raise ConfigError("pretrained mode 'lora' needs peft (pip install peft==0.21.0)")
    return requested  # type: ignore[return-value]


@dataclass(frozen=True)
class PretrainedConfig:
    """Where the local inpainting model is, which mode runs and how it is sampled."""

    model_path: str
    resolution: int = 512
    min_side: int = 64
    steps: int = 30
    guidance: float = 7.5
    prompt: str = "a {group} defect on the surface of an industrial part, close-up photo"
    negative_prompt: str = "clean, smooth, flawless"
    feather: int = 2
    seed: int = 0
    mode: str = "auto"
    strength: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"pretrained resolution {self.resolution} must be a multiple of 8")
        if self.steps < 1:
            raise ConfigError("pretrained steps must be >= 1")
        if self.mode not in MODES:
            raise ConfigError(f"pretrained mode {self.mode!r}: not one of {', '.join(MODES)}")
        if self.strength is not None and not (
            0.0 < self.strength <= 1.0 and int(self.steps * self.strength) >= 1
        ):
            raise ConfigError(
                f"pretrained strength {self.strength} must be in (0, 1] and leave at least "
                f"one of the {self.steps} steps (steps x strength >= 1)"
            )


class PretrainedBackend:
    """The ``pretrained`` backend (see the module docstring)."""

    name = "pretrained"

    def __init__(self, config: PretrainedConfig, *, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.pipe: object | None = None
        self.mode: Mode = "prompt"
        self.references: list[Reference] = []

    def _kind(self, group: str) -> str:
        return "surface" if group == ZERO_NG_GROUP else group.replace("_", " ")

    def prompt_for(self, group: str) -> str:
        """The prompt of a defect type (with the adapter's token in the ``lora`` mode)."""
        kind = self._kind(group)
        if self.mode == "lora":
            kind = f"{self.config.lora.token} {kind}"
        return self.config.prompt.format(group=kind)

    @property
    def strength(self) -> float:
        """The denoising strength of the running mode (1.0: from pure noise)."""
        if self.mode == "prompt":
            return 1.0
        s = self.config.strength
        return DEFAULT_STRENGTH[self.mode] if s is None else s

    def prepare(
        self, references: Sequence[Reference], goods: Sequence[np.ndarray], *, progress: bool
    ) -> dict[str, object]:
        """Resolve the mode, load the pipeline from the local folder (offline) and, in the
        ``lora`` mode, train the adapters on ``references``."""
        from diffusers import StableDiffusionInpaintPipeline

        c = self.config
        self.mode = resolve_mode(c.mode, len(references))
        self.references = list(references) if self.mode != "prompt" else []
        if self.mode != "prompt" and int(c.steps * self.strength) < 1:
            raise ConfigError(
                f"pretrained {self.mode}: steps {c.steps} x strength {self.strength} < 1"
            )
        path = Path(c.model_path)
        if not (path / "model_index.json").is_file():
            raise ArtifactError(
                f"--model-path {path}: no model_index.json (not a diffusers folder)"
            )
        t0 = time.perf_counter()
        half = self.device.type == "cuda" and self.mode != "lora"  # adapters train in fp32
        dtype = torch.float16 if half else torch.float32
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
        load_seconds = time.perf_counter() - t0
        lora_record: dict[str, object] | None = None
        if self.mode == "lora":
            add_adapters(pipe.unet, c.lora, c.seed)
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=not progress, desc=f"inpaint {self.mode}")
        if self.mode == "lora":
            groups = sorted({r.group for r in references})
            lora_record = train_adapters(
                pipe,
                references,
                {g: self.prompt_for(g) for g in groups},
                c.lora,
                resolution=c.resolution,
                min_side=c.min_side,
                seed=c.seed,
                progress=progress,
            )
        elif references and self.mode == "prompt":
            log.info(
                "pretrained backend: %d real NG given, used only as gate evidence", len(references)
            )
        self.pipe = pipe
        return {
            "backend": self.name,
            "config": asdict(c),
            "mode": self.mode,
            "mode_requested": c.mode,
            "strength": self.strength,
            "load_seconds": load_seconds,
            "train_seconds": float(lora_record["train_seconds"]) if lora_record else 0.0,  # type: ignore[arg-type]
            "lora": lora_record,
        }

    def training_crops(self) -> list[np.ndarray]:
        """The real NG crops the outputs come from (``reference``, ``lora``); none in the
        prompt-only mode."""
        c = self.config
        out = []
        for r in self.references:
            win = mask_window(r.mask, min_side=c.min_side)
            out.append(take(r.image, win, c.resolution))
        return out

    def _init(self, r: Request) -> tuple[np.ndarray, Guide | None]:
        """The image the request is denoised from and the real NG placed in it."""
        refs = [x for x in self.references if x.group == r.group]
        if self.strength >= 1.0 or not refs:
            return r.good, None
        guide = guide_for(r, refs)
        return reference_init(r, guide), guide

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
            init, placed = self._init(r)
            strength = self.strength if placed is not None else 1.0
            crop = take(init, win, c.resolution)
            cm = take_mask(r.target, win, c.resolution)
            alpha = feather(r.target, c.feather)
            prompt = self.prompt_for(r.group)
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
                    strength=strength,
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
                        record={
                            "window": win.as_list(),
                            "prompt": prompt,
                            "mode": self.mode,
                            "strength": strength,
                            "placement": placed.as_dict() if placed else None,
                        },
                    )
                )
            out.append(row)
        return out
