"""``ngcal fit``: fit PatchCore on good images and write a model directory.

``--data`` is an MVTec-AD category (``train/good`` is used) or a plain folder of good
images. An unreadable training image stops the fit with an error naming the file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``ngcal fit``."""
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="category dir (MVTec layout) or folder of good images",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="model directory to write (replaced atomically)"
    )
    p.add_argument(
        "--backbone",
        default="tf_efficientnet_lite0",
        choices=["tf_efficientnet_lite0", "wide_resnet50_2"],
    )
    p.add_argument(
        "--weights",
        default=None,
        help="local backbone checkpoint (.safetensors or torch state dict)",
    )
    p.add_argument(
        "--allow-download",
        action="store_true",
        help="let timm download backbone weights (online only)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side in pixels, the long side with --aspect keep (default 256)",
    )
    p.add_argument(
        "--aspect",
        choices=["square", "keep"],
        default=None,
        help="input shape: square, or keep the training images' median aspect ratio "
        "(long side --image-size, sides multiples of 32); without it and --image-size, "
        "--auto chooses among 256 square and the aspect kept at 1x and 1.27x its pixels",
    )
    p.add_argument(
        "--coreset-ratio",
        type=float,
        default=0.01,
        help="memory bank rows / training patches (default 0.01)",
    )
    p.add_argument(
        "--coreset-dim",
        type=int,
        default=32,
        help="random projection dim for coreset selection (0: none)",
    )
    p.add_argument(
        "--projection-dim",
        type=int,
        default=0,
        help="project patch features to this dim (0: keep all)",
    )
    p.add_argument(
        "--image-score",
        "--rule",
        dest="image_score",
        default=None,
        choices=["auto", "topk_mean", "reweighted_max", "max"],
        help="image score rule ('auto': see --auto; default topk_mean when --image-size "
        "is given, else auto)",
    )
    p.add_argument("--topk", type=int, default=10, help="k of the topk_mean image score")
    p.add_argument(
        "--auto",
        action="store_true",
        help="choose the input geometry (without --image-size/--aspect), the part mask "
        "(see --foreground) and the image score rule from good images and synthetic NG "
        "only (the default when neither --image-size nor --image-score is given); prints "
        "the evidence tables on stderr",
    )
    p.add_argument(
        "--foreground",
        choices=["auto", "on", "off"],
        default=None,
        help="part mask over the patch grid, learnt from the good images (background "
        "patches do not count): 'auto' keeps it only when it separates held-out good "
        "from synthetic NG on the part better and covers 20-99%% of the frame (default "
        "with --auto), 'on' always, 'off' never (default otherwise)",
    )
    p.add_argument(
        "--cv-folds",
        type=int,
        default=5,
        help="cross-fitting folds for normal_holdout scores (0: off)",
    )
    p.add_argument(
        "--fold-sample",
        type=float,
        default=0.25,
        help="fraction of patches the fold coresets select from (1: all; default 0.25)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="fit on a seeded random subset of this many images",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Fit and print a one-line JSON summary."""
    import torch

    from ngcal.core.dataset import is_mvtec_category, list_images, load_category
    from ngcal.core.errors import ConfigError
    from ngcal.patchcore.fitting import FitConfig, fit
    from ngcal.patchcore.geometry import keep_aspect_hw, median_aspect
    from ngcal.patchcore.selection import Evidence, format_table

    torch.set_num_threads(max(1, args.threads))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available")
    root: Path = args.data
    if is_mvtec_category(root):
        samples = load_category(root).train
        paths = [s.path for s in samples]
        ids = [s.item_id for s in samples]
    else:
        paths = list_images(root)
        ids = [p.relative_to(root).as_posix() for p in paths]
    if args.max_images is not None and args.max_images < len(paths):
        if args.max_images < 1:
            raise ConfigError(f"--max-images {args.max_images}: must be >= 1")
        keep = sorted(random.Random(args.seed).sample(range(len(paths)), args.max_images))
        paths = [paths[i] for i in keep]
        ids = [ids[i] for i in keep]
    # --auto is the default when the user names neither the input size nor the rule
    image_score = args.image_score or "topk_mean"
    if args.auto or (args.image_score is None and args.image_size is None):
        image_score = "auto"
    foreground = args.foreground or ("auto" if image_score == "auto" else "off")
    size = args.image_size or 256
    geometry = "fixed"
    if image_score == "auto" and args.image_size is None and args.aspect is None:
        geometry = "auto"
    input_hw = None
    if args.aspect == "keep":
        input_hw = keep_aspect_hw(size, median_aspect(paths))
    cfg = FitConfig(
        backbone=args.backbone,
        weights=args.weights,
        allow_download=args.allow_download,
        image_size=size,
        input_hw=input_hw,
        coreset_ratio=args.coreset_ratio,
        coreset_proj_dim=args.coreset_dim or None,
        projection_dim=args.projection_dim or None,
        image_score=image_score,
        topk=args.topk,
        foreground=foreground,
        geometry=geometry,
        cv_folds=args.cv_folds,
        fold_sample=args.fold_sample,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    result = fit(paths, args.out, cfg, ids)
    spec = result.manifest.patchcore
    for choice in spec.choices:  # the evidence table; stdout stays one JSON line
        if choice.note is not None:
            print(f"{choice.setting}: {choice.chosen} kept ({choice.note})", file=sys.stderr)
            continue
        rows = [Evidence(**c.model_dump()) for c in choice.candidates]
        print(
            f"{choice.setting}: held-out good ({choice.n_normal}) vs synthetic NG "
            f"({choice.n_ng})\n{format_table(rows, choice.chosen)}",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "model": str(result.root),
                "train_images": spec.num_train_images,
                "memory_bank": [spec.coreset_size, spec.feature_dim],
                "image_score": spec.image_score,
                "image_score_k": spec.image_score_k,
                "input_hw": list(result.manifest.preprocessing.hw),
                "foreground": spec.foreground is not None,
                **{k: round(v, 2) for k, v in result.timings.items()},
            }
        )
    )
    return 0
