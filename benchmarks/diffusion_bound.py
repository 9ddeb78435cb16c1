"""How much of a real NG's PatchCore score its defect explains: the bound on diffusion NG's KS.

Usage::

    python benchmarks/diffusion_bound.py --data <category dir> --model <model dir> [--n 10]

Diffusion NG are painted on good training images, so their scores start from a good image's.
Per defect type, ``n`` real NG (seeded) are scored as they are and with the pixels under
their mask re-filled by a good image's, seamlessly cloned (``placement.clone``): what remains
is the score of the NG image without its defect. As a control, test good images get a real
mask re-filled the same way (the re-fill's own effect). When the real NG without their
defect still score well above good images, no defect painted on a good image reaches the
real NG's scores (the NG images differ from the good ones outside the defect). Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", type=int, default=10, help="real NG per defect type")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from ngcal.core.dataset import load_category
    from ngcal.core.images import load_mask, load_rgb, normalize, resize_rgb
    from ngcal.generation.diffusion.placement import clone
    from ngcal.patchcore.io import load_model

    torch.set_num_threads(1)
    loaded = load_model(args.model, device="cpu")
    spec = loaded.manifest.preprocessing
    size = int(spec.image_size)  # type: ignore[arg-type]
    cat = load_category(args.data)
    rng = np.random.default_rng(args.seed)
    donors = [resize_rgb(load_rgb(s.path), size) for s in cat.train[:8]]

    def score(images: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.stack([normalize(im, spec) for im in images]))
            out: np.ndarray = loaded.module.head(loaded.module.embed(x))[1].double().numpy()
        return out

    per_type: dict[str, Any] = {}
    masks_all = []
    for d in cat.defects:
        pool = [s for s in cat.test if s.label == 1 and s.defect == d and s.mask is not None]
        pick = [pool[int(i)] for i in rng.choice(len(pool), min(args.n, len(pool)), False)]
        real = [resize_rgb(load_rgb(s.path), size) for s in pick]
        masks = [load_mask(s.mask, size) for s in pick if s.mask is not None]
        masks_all += masks
        filled = [
            clone(r, donors[i % len(donors)], m)
            for i, (r, m) in enumerate(zip(real, masks, strict=True))
        ]
        a, b = score(real), score(filled)
        per_type[d] = {
            "n": len(pick),
            "median_real": float(np.median(a)),
            "median_defect_removed": float(np.median(b)),
            "median_defect_share": float(np.median(a - b)),
        }
        print(f"[bound] {d}: {per_type[d]}", file=sys.stderr, flush=True)
    goods = [s for s in cat.test if s.label == 0][: 2 * args.n]
    gi = [resize_rgb(load_rgb(s.path), size) for s in goods]
    gf = [
        clone(im, donors[i % len(donors)], masks_all[int(rng.integers(0, len(masks_all)))])
        for i, im in enumerate(gi)
    ]
    result = {
        "data": args.data.name,
        "model_sha256": loaded.sha256,
        "per_type": per_type,
        "median_test_good": float(np.median(score(gi))),
        "median_test_good_refilled": float(np.median(score(gf))),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
