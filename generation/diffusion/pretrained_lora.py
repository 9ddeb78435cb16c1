"""LoRA fine-tune of a Stable Diffusion inpainting UNet on the few real NG (DefectFill-like).

DefectFill (Song et al. CVPR 2025) fine-tunes an inpainting model on a few reference
defects with LoRA and a loss concentrated inside the defect mask, so a fixed token comes to
mean "this defect" and the model fills any mask with it. Here: ``peft`` LoRA adapters on the
UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``; the base UNet,
VAE and text encoder stay frozen), trained on crops around the real NG masks (random scale,
shift, flip and rotation by k x 90 degrees) with the inpainting input the pipeline uses at
sampling time (noisy latents, the mask at latent size, the latents of the image with the
mask blanked) and the prompt ``"... <token> <group> ..."``. The loss (``masked_diffusion_loss``)
is the noise-prediction error averaged inside the mask, plus a smaller whole-image term in
which the background weighs ``alpha`` (DefectFill's defect and object terms, in one pass).
Deterministic for a seed on CPU.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ngcal.core.errors import ConfigError

from .backend import Reference
from .pretrained_reference import DIHEDRAL, dihedral
from .windows import mask_window, take, take_mask

#: the attention projections of diffusers' ``Attention`` blocks that carry adapters
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSettings:
    """How the adapters are shaped and trained."""

    rank: int = 8
    alpha: int = 8
    steps: int = 400
    batch: int = 2
    lr: float = 1e-4
    defect_weight: float = 1.0
    object_weight: float = 0.3
    background: float = 0.3
    token: str = "sks"

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.batch < 1:
            raise ConfigError(
                f"lora rank {self.rank}, steps {self.steps} and batch {self.batch} must be >= 1"
            )
        if not 0.0 <= self.background <= 1.0:
            raise ConfigError(f"lora background weight {self.background} must be in [0, 1]")


def masked_diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    defect_weight: float = 1.0,
    object_weight: float = 0.3,
    background: float = 0.3,
) -> torch.Tensor:
    """Scalar loss of a noise (or velocity) prediction ``pred`` against ``target``.

    ``pred``, ``target``: float [B, C, h, w]; ``mask``: float [B, 1, h, w] in [0, 1] (the
    defect at latent size, area-averaged). The defect term is the squared error averaged over
    the mask (per image, then over the batch; an image with an empty mask adds 0); the object
    term is the squared error over the whole image with the background weighted
    ``background`` and the mask 1. Loss = ``defect_weight * defect + object_weight * object``.
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)
    m = mask.float()
    inside = (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    whole = (err * (m + background * (1.0 - m))).mean(dim=(1, 2, 3))
    return defect_weight * inside.mean() + object_weight * whole.mean()


def add_adapters(unet: torch.nn.Module, settings: LoraSettings, seed: int) -> int:
    """Freeze ``unet`` and add LoRA adapters (seeded init); returns the trainable count."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=0.0,
        init_lora_weights=True,
        target_modules=list(TARGET_MODULES),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)  # type: ignore[operator]
    n = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if n == 0:
        raise ConfigError("LoRA: the UNet has no attention projection to adapt")
    return n


def adapter_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights (name -> CPU copy)."""
    return {n: p.detach().float().cpu().clone() for n, p in unet.named_parameters() if "lora_" in n}


def adapter_sha256(unet: torch.nn.Module) -> str:
    """sha256 of the LoRA weights (names and float32 bytes, sorted by name)."""
    h = hashlib.sha256()
    for n, t in sorted(adapter_state(unet).items()):
        h.update(n.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _to_tensor(crop: np.ndarray) -> torch.Tensor:
    """uint8 RGB [C, C, 3] -> float [3, C, C] in [-1, 1]."""
    return torch.from_numpy(crop.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def _example(
    ref: Reference, rng: np.random.Generator, resolution: int, min_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented crop of a real NG ([3, R, R] in [-1, 1]) and its mask ([1, R, R])."""
    win = mask_window(
        ref.mask,
        min_side=min_side,
        scale=float(rng.uniform(1.0, 1.5)),
        shift=(float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.15, 0.15))),
    )
    crop = take(ref.image, win, resolution)
    cm = take_mask(ref.mask, win, resolution)
    flip, k = DIHEDRAL[int(rng.integers(0, len(DIHEDRAL)))]
    crop, cm = dihedral(crop, flip, k), dihedral(cm, flip, k)
    return _to_tensor(crop), torch.from_numpy(cm.astype(np.float32))[None]


def _encode(vae: Any, x: torch.Tensor) -> torch.Tensor:
    """Scaled latents (the latent distribution's mode) of images in [-1, 1]."""
    latents: torch.Tensor = vae.encode(x).latent_dist.mode()
    return latents * float(vae.config.scaling_factor)


def train_adapters(
    pipe: Any,
    references: Sequence[Reference],
    prompts: dict[str, str],
    settings: LoraSettings,
    *,
    resolution: int,
    min_side: int,
    seed: int,
    progress: bool,
) -> dict[str, object]:
    """Train the UNet's adapters (added by ``add_adapters``) on ``references``.

    ``prompts`` maps each reference group to its training prompt (with the token). Returns
    a JSON-able record: steps, losses, seconds, trainable and frozen counts, adapter sha256.
    """
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    if not references:
        raise ConfigError("LoRA training needs at least one real NG (--ng)")
    unet, vae = pipe.unet, pipe.vae
    device = next(unet.parameters()).device
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("LoRA training: no adapter (add_adapters first)")
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)  # type: ignore[no-untyped-call]
    n_train = int(noise_sched.config.num_train_timesteps)
    v_pred = noise_sched.config.prediction_type == "v_prediction"
    with torch.no_grad():
        embeds = {}
        for g, text in prompts.items():
            ids = pipe.tokenizer(
                text,
                padding="max_length",
                max_length=pipe.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds[g] = pipe.text_encoder(ids.to(device))[0]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    unet.train()
    for _ in tqdm(range(settings.steps), desc="lora", disable=not progress, mininterval=1.0):
        picks = [references[int(i)] for i in rng.integers(0, len(references), settings.batch)]
        xs, ms = zip(*(_example(r, rng, resolution, min_side) for r in picks), strict=True)
        x = torch.stack(xs).to(device)
        m = torch.stack(ms).to(device)
        with torch.no_grad():
            latents = _encode(vae, x)
            masked = _encode(vae, x * (m < 0.5))
            hw = latents.shape[-2:]
            cond_mask = F.interpolate(m, size=hw)
            weight = F.interpolate(m, size=hw, mode="area")
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, n_train, (len(picks),), generator=gen).to(device)
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise_sched.get_velocity(latents, noise, t) if v_pred else noise
        cond = torch.cat([embeds[r.group] for r in picks])
        pred = unet(torch.cat([noisy, cond_mask, masked], dim=1), t, cond).sample
        loss = masked_diffusion_loss(
            pred,
            target,
            weight,
            defect_weight=settings.defect_weight,
            object_weight=settings.object_weight,
            background=settings.background,
        )
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ConfigError(f"LoRA training diverged (loss {value}); lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(value)
    unet.eval()
    unet.requires_grad_(False)
    tail = max(1, len(losses) // 10)
    return {
        "steps": settings.steps,
        "rank": settings.rank,
        "alpha": settings.alpha,
        "lr": settings.lr,
        "batch": settings.batch,
        "token": settings.token,
        "target_modules": list(TARGET_MODULES),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params": sum(p.numel() for p in unet.parameters()) - sum(p.numel() for p in params),
        "loss_first": float(np.mean(losses[:tail])),
        "loss_last": float(np.mean(losses[-tail:])),
        "train_seconds": time.perf_counter() - t0,
        "adapter_sha256": adapter_sha256(unet),
        "prompts": dict(prompts),
    }
