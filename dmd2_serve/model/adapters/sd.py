"""Stable Diffusion 1.x / 2.x (512 eps, 768 v-prediction): one CLIP encoder, VAE latents.

:class:`LatentBackbone` is the VAE half the latent families share (SDXL builds on it too), with
the folder loading they share: sub-folders in diffusers layout, fp16-variant weights found by
themselves, the image size from the UNet's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..card import ModelCard
from ..schedule import Schedule
from .base import Backbone, Conditioning, ModelFolderError, PaperEval, ReferenceArch


def weights_variant(part: Path) -> str | None:
    """``"fp16"`` when a sub-folder holds only fp16-variant weights (``*.fp16.safetensors``, or
    sharded ``*.fp16-00001-of-00002.safetensors``)."""
    names = [p.name for p in part.glob("*") if p.suffix in (".safetensors", ".bin")]
    plain = [n for n in names if ".fp16." not in n and ".fp16-" not in n]
    return "fp16" if names and not plain else None


def load_part(cls: Any, folder: Path, name: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder / name)`` in float32, fp16-variant folders included.

    float32 is asked for explicitly: transformers loads weights in their stored dtype by default,
    so a folder saved in half precision would otherwise give a half-precision text encoder.
    """
    part = Path(folder) / name
    variant = weights_variant(part)
    if variant:
        kwargs["variant"] = variant
    return cls.from_pretrained(part, torch_dtype=torch.float32, **kwargs)


def native_image_size(folder: Path, vae: nn.Module) -> int:
    """The teacher's image side: its UNet's ``sample_size`` times the VAE's downsampling."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        sample = json.loads((Path(folder) / "unet" / "config.json").read_text()).get("sample_size")
    except (OSError, json.JSONDecodeError):
        sample = None
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample * factor) if sample else int(vae.config.sample_size or 512)


class LatentBackbone(Backbone):
    """Shared VAE half of the Stable Diffusion families."""

    def __init__(self, vae: nn.Module, image_size: int, schedule: Schedule) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size % factor:  # the latent would be image_size // factor: another image size's
            raise ModelFolderError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor"
                                   f" {factor}; give {image_size // factor * factor or factor} or"
                                   f" {(image_size // factor + 1) * factor}")
        super().__init__((vae.config.latent_channels, image_size // factor, image_size // factor), image_size, schedule)
        self.vae = vae.eval().requires_grad_(False)

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        if super().matches(index):
            return True
        # an unknown pipeline class with exactly this family's parts (a custom or community class)
        components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        return set(cls.parts) - {"scheduler"} <= components and components <= set(cls.parts) | {
            "safety_checker", "feature_extractor", "image_encoder"}

    @classmethod
    def from_folder(cls, folder: Path, card: ModelCard, image_size: int | None,
                    schedule: Schedule) -> Backbone:
        from diffusers import AutoencoderKL

        try:
            vae = load_part(AutoencoderKL, folder, "vae")
            size = int(image_size or card.image_size or native_image_size(folder, vae))
            return cls.build(folder, vae, size, schedule)
        except (OSError, ValueError) as e:
            if isinstance(e, ModelFolderError):
                raise
            raise ModelFolderError(f"could not load the encoders or VAE of '{folder}': {e}") from e

    @classmethod
    def build(cls, folder: Path, vae: nn.Module, image_size: int,
              schedule: Schedule) -> Backbone:  # pragma: no cover - abstract
        """The adapter from its loaded VAE: subclasses load their text encoders."""
        raise NotImplementedError

    @property
    def _scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        x = x.to(self.vae.dtype) / self._scale
        images = self.vae.decode(x).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # DMD2 pre-encodes real images as latent_dist.sample() * scaling_factor; keeping the
        # distribution lets every use draw a fresh sample without running the encoder again.
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return dist.mean.float() * self._scale, dist.std.float() * self._scale

    def _tokenize(self, tokenizer: Any, prompts: list[str]) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def _save_parts(self, folder: Path, parts: dict[str, Any]) -> None:
        for name, module in parts.items():
            module.save_pretrained(folder / name)


class StableDiffusionBackbone(LatentBackbone):
    """SD 1.x/2.x: CLIP (or OpenCLIP, as SD2 ships it) last hidden state; unconditional = ""."""

    family = "sd15"
    title = "Stable Diffusion 1.x / 2.x"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    single_file_types = ("v1", "v2")
    single_file_pipeline = "StableDiffusionPipeline"
    default_preset = "sd15"
    reference = ReferenceArch("sd15_unet.json", "sd_vae.json", 512, (77, 768))
    paper_eval = PaperEval(256, 30_000)  # --eval_res 256, 30k COCO-2014 captions

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, image_size: int,
                 schedule: Schedule) -> None:
        super().__init__(vae, image_size, schedule)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def build(cls, folder: Path, vae: nn.Module, image_size: int, schedule: Schedule) -> Backbone:
        from transformers import AutoTokenizer, CLIPTextModel

        return cls(vae, load_part(CLIPTextModel, folder, "text_encoder"),
                   AutoTokenizer.from_pretrained(Path(folder) / "tokenizer"), image_size, schedule)

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder]

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, ...]:
        return (self._tokenize(self.tokenizer, prompts),)

    @torch.no_grad()
    def encode_tokens(self, ids: Tensor) -> Conditioning:
        return Conditioning(self.text_encoder(ids)[0])  # (B, 77, 768) (1024 for SD2)

    def save(self, folder: Path) -> None:
        self._save_parts(folder, {"vae": self.vae, "text_encoder": self.text_encoder,
                                  "tokenizer": self.tokenizer})
