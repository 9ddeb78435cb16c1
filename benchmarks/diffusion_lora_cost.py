"""Cost of the ``pretrained`` backend's LoRA mode on this machine, without any weights.

Builds a UNet with the architecture of Stable Diffusion 2 inpainting (randomly initialised:
no checkpoint is on this machine and none may be downloaded), adds the LoRA adapters the
``lora`` mode trains (``ngcal.generation.diffusion.pretrained_lora``), counts trainable and
frozen parameters, and times training steps (forward, masked loss, backward, AdamW) on the
given device at the given resolution. Quality needs real weights and is not measured here.

    python benchmarks/diffusion_lora_cost.py [--resolution 256] [--steps 2] [--device cpu]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ngcal.generation.diffusion.pretrained_lora import (
    LoraSettings,
    add_adapters,
    masked_diffusion_loss,
)

#: Stable Diffusion 2 inpainting's UNet (its published unet/config.json fields)
SD2_INPAINT_UNET = dict(
    sample_size=64,
    in_channels=9,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=256, help="image side (latent = /8)")
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (after one warm-up)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_INPAINT_UNET)  # type: ignore[arg-type]
    trainable = add_adapters(unet, LoraSettings(rank=args.rank, alpha=args.rank), seed=0)
    total = sum(p.numel() for p in unet.parameters())
    unet.to(args.device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    s = args.resolution // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, s, s, generator=gen).to(args.device)
    text = torch.randn(1, 77, 1024, generator=gen).to(args.device)
    noise = torch.randn(1, 4, s, s, generator=gen).to(args.device)
    mask = torch.zeros(1, 1, s, s, device=args.device)
    mask[..., s // 3 : s // 2, s // 4 : s // 2] = 1.0
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        pred = unet(x, torch.tensor([500], device=args.device), text).sample
        loss = masked_diffusion_loss(pred, noise, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    step = sum(times) / len(times)
    print(
        json.dumps(
            {
                "architecture": "SD2-inpainting UNet (random init)",
                "resolution": args.resolution,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "rank": args.rank,
                "trainable_params": trainable,
                "total_params": total,
                "trainable_fraction": trainable / total,
                "seconds_per_step": step,
                "seconds_for_400_steps": 400 * step,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
