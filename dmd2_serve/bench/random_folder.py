"""Random-weight generator folders in a family's real architecture, made offline (no download).

Speed does not depend on weight values, so the served-path benchmark serves a folder written
here: an SD1.5 generator in exactly the layout ``python -m dmd2_serve --model DIR`` loads (the
export's: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, an LCM ``scheduler/``,
``model_index.json`` and the ``dmd2.json`` card with the few-step schedule), its UNet and VAE in
the reference configs of ``model/adapters/configs`` and its text encoder in CLIP ViT-L/14's
architecture. The tokenizer is a byte-level CLIP BPE with no merges (every character a token),
written from nothing; the tests build their tiny SD folders on the same one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# SD1.5 ships CLIP ViT-L/14's text tower: 12 layers, width 768, 12 heads, 77 tokens, quick GELU.
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16, projection_dim=32)
TINY_IMAGE = 32  # --tiny: the image side in pixels (the tiny VAE downsamples by 2)


def write_byte_clip_tokenizer(folder: Path, max_length: int = 77) -> Any:
    """Write a byte-level CLIP BPE tokenizer with no merges (every character is a token) to
    ``folder`` (``vocab.json``, ``merges.txt``) and return it as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte -> printable character map, which CLIP's BPE works on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def write_random_sd15_generator(out: Path, tiny: bool = False, device: str | torch.device = "cpu",
                                timesteps: tuple[int, ...] | None = None) -> Path:
    """Write a random-weight SD1.5 generator folder to ``out`` and return it (``timesteps``: its
    few-step schedule, default the benchmark's 4 steps).

    The models are made on ``device`` (a GPU makes the ~1.1 B parameters in seconds) and saved in
    float16 there (float32 with ``tiny``: toy sizes for CPU tests, a 32-pixel image).
    """
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..model.adapters import ADAPTERS
    from ..model.card import ModelCard
    from .pipelines import TIMESTEPS, TINY

    arch = ADAPTERS["sd15"].reference
    text = {**VIT_L14_TEXT, **(TINY_TEXT if tiny else {})}
    unet_cfg, vae_cfg, image = arch.unet_config(), arch.vae_config(), arch.image
    if tiny:
        image = TINY_IMAGE
        unet_cfg.update(TINY["unet"], cross_attention_dim=text["hidden_size"], sample_size=TINY_IMAGE // 2)
        vae_cfg.update(TINY["vae"], sample_size=TINY_IMAGE)
    out = Path(out)
    # Written where save_pretrained writes it again, with its config beside it.
    tokenizer = write_byte_clip_tokenizer(out / "tokenizer", max_length=text["max_position_embeddings"])
    # The tokenizer's own special tokens: CLIP's pooled output finds the end-of-text token by its id.
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text, **ids))
    # SD1.5's betas and offsets, as the export writes them: no clipping or thresholding of x0.
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                             set_alpha_to_one=False, clip_sample=False, thresholding=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if not tiny:
        pipe.to(torch.float16)
    pipe.save_pretrained(out)
    ModelCard(family="sd15", image_size=image, prediction_type="epsilon", timesteps=list(timesteps or TIMESTEPS),
              teacher="random weights (dmd2_serve.bench.random_folder)").write(out)
    return out
