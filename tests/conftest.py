"""Tiny models built in the tests: random UNets, VAEs, CLIP encoders and tokenizers. No downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on the CPU through Triton's interpreter; it is chosen when a kernel is
# defined, so this must be set before anything imports dmd2_kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_digits_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=384, attention_head_dim=2, norm_num_groups=4,
    )


def write_tiny_clip_tokenizer(folder: Path, max_length: int = 16) -> object:
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte -> printable character map, which CLIP's BPE works on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    return tok


def tiny_clip(vocab_size: int, hidden: int, projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16)


def tiny_sd_unet(cross_dim: int, sdxl: bool = False, proj_dim: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + proj_dim) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=2, norm_num_groups=8, **extra,
    )


def write_tiny_pipeline(folder: Path, family: str) -> Path:
    """A random SD1.5-shaped or SDXL-shaped diffusers pipeline folder at 16x16 pixels."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tok = write_tiny_clip_tokenizer(folder / "_tok")
    vocab = len(tok)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip(vocab, 32), tokenizer=tok, unet=tiny_sd_unet(32),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip(vocab, 32), tokenizer=tok,
            text_encoder_2=tiny_clip(vocab, 32, projection=True), tokenizer_2=tok,
            unet=tiny_sd_unet(64, sdxl=True, proj_dim=32), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def write_image_folder(folder: Path, n: int = 6, size: int = 16) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size + 4, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of thing {i}")
    return folder


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random digits-family teacher folder (the real MiniLM encoder, a tiny UNet)."""
    from dmd2_train.teacher import write_digits_folder

    return write_digits_folder(tiny_digits_unet(), tmp_path_factory.mktemp("teacher") / "digits")


@pytest.fixture(scope="session")
def sd15_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd15") / "teacher", "sd15")


@pytest.fixture(scope="session")
def sdxl_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "teacher", "sdxl")


@pytest.fixture(scope="session")
def sd_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prompt file, captioned image folder) for the SD-shaped runs."""
    root = tmp_path_factory.mktemp("data")
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na small dog\na city at night\n")
    return prompts, write_image_folder(root / "images")


def tiny_run_overrides(**extra: object) -> dict[str, object]:
    """Config values for a few fast CPU steps."""
    base = dict(batch_size=2, max_steps=4, ratio=2, warmup_steps=2, log_every=1, preview_every=2,
                checkpoint_every=2, lr_generator=1e-4, lr_fake=1e-4, preview_prompts=["a 1", "a 2"])
    base.update(extra)
    return base


@pytest.fixture(scope="session")
def server():
    """A real ``python -m dmd2_serve`` of the bundled generator on a free loopback port."""
    from serving import start_server, stop_server

    s = start_server("--max-batch-size", "8", "--batch-timeout", "0.05")
    yield s
    stop_server(s)
