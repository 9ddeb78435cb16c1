"""``fewshot`` backend: a tiny mask-conditioned pixel diffusion model trained on the real NG.

The model is a ``diffusers.UNet2DModel`` trained from scratch, in pixel space, on crops
around the 1-5 real NG masks of each defect type (windows jittered in scale and position,
flips and half turns, which keep the product's axes and so its texture's direction, a
small brightness jitter). Its input is
the noisy crop, the mask and the background outside the mask (7 channels), with the defect
type as class label, so it learns to draw *this* line's defect along *a given* mask shape in
*a given* context (mask conditioning as in the inpainting models of AnomalyDiffusion and
DefectFill; an unconditional DDPM with RePaint tends to ignore the mask's shape). The loss is
the usual noise-prediction MSE (Ho et al. 2020), weighted up inside the mask as DefectFill's
defect loss does. Sampling is DDIM (Song et al. 2021) with the known background re-noised
into the outside of the mask at every step (RePaint, Lugmayr et al. 2022); the painted window
is composited back inside the target mask only.

Zero real NG: the same model is trained on good crops under Perlin masks (it learns the good
texture) and sampled stochastically with inflated noise, RealNet's strength-controlled
anomaly synthesis (Zhang et al., CVPR 2024): the larger ``strength``, the further the painted
region departs from the good distribution.

CPU runs are deterministic for a seed (every random draw comes from seeded generators).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ngcal.core.errors import ConfigError

from ..perlin import perlin_mask
from .backend import Candidate, Reference, Request
from .placement import reference_composite
from .windows import Window, mask_window, paste, take, take_mask

log = logging.getLogger(__name__)

ZERO_NG_GROUP = "perlin"


@dataclass(frozen=True)
class FewShotConfig:
    """Size and schedule of the ``fewshot`` model (defaults fit a CPU in minutes)."""

    crop: int = 32
    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    train_steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    mask_loss_weight: float = 4.0
    sample_steps: int = 25
    train_timesteps: int = 1000
    zero_ng_strength: float = 1.6
    strength: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop < 8 or self.crop % (2 ** (len(self.channels) - 1)):
            raise ConfigError(f"fewshot crop {self.crop} must be >= 8 and divisible by the UNet")
        if min(self.train_steps, self.batch_size, self.sample_steps) < 1:
            raise ConfigError("fewshot train_steps, batch_size and sample_steps must be >= 1")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"fewshot strength {self.strength} must be in (0, 1]")


def _to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]."""
    out: np.ndarray = np.moveaxis(x.astype(np.float32) / 127.5 - 1.0, -1, -3)
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    out: np.ndarray = np.moveaxis(arr, 1, -1)
    return out


def _is_grey(rgb: np.ndarray) -> bool:
    """True when the three channels of a uint8 RGB image are equal (a grey product)."""
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations of an [H, W, ...] array."""
    if k >= 4:
        a = a[:, ::-1]
    return np.ascontiguousarray(np.rot90(a, k % 4))


class FewShotBackend:
    """The ``fewshot`` backend (see the module docstring)."""

    name = "fewshot"

    def __init__(self, config: FewShotConfig = FewShotConfig(), *, device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.groups: list[str] = []
        self.refs: list[Reference] = []
        self.goods: list[np.ndarray] = []
        self.unet: torch.nn.Module | None = None
        self._crops: list[np.ndarray] = []
        self.grey = False

    # ------------------------------------------------------------------ training
    def _model(self) -> torch.nn.Module:
        from diffusers import UNet2DModel

        c = self.config
        n = len(c.channels)
        unet: torch.nn.Module = UNet2DModel(  # type: ignore[no-untyped-call, assignment]
            sample_size=c.crop,
            in_channels=7,
            out_channels=3,
            block_out_channels=c.channels,
            layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            norm_num_groups=8,
            num_class_embeds=max(len(self.groups), 1),
        )
        return unet

    def _scheduler(self) -> object:
        from diffusers import DDIMScheduler

        return DDIMScheduler(  # type: ignore[no-untyped-call]
            num_train_timesteps=self.config.train_timesteps,
            beta_schedule="squaredcos_cap_v2",
            clip_sample=True,
        )

    def _example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One augmented training crop: uint8 [C, C, 3], bool mask [C, C], class index."""
        c = self.config.crop
        if self.refs:
            ref = self.refs[int(rng.integers(0, len(self.refs)))]
            win = mask_window(
                ref.mask,
                min_side=c,
                scale=float(rng.uniform(0.85, 1.25)),
                shift=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
            )
            img, m, cls = (
                take(ref.image, win, c),
                take_mask(ref.mask, win, c),
                self.groups.index(ref.group),
            )
        else:
            good = self.goods[int(rng.integers(0, len(self.goods)))]
            h, w = good.shape[:2]
            side = int(min(rng.integers(c, 3 * c + 1), h, w))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            img = take(good, Window(y, x, side), c)
            m, cls = perlin_mask((c, c), (1, 1), rng).pixels, 0
        k = 2 * int(rng.integers(0, 4))  # flips and half turns: the product's axes kept
        img = np.clip(_dihedral(img, k).astype(np.float32) * rng.uniform(0.9, 1.1), 0, 255)
        return img.astype(np.uint8), _dihedral(m, k), cls

    def prepare(
        self, references: Sequence[Reference], goods: Sequence[np.ndarray], *, progress: bool
    ) -> dict[str, object]:
        """Train the model on the references' crops (or good crops in the zero-NG mode)."""
        from tqdm import tqdm

        c = self.config
        self.refs = list(references)
        self.goods = list(goods)
        if not self.refs and not self.goods:
            raise ConfigError("fewshot: neither real NG nor good images to train on")
        self.groups = sorted({r.group for r in self.refs}) or [ZERO_NG_GROUP]
        self.grey = all(_is_grey(x) for x in [r.image for r in self.refs] + self.goods)
        self._crops = [
            take(r.image, mask_window(r.mask, min_side=c.crop), c.crop) for r in self.refs
        ]
        rng = np.random.default_rng([c.seed, 1])
        tgen = torch.Generator().manual_seed(c.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            unet = self._model().to(self.device)
        sched = self._scheduler()
        alphas = sched.alphas_cumprod.to(self.device)  # type: ignore[attr-defined]
        opt = torch.optim.AdamW(unet.parameters(), lr=c.lr)
        lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.train_steps)
        t0 = time.perf_counter()
        losses = []
        unet.train()
        for _ in tqdm(
            range(c.train_steps), desc="fewshot train", disable=not progress, mininterval=1.0
        ):
            batch = [self._example(rng) for _ in range(c.batch_size)]
            x0 = torch.from_numpy(_to_unit(np.stack([b[0] for b in batch]))).to(self.device)
            m = torch.from_numpy(np.stack([b[1] for b in batch])[:, None].astype(np.float32))
            m = m.to(self.device)
            cls = torch.tensor([b[2] for b in batch], device=self.device)
            t = torch.randint(0, c.train_timesteps, (c.batch_size,), generator=tgen).to(self.device)
            noise = torch.randn(x0.shape, generator=tgen).to(self.device)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            inp = torch.cat([xt, m, x0 * (1 - m)], dim=1)
            pred = unet(inp, t, class_labels=cls).sample
            weight = 1.0 + c.mask_loss_weight * m
            loss = (weight * (pred - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr.step()
            losses.append(float(loss.detach()))
        unet.eval()
        self.unet = unet
        seconds = time.perf_counter() - t0
        tail = max(1, len(losses) // 10)
        return {
            "backend": self.name,
            "config": asdict(c),
            "groups": self.groups,
            "zero_ng": not self.refs,
            "train_examples": len(self.refs) or len(self.goods),
            "train_seconds": seconds,
            "loss_first": float(np.mean(losses[:tail])),
            "loss_last": float(np.mean(losses[-tail:])),
        }

    def training_crops(self) -> list[np.ndarray]:
        """The references' crops at working size (none in the zero-NG mode)."""
        return list(self._crops)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def _sample(
        self,
        bg: torch.Tensor,
        m: torch.Tensor,
        cls: torch.Tensor,
        gen: torch.Generator,
        *,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """DDIM inside ``m`` with the known ``bg`` re-noised outside; returns x0 [B, 3, C, C].

        ``strength`` < 1 (reference-guided, SDEdit): the chain starts at that fraction of the
        schedule from ``bg`` itself noised (``bg`` then holds the reference composite inside
        ``m``), so the result keeps the composite's layout and contrast and the model only
        re-draws what that much noise hides. 1: from pure noise.
        """
        if self.unet is None:
            raise ConfigError("fewshot: generate() before prepare()")
        c = self.config
        zero_ng = not self.refs
        inflate = c.zero_ng_strength if zero_ng else 1.0
        eta = 1.0 if zero_ng else 0.0
        sched = self._scheduler()
        sched.set_timesteps(c.sample_steps)  # type: ignore[attr-defined]
        steps: torch.Tensor = sched.timesteps  # type: ignore[attr-defined]
        first = len(steps) - max(1, round(strength * len(steps)))
        steps = steps[first:]
        noise = (torch.randn(bg.shape, generator=gen) * inflate).to(self.device)
        # from pure noise, or (SDEdit) from the start image noised to the first step
        x = noise if first == 0 else sched.add_noise(bg, noise, steps[:1])  # type: ignore[attr-defined]
        for i, t in enumerate(steps):
            eps = self.unet(torch.cat([x, m, bg * (1 - m)], dim=1), t, class_labels=cls).sample
            vn = (torch.randn(bg.shape, generator=gen) * inflate).to(self.device)
            x = sched.step(eps, t, x, eta=eta, variance_noise=vn).prev_sample  # type: ignore[attr-defined]
            if i + 1 < len(steps):
                known = sched.add_noise(  # type: ignore[attr-defined]
                    bg, torch.randn(bg.shape, generator=gen).to(self.device), steps[i + 1 : i + 2]
                )
            else:
                known = bg
            x = m * x + (1 - m) * known
        return x

    def _start(self, r: Request) -> tuple[np.ndarray, float, dict[str, object]]:
        """The image a request's chain starts from, its strength and the guide's record: the
        reference composite (``placement``) for a guided request of a trained group, else the
        good image from pure noise."""
        ref = getattr(r, "reference", None)
        p = getattr(r, "placement", None)
        if ref is None or p is None or not self.refs or self.config.strength >= 1.0:
            return r.good, 1.0, {"guided": False}
        rec = {"guided": True, "reference": ref.item_id, "placement": p.as_dict()}
        return reference_composite(r.good, r.target, ref, p), self.config.strength, rec

    def generate(
        self, requests: Sequence[Request], *, candidates: int, progress: bool
    ) -> list[list[Candidate]]:
        """``candidates`` paintings per request (batched; the same generator, so reproducible)."""
        from tqdm import tqdm

        c = self.config
        gen = torch.Generator().manual_seed(c.seed + 7919)
        jobs = []
        for r in requests:
            start, strength, guide = self._start(r)
            win = mask_window(r.target, min_side=c.crop)
            crop, cm = take(start, win, c.crop), take_mask(r.target, win, c.crop)
            cls = self.groups.index(r.group) if r.group in self.groups else 0
            jobs.extend([(r, win, start, crop, cm, cls, strength, guide)] * candidates)
        outs: list[Candidate | None] = [None] * len(jobs)
        bs = max(c.batch_size, 1)
        # one batch holds one strength (one schedule); results go back to their job's index
        chunks: list[list[int]] = []
        for v in sorted({j[6] for j in jobs}):
            idx = [k for k, j in enumerate(jobs) if j[6] == v]
            chunks += [idx[s : s + bs] for s in range(0, len(idx), bs)]
        for chunk in tqdm(chunks, desc="fewshot sample", disable=not progress, mininterval=1.0):
            sel = [jobs[j] for j in chunk]
            bg = torch.from_numpy(_to_unit(np.stack([j[3] for j in sel]))).to(self.device)
            m = torch.from_numpy(np.stack([j[4] for j in sel])[:, None].astype(np.float32))
            labels = torch.tensor([j[5] for j in sel], device=self.device)
            x0 = self._sample(bg, m.to(self.device), labels, gen, strength=sel[0][6])
            painted = _to_uint8(x0)
            if self.grey:  # a grey product stays grey: the channels' mean in each
                painted = np.repeat(
                    painted.mean(axis=-1, keepdims=True).round().astype(np.uint8), 3, axis=-1
                )
            for j, (r, win, start, _crop, cm, _cls, strength, guide), p in zip(
                chunk, sel, painted, strict=True
            ):
                # ``start`` equals the good image outside the target; inside, the window's
                # fine detail lost at working size comes from the start image (the real
                # defect's own grain when guided)
                outs[j] = Candidate(
                    image=paste(start, p, win, r.target),
                    crop=p,
                    crop_mask=cm,
                    record={"window": win.as_list(), "crop": c.crop, "strength": strength, **guide},
                )
        done = [o for o in outs if o is not None]
        return [done[i * candidates : (i + 1) * candidates] for i in range(len(requests))]
