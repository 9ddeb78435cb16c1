"""The ``pretrained`` backend end to end on tiny random Stable Diffusion inpainting components.

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
from ngcal.core.errors import ArtifactError
from ngcal.core.scoresets import load_scoreset
from ngcal.generation.diffusion.backend import Request
from ngcal.generation.diffusion.pretrained import PretrainedBackend, PretrainedConfig

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
