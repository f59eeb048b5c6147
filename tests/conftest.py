"""Tiny models built in the tests: random UNets, VAEs, CLIP encoders and tokenizers. No downloads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd2_serve.bench.random_folder import write_byte_clip_tokenizer

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


def tiny_sd_unet(cross_dim: int, sdxl: bool = False, proj_dim: int = 0, **arch: object) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=4 * 6 + proj_dim) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, **{"attention_head_dim": 2, "norm_num_groups": 8, **extra, **arch},
    )


def write_tiny_pipeline(folder: Path, family: str, variant: str | None = None) -> Path:
    """A random diffusers pipeline folder at 16x16 pixels, shaped like

    ``sd15``  SD 1.5 (CLIP, eps);
    ``sd2-v`` SD 2.x 768-v: v-prediction, a wider text encoder than the UNet's first block (SD2's
              1024 vs 320 at tiny size), linear projections, a head dim per block, upcast attention;
    ``sdxl``  SDXL (two encoders, pooled embedding, time ids).
    ``variant="fp16"`` saves half-precision weights as ``*.fp16.safetensors`` only.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(0)
    tok = write_byte_clip_tokenizer(folder / "_tok", max_length=16)
    vocab = len(tok)
    prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction)
    if family in ("sd15", "sd2-v"):
        width = 32 if family == "sd15" else 48
        arch = ({"use_linear_projection": True, "attention_head_dim": [2, 4], "upcast_attention": True}
                if family == "sd2-v" else {})
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip(vocab, width), tokenizer=tok, unet=tiny_sd_unet(width, **arch),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip(vocab, 32), tokenizer=tok,
            text_encoder_2=tiny_clip(vocab, 32, projection=True), tokenizer_2=tok,
            unet=tiny_sd_unet(64, sdxl=True, proj_dim=32), scheduler=scheduler)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, variant=variant)
    return folder


def assert_one_step_matches_stock_diffusers(folder: Path, prompt: str = "a red cube") -> None:
    """From the same latents, one step of our ``FewStepPipeline`` and of stock diffusers (the
    exported LCMScheduler at t = 999, no guidance) give the same images: the same math."""
    from diffusers import DiffusionPipeline

    from dmd2_serve import FewStepPipeline

    ours = FewStepPipeline.from_folder(folder)
    latents = torch.randn((1, *ours.backbone.sample_shape), generator=torch.Generator().manual_seed(0))
    mine = ours([prompt], latents=latents, steps=1)
    side = ours.backbone.image_size
    stock = DiffusionPipeline.from_pretrained(folder)
    theirs = stock(prompt, latents=latents.clone(), timesteps=[999], guidance_scale=0.0, height=side, width=side,
                   output_type="pt").images
    assert mine.shape == theirs.shape == (1, 3, side, side)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


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
def sd2v_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2-shaped v-prediction teacher."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("sd2v") / "teacher", "sd2-v")


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
