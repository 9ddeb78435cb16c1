"""``ngcal generate <generator>``: synthesise NG evidence for calibration.

Each generator is a sub-sub-command with its own ``add_<name>_arguments`` and ``run_<name>``
listed in ``GENERATORS``: ``glass`` (feature- and image-space anomalies,
``ngcal.generation.glass``) and ``diffusion`` (defects painted by a diffusion model from zero to
a few real NG, ``ngcal.generation.diffusion``).
Only stdlib at module top; the generation package (torch) is imported inside ``run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ngcal.core.errors import ConfigError


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from e
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def _add_inputs(p: argparse.ArgumentParser, out_help: str) -> None:
    """``--model``, ``--data`` and ``--out``, which every generator takes."""
    p.add_argument("--model", required=True, help="fitted model directory (ngcal fit)")
    p.add_argument("--data", required=True, help="category folder (MVTec layout, train/good)")
    p.add_argument("--out", required=True, help=out_help)


def add_glass_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ngcal generate glass``."""
    _add_inputs(p, "output folder (score sets, LAS images, sheet)")
    p.add_argument(
        "--severities",
        type=_floats,
        default=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
        help="GAS severities s: features sit s..2s leave-one-out NN distances from normal "
        "(default 0.25,0.5,0.75,1,1.5,2,3)",
    )
    p.add_argument("--count", type=int, default=64, help="items per severity and LAS images")
    p.add_argument("--seed", type=int, default=0, help="random seed (outputs are deterministic)")
    p.add_argument("--epochs", type=int, default=10, help="discriminator epochs (GLASS: 640)")
    p.add_argument(
        "--variant",
        choices=("manifold", "hypersphere"),
        default="manifold",
        help="GAS truncation anchor: source feature or class centre",
    )
    p.add_argument(
        "--pool-images",
        type=int,
        default=16,
        help="training images whose features train the discriminator",
    )
    p.add_argument("--hidden", type=int, default=1024, help="discriminator hidden width")
    p.add_argument("--textures", default=None, help="folder of texture images for LAS")
    p.add_argument(
        "--foreground", action="store_true", help="restrict anomalies to an Otsu foreground mask"
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="fixed LAS blend (share of the original kept); default GLASS's random",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run_glass(args: argparse.Namespace) -> int:
    """Run GLASS and print where the outputs went."""
    import torch

    from ngcal.generation.glass import GlassOptions, generate_glass

    if args.device != "cuda":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        raise ConfigError(f"--beta {args.beta} is outside [0, 1]")
    options = GlassOptions(
        severities=tuple(args.severities),
        count=args.count,
        seed=args.seed,
        epochs=args.epochs,
        variant=args.variant,
        pool_images=args.pool_images,
        hidden=args.hidden,
        textures=args.textures,
        foreground=args.foreground,
        beta=args.beta,
        device=args.device,
    )
    result = generate_glass(args.model, args.data, args.out, options, progress=not args.no_progress)
    for s in result.feature_sets:
        print(
            f"glass_feature severity {s.severity:g}: {len(s)} items, "
            f"median score {float(_median(s.scores)):.4f}"
        )
    print(
        f"glass_image: {len(result.image_set)} items, "
        f"median score {float(_median(result.image_set.scores)):.4f}"
    )
    print(f"wrote {result.out} (contact sheet {result.contact_sheet})")
    return 0


def add_diffusion_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ngcal generate diffusion``."""
    _add_inputs(p, "output folder (score set, images, index, sheet)")
    p.add_argument(
        "--ng",
        action="append",
        default=[],
        metavar="DIR",
        help="real NG with masks: an MVTec test/<type> folder (masks in ground_truth/<type>), "
        "a folder of x.png + x_mask.png, or a folder of such folders; repeatable; "
        "none: the zero-NG mode",
    )
    p.add_argument("--count", type=int, default=32, help="target masks (one kept NG each at most)")
    p.add_argument("--candidates", type=int, default=2, help="candidates per target mask")
    p.add_argument("--backend", choices=("fewshot", "pretrained"), default="fewshot")
    p.add_argument(
        "--model-path", default=None, help="local Stable Diffusion inpainting folder (pretrained)"
    )
    p.add_argument("--train-steps", type=int, default=None, help="fewshot training steps")
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="fewshot: start from the re-placed real defect noised to this fraction of the "
        "schedule (SDEdit; 1 = from pure noise; default 0.6)",
    )
    p.add_argument(
        "--sd-resolution", type=int, default=512, help="pretrained: inpainting size in pixels"
    )
    p.add_argument("--sd-steps", type=int, default=30, help="pretrained: inference steps")
    p.add_argument(
        "--mode",
        choices=("auto", "prompt", "reference", "lora"),
        default="auto",
        help="pretrained: prompt only, reference-guided (training-free) or a LoRA fine-tune on "
        "the real NG; auto: lora with >= 1 real NG where peft is installed, else reference, "
        "else prompt",
    )
    p.add_argument(
        "--sd-strength",
        type=float,
        default=None,
        help="pretrained reference/lora: denoising strength from the re-placed real defect "
        "(< 1 keeps its look; default 0.6 reference, 1.0 lora)",
    )
    p.add_argument("--lora-steps", type=int, default=None, help="pretrained lora: steps (400)")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (CPU outputs are deterministic)"
    )
    p.add_argument(
        "--foreground", action="store_true", help="place target masks on an Otsu foreground"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run_diffusion(args: argparse.Namespace) -> int:
    """Run the diffusion generator and print where the outputs went."""
    import dataclasses

    import torch

    from ngcal.generation.diffusion.fewshot import FewShotConfig
    from ngcal.generation.diffusion.run import DiffusionOptions, generate_diffusion

    if args.device != "cuda":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    fewshot = FewShotConfig(seed=args.seed)
    if args.train_steps is not None:
        fewshot = dataclasses.replace(fewshot, train_steps=args.train_steps)
    if args.strength is not None:
        fewshot = dataclasses.replace(fewshot, strength=args.strength)
    options = DiffusionOptions(
        count=args.count,
        candidates=args.candidates,
        backend=args.backend,
        model_path=args.model_path,
        ng=tuple(args.ng),
        seed=args.seed,
        device=args.device,
        foreground=args.foreground,
        sd_resolution=args.sd_resolution,
        sd_steps=args.sd_steps,
        sd_mode=args.mode,
        sd_strength=args.sd_strength,
        lora_steps=args.lora_steps,
        fewshot=fewshot,
    )
    result = generate_diffusion(
        args.model, args.data, args.out, options, progress=not args.no_progress
    )
    s = result.summary
    rate = result.scoreset.meta["acceptance_rate"]
    print(
        f"diffusion: {s['kept']} of {s['targets']} targets kept (acceptance {rate:.2f}), "
        f"{s['candidates']} candidates, "
        f"failed checks {s['failed_checks']}"
    )
    backend = s["backend"]
    if isinstance(backend, dict) and backend.get("mode"):
        print(f"pretrained mode {backend['mode']} (requested {args.mode})")
    if len(result.scoreset):
        print(f"median score {_median(result.scoreset.scores):.4f}")
    print(f"wrote {result.out} (contact sheet {result.contact_sheet})")
    return 0


def _median(x: object) -> float:
    import numpy as np

    return float(np.median(np.asarray(x)))


#: generator -> (help, add_arguments, run)
GENERATORS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "glass": (
        "GLASS: feature-space (GAS) and image-space (LAS) anomalies scored by the model",
        add_glass_arguments,
        run_glass,
    ),
    "diffusion": (
        "diffusion: defects painted by a diffusion model from zero to a few real NG, gated",
        add_diffusion_arguments,
        run_diffusion,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per generator."""
    sub = parser.add_subparsers(dest="generator", metavar="GENERATOR", required=True)
    for name, (help_text, add, run_fn) in GENERATORS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_generate=run_fn)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen generator."""
    fn: Callable[[argparse.Namespace], int] = args._generate
    rc = fn(args)
    sys.stdout.flush()
    return rc
