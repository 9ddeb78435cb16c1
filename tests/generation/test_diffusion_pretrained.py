"""The ``pretrained`` backend (prompt, reference-guided, LoRA) on tiny random SD components.

The components (UNet, VAE, CLIP text encoder and a tokenizer built offline from a tiny
vocabulary written here) are randomly initialised, saved with ``save_pretrained`` to a temp
folder and loaded back by the backend with ``local_files_only=True``; any socket connection
off the loopback fails the test, so nothing can be downloaded.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ngcal.cli.main import main
from ngcal.core.errors import ArtifactError, ConfigError
from ngcal.core.scoresets import load_scoreset
from ngcal.generation.diffusion.backend import Reference, Request
from ngcal.generation.diffusion.placement import GuidedRequest, Placement
from ngcal.generation.diffusion.pretrained import (
    PretrainedBackend,
    PretrainedConfig,
    resolve_mode,
)
from ngcal.generation.diffusion.pretrained_lora import (
    LoraSettings,
    adapter_state,
    add_adapters,
    masked_diffusion_loss,
    train_adapters,
)
from ngcal.generation.diffusion.pretrained_reference import (
    guide_for,
    match_reference,
    reference_init,
)
from ngcal.generation.diffusion.windows import mask_window, take

pytestmark = pytest.mark.torch


def _tiny_sd(root: Path) -> Path:
    """A randomly initialised SD inpainting pipeline saved under ``root/sd``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=9,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
    )  # fmt: skip
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in [chr(c) for c in range(ord("a"), ord("z") + 1)]:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok_dir = root / "tokenizer_src"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"), model_max_length=77
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab) + 8,
            max_position_embeddings=77, projection_dim=32,
        )
    )  # fmt: skip
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    out = root / "sd"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any socket connection that is not to the loopback interface."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            raise AssertionError(f"network access to {address!r} during an offline test")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


TINY = dict(resolution=32, min_side=16, steps=2, guidance=2.0)


def test_backend_paints_inside_the_mask_only_and_is_reproducible(tiny_sd: Path) -> None:
    good = np.full((64, 64, 3), 120, np.uint8)
    target = np.zeros((64, 64), dtype=bool)
    target[20:30, 18:40] = True
    req = [Request(good, target, "crack")]

    def paint(seed: int) -> list[np.ndarray]:
        b = PretrainedBackend(PretrainedConfig(model_path=str(tiny_sd), seed=seed, **TINY))  # type: ignore[arg-type]
        rec = b.prepare([], [], progress=False)
        assert rec["mode"] == "prompt" and b.training_crops() == []
        return [c.image for c in b.generate(req, candidates=2, progress=False)[0]]

    a, again = paint(0), paint(0)
    for img in a:
        assert np.array_equal(img[~target], good[~target])  # exact background
        assert np.abs(img[target].astype(int) - 120).max() > 0  # something was painted
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, again, strict=True))
    assert a[0].tobytes() != a[1].tobytes()  # two candidates, two seeds


def test_a_folder_without_model_index_is_an_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="model_index.json"):
        PretrainedBackend(PretrainedConfig(model_path=str(tmp_path))).prepare(
            [], [], progress=False
        )


def test_cli_pretrained_zero_ng_writes_the_folder(
    tiny_sd: Path, demo_ng_category: Path, demo_ng_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sd_out"
    rc = main(
        [
            "generate", "diffusion", "--model", str(demo_ng_model), "--data",
            str(demo_ng_category), "--out", str(out), "--backend", "pretrained",
            "--model-path", str(tiny_sd), "--count", "2", "--candidates", "1",
            "--device", "cpu", "--no-progress", "--sd-resolution", "32", "--sd-steps", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    index = json.loads((out / "index.json").read_text())["items"]
    assert len(index) == 2 and all(r["group"] == "perlin" for r in index)
    assert all(r["checks"]["background"]["passed"] for r in index)
    assert all(r["checks"]["feature"]["passed"] is None for r in index)  # no real NG: n/a
    assert load_scoreset(out / "scores" / "diffusion.json").source == "diffusion"
    assert json.loads((out / "diffusion_run.json").read_text())["backend"]["mode"] == "prompt"


# --- reference-guided and LoRA modes -------------------------------------------------------


def _l_mask(shape: tuple[int, int], y: int, x: int) -> np.ndarray:
    """An L-shaped mask (no dihedral symmetry) with its box's top-left at (y, x): 12 x 8."""
    m = np.zeros(shape, dtype=bool)
    m[y : y + 12, x : x + 3] = True
    m[y + 9 : y + 12, x : x + 8] = True
    return m


def _reference(seed: int = 0, group: str = "crack") -> Reference:
    """A 64 px real NG: grey texture, a dark gradient defect under an L-shaped mask."""
    rng = np.random.default_rng(seed)
    img = rng.normal(120, 4, (64, 64, 3)).clip(0, 255).astype(np.uint8)
    mask = _l_mask((64, 64), 10, 12)
    ramp = np.linspace(30, 70, 12)[:, None, None] + np.arange(3)[None, None, :] * 5
    img[10:22, 12:20][mask[10:22, 12:20]] = np.broadcast_to(ramp, (12, 8, 3))[mask[10:22, 12:20]]
    return Reference(img, mask, group, f"{group}/ref{seed}.png")


def test_resolve_mode_defaults_and_refusals() -> None:
    assert resolve_mode("auto", 0, has_peft=True) == "prompt"
    assert resolve_mode("auto", 2, has_peft=True) == "lora"
    assert resolve_mode("auto", 2, has_peft=False) == "reference"
    assert resolve_mode("prompt", 3, has_peft=True) == "prompt"
    with pytest.raises(ConfigError, match="real NG"):
        resolve_mode("reference", 0, has_peft=True)
    with pytest.raises(ConfigError, match="peft"):
        resolve_mode("lora", 1, has_peft=False)
    with pytest.raises(ConfigError, match="strength"):
        PretrainedConfig(model_path="x", steps=2, strength=0.3)  # 2 x 0.3 < 1 step


def test_masked_loss_weights_the_defect_region() -> None:
    target = torch.zeros(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:4, 2:4] = 1.0
    inside = target.clone()
    inside[..., 2:4, 2:4] = 1.0  # unit error on the 4 mask pixels
    outside = target.clone()
    outside[..., 5:7, 5:7] = 1.0  # the same error on 4 background pixels
    kw = dict(defect_weight=1.0, object_weight=0.3, background=0.3)
    li = float(masked_diffusion_loss(inside, target, mask, **kw))
    lo = float(masked_diffusion_loss(outside, target, mask, **kw))
    assert li == pytest.approx(1.0 + 0.3 * 4 / 64)  # mean inside the mask + object term
    assert lo == pytest.approx(0.3 * 0.3 * 4 / 64)  # background weighs 0.3 in the object term
    assert li > 50 * lo
    assert float(masked_diffusion_loss(outside, target, mask, object_weight=0.0)) == 0.0
    assert float(masked_diffusion_loss(target, target, mask)) == 0.0
    empty = torch.zeros_like(mask)  # no defect: only the object term, no division by zero
    assert float(masked_diffusion_loss(inside, target, empty, object_weight=0.0)) == 0.0


def test_reference_is_replaced_by_the_transform_that_fits_the_target() -> None:
    ref = _reference()
    good = np.full((64, 64, 3), 120, np.uint8)
    crop = ref.image[10:22, 12:20].astype(int)
    box = np.zeros((64, 64), dtype=bool)
    box[10:22, 12:20] = True
    decoy = Reference(ref.image, box, "crack", "crack/box.png")  # same box, not an L
    for flip, rot in [(False, 0), (True, 1), (False, 3), (True, 2)]:
        src = ref.mask[10:22, 12:20]
        moved = np.rot90(src[:, ::-1] if flip else src, rot)
        target = np.zeros((64, 64), dtype=bool)
        h, w = moved.shape
        target[30 : 30 + h, 36 : 36 + w] = moved
        g = match_reference(target, [decoy, ref])
        assert g.reference is ref and g.source == "matched" and g.iou == 1.0
        assert (g.placement.flip, g.placement.rot) == (flip, rot)
        out = reference_init(Request(good, target, "crack"), g)
        assert np.array_equal(out[~target], good[~target])  # exact outside the target
        want = np.rot90(crop[:, ::-1] if flip else crop, rot)[moved]
        got = out[30 : 30 + h, 36 : 36 + w][moved].astype(int)
        assert np.abs(got - want).max() <= 6  # the reference's dark defect, re-placed
        assert got.mean() < 80  # (the good image is 120 there)
    # a request that carries its placement keeps it (no matching), even a poor fit
    p = Placement(True, 1, 8, 12, 5, 40)
    target = np.zeros((64, 64), dtype=bool)
    target[5:13, 40:52] = True  # a box, not the L: IoU < 1
    g = guide_for(GuidedRequest(good, target, "crack", ref, p), [ref])
    assert g.source == "drawn" and g.placement == p and 0.0 < g.iou < 1.0


def test_reference_mode_denoises_the_replaced_defect_with_strength_below_one(
    tiny_sd: Path,
) -> None:
    ref = _reference()
    good = np.full((64, 64, 3), 120, np.uint8)
    target = np.zeros((64, 64), dtype=bool)
    target[40:52, 30:38] = np.rot90(ref.mask[10:22, 12:20], 2)
    req = [Request(good, target, "crack")]
    cfg = dict(TINY, mode="reference", strength=0.5)
    seen: list[dict[str, Any]] = []

    def paint(seed: int) -> list[Any]:
        b = PretrainedBackend(PretrainedConfig(model_path=str(tiny_sd), seed=seed, **cfg))  # type: ignore[arg-type]
        rec = b.prepare([ref], [], progress=False)
        assert rec["mode"] == "reference" and rec["train_seconds"] == 0.0
        assert len(b.training_crops()) == 1  # the reference: near-copy evidence
        pipe = b.pipe

        def spy(**kw: Any) -> Any:
            seen.append(kw)
            return pipe(**kw)  # type: ignore[operator]

        b.pipe = spy
        return b.generate(req, candidates=2, progress=False)[0]

    a, again = paint(0), paint(0)
    for c in a:
        assert np.array_equal(c.image[~target], good[~target])  # exact background
        assert c.record["mode"] == "reference" and c.record["strength"] == 0.5
        placed = c.record["placement"]
        assert placed["reference"] == ref.item_id and placed["iou"] == 1.0  # type: ignore[index]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, again, strict=True))
    # the pipeline started from the re-placed real defect, not from the good image
    init = np.asarray(seen[0]["image"])
    assert seen[0]["strength"] == 0.5
    win = mask_window(target, min_side=16)
    want = reference_init(req[0], match_reference(target, [ref]))
    assert np.array_equal(init, take(want, win, 32))
    assert not np.array_equal(init, take(good, win, 32))


def _lora_backend(tiny_sd: Path, seed: int, steps: int = 3) -> PretrainedBackend:
    lora = LoraSettings(rank=2, alpha=2, steps=steps, batch=2, lr=1e-2)
    return PretrainedBackend(
        PretrainedConfig(model_path=str(tiny_sd), seed=seed, mode="lora", lora=lora, **TINY)  # type: ignore[arg-type]
    )


def test_lora_training_changes_the_adapters_and_only_them(tiny_sd: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(  # type: ignore[no-untyped-call]
        str(tiny_sd), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    frozen = [
        {k: v.clone() for k, v in m.state_dict().items()} for m in (pipe.vae, pipe.text_encoder)
    ]
    settings = LoraSettings(rank=2, alpha=2, steps=4, batch=2, lr=1e-2)
    n = add_adapters(pipe.unet, settings, seed=0)
    before = adapter_state(pipe.unet)
    assert n == sum(t.numel() for t in before.values()) > 0
    assert all(float(t.abs().max()) == 0.0 for k, t in before.items() if "lora_B" in k)
    rec = train_adapters(
        pipe, [_reference(0), _reference(1)], {"crack": "a sks crack"}, settings,
        resolution=32, min_side=16, seed=0, progress=False,
    )  # fmt: skip
    after = adapter_state(pipe.unet)
    assert set(after) == set(before)
    assert all(not torch.equal(before[k], after[k]) for k in after if "lora_B" in k)
    assert rec["trainable_params"] == n and rec["steps"] == 4
    state = pipe.unet.state_dict()
    for k, v in base.items():  # the base UNet's weights (wrapped by peft as base_layer)
        k2 = (
            k
            if k in state
            else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(state[k2], v), k
    for m, sd in zip((pipe.vae, pipe.text_encoder), frozen, strict=True):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_lora_mode_is_reproducible_for_a_seed_and_paints_inside_the_mask(tiny_sd: Path) -> None:
    refs = [_reference(0), _reference(1)]
    good = np.full((64, 64, 3), 120, np.uint8)
    target = np.zeros((64, 64), dtype=bool)
    target[20:30, 18:40] = True
    req = [Request(good, target, "crack")]

    def run(seed: int) -> tuple[dict[str, object], list[np.ndarray]]:
        b = _lora_backend(tiny_sd, seed)
        rec = b.prepare(refs, [], progress=False)
        assert rec["mode"] == "lora" and b.prompt_for("crack").startswith("a sks crack")
        return rec, [c.image for c in b.generate(req, candidates=1, progress=False)[0]]

    (r0, a), (r0b, again), (r1, _) = run(0), run(0), run(1)
    lora0, lora0b, lora1 = (r["lora"] for r in (r0, r0b, r1))
    assert lora0["adapter_sha256"] == lora0b["adapter_sha256"]  # type: ignore[index]
    assert lora0["adapter_sha256"] != lora1["adapter_sha256"]  # type: ignore[index]
    assert a[0].tobytes() == again[0].tobytes()
    assert np.array_equal(a[0][~target], good[~target])
    assert np.abs(a[0][target].astype(int) - 120).max() > 0


def test_cli_pretrained_lora_records_the_mode_per_candidate(
    tiny_sd: Path, demo_ng_category: Path, demo_ng_model: Path, tmp_path: Path
) -> None:
    d, out = demo_ng_category, tmp_path / "lora_out"
    rc = main(
        [
            "generate", "diffusion", "--model", str(demo_ng_model), "--data", str(d),
            "--out", str(out), "--ng", str(d / "test" / "spot"), "--backend", "pretrained",
            "--model-path", str(tiny_sd), "--mode", "lora", "--lora-steps", "2",
            "--sd-strength", "0.5", "--count", "2", "--candidates", "1", "--device", "cpu",
            "--no-progress", "--sd-resolution", "32", "--sd-steps", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    index = json.loads((out / "index.json").read_text())["items"]
    assert len(index) == 2 and all(r["group"] == "spot" for r in index)
    assert all(r["backend"]["mode"] == "lora" for r in index)
    assert all(r["backend"]["placement"]["reference"].startswith("spot/") for r in index)
    assert all(r["checks"]["background"]["passed"] for r in index)
    run = json.loads((out / "diffusion_run.json").read_text())
    assert run["backend"]["mode"] == "lora" and run["backend"]["lora"]["steps"] == 2
    assert run["backend"]["train_seconds"] > 0
