"""GLASS on the part: synthetic NG scores of a part-masked model, drawn anywhere vs on the part.

On a procedural part on a cluttered belt (``detection_products.make_part_on_table``) a
model fitted with ``ngcal fit --foreground on`` ignores background patches, so a GLASS
anomaly drawn on the belt scores as good. This runs ``generate_glass`` on that model twice
with one seed, ``part_mask=False`` (anywhere, GLASS before decision 0203) and ``True`` (on
the part), and reports per set the median score and the share of synthetic NG above the
normal scores' 99th percentile (the model's ``normal_loo`` and ``normal_holdout`` pooled,
as calibrate pools them), and where the LAS masks fell: the share of masks with no pixel
on the part and the mean share of a mask's pixels on it. A GLASS output folder already
under ``--work`` is read back, not rerun. Reproduce (about 17 minutes on 2 CPU cores)::

    python benchmarks/glass_part.py --work runs/<you>/glass_part \\
        --save benchmarks/results/glass_part.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ngcal.core.scoresets import load_scoreset, load_scoresets
from ngcal.generation.glass import GlassOptions, generate_glass
from ngcal.generation.perlin import cells_to_pixels

sys.path.insert(0, str(Path(__file__).parent))
from detection_products import make_part_on_table  # noqa: E402


def _stats(scores: np.ndarray, p99: float) -> dict[str, float]:
    return {
        "median": float(np.median(scores)),
        "above_normal_p99": float(np.mean(scores > p99)),
    }


def image_side(out: Path) -> int:
    """The side of the LAS images under ``out``."""
    with Image.open(out / "las" / "images" / "0000.png") as im:
        return int(im.size[0])


def _las_placement(out: Path, part: np.ndarray) -> dict[str, float]:
    """Where the LAS masks under ``out/las`` lie relative to ``part`` (bool [S, S])."""
    rows = json.loads((out / "las" / "index.json").read_text())["items"]
    on = []
    for row in rows:
        with Image.open(out / "las" / row["mask"]) as im:
            m = np.asarray(im) > 127
        on.append(float((m & part).sum() / max(int(m.sum()), 1)))
    return {
        "masks_off_part": float(np.mean(np.asarray(on) == 0.0)),
        "mean_share_on_part": float(np.mean(on)),
    }


def main() -> None:
    """Fit (unless present), run GLASS both ways, print and save the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="folder for data, model and GLASS runs")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="GLASS seed")
    ap.add_argument("--data-seed", type=int, default=0, help="table product seed")
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    data, model = work / "table", work / "model_on"
    if not data.is_dir():
        make_part_on_table(data, seed=args.data_seed)
    if not (model / "manifest.json").is_file():
        cmd = ["ngcal", "fit", "--data", str(data), "--out", str(model), "--image-size", "256",
               "--foreground", "on", "--quiet"]  # fmt: skip
        subprocess.run(cmd, check=True)
    normal = np.concatenate(
        [
            load_scoreset(model / "scores" / f"{n}.json").scores
            for n in ("normal_loo", "normal_holdout")
        ]
    )
    p99 = float(np.quantile(normal, 0.99))
    result: dict[str, object] = {
        "product": f"make_part_on_table(seed={args.data_seed})",
        "fit": "ngcal fit --image-size 256 --foreground on",
        "glass": {"count": args.count, "seed": args.seed},
        "normal": {"n": int(normal.size), "median": float(np.median(normal)), "p99": p99},
    }
    grid = np.load(model / "foreground.npy") > 0.5
    for name, on_part in (("anywhere", False), ("on_part", True)):
        out = work / f"glass_{name}"
        if not (out / "glass_run.json").is_file():
            opts = GlassOptions(count=args.count, seed=args.seed, part_mask=on_part, device="cpu")
            generate_glass(model, data, out, opts, progress=False)
        run = json.loads((out / "glass_run.json").read_text())
        loaded = load_scoresets([out / "scores"])
        feature = sorted((s for s in loaded if s.severity is not None), key=lambda s: s.severity)
        image = next(s for s in loaded if s.source == "glass_image")
        sets = {f"feature_s{s.severity:g}": _stats(s.scores, p99) for s in feature}
        sets["image"] = _stats(image.scores, p99)
        sets["feature_pooled"] = _stats(np.concatenate([s.scores for s in feature]), p99)
        side = image_side(out)
        result[name] = {
            "sets": sets,
            "las": _las_placement(out, cells_to_pixels(grid, (side, side))),
            "part_mask": run["part_mask"],
        }
    print(json.dumps(result, indent=1))
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
