"""SDXL: two CLIP encoders, pooled embedding and micro-conditioning, VAE latents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..schedule import Schedule
from .base import Backbone, Conditioning, PaperEval, ReferenceArch
from .sd import LatentBackbone, load_part


class StableDiffusionXLBackbone(LatentBackbone):
    """SDXL: penultimate states of both encoders concatenated, pooled embedding of encoder 2,
    time ids (H, W, 0, 0, H, W); the unconditional embeddings are zeros, as in DMD2."""

    family = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
    parts = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    single_file_types = ("xl_base",)
    single_file_pipeline = "StableDiffusionXLPipeline"
    default_preset = "sdxl"
    reference = ReferenceArch("sdxl_unet.json", "sdxl_vae.json", 1024, (77, 2048),
                              {"text_embeds": (1280,), "time_ids": (6,)},
                              compile_scopes=("regional", "full"))  # full compiles for minutes
    paper_eval = PaperEval(512, 10_000, patch_fid=True)  # --eval_res 512, 10k captions, patch-FID beside

    def __init__(
        self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, text_encoder_2: nn.Module,
        tokenizer_2: Any, image_size: int, schedule: Schedule,
    ) -> None:
        super().__init__(vae, image_size, schedule)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2

    @classmethod
    def build(cls, folder: Path, vae: nn.Module, image_size: int, schedule: Schedule) -> Backbone:
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        folder = Path(folder)
        return cls(vae, load_part(CLIPTextModel, folder, "text_encoder"),
                   AutoTokenizer.from_pretrained(folder / "tokenizer"),
                   load_part(CLIPTextModelWithProjection, folder, "text_encoder_2"),
                   AutoTokenizer.from_pretrained(folder / "tokenizer_2"), image_size, schedule)

    def _time_ids(self, batch: int) -> Tensor:
        s = self.image_size
        return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=self.device).repeat(batch, 1)

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, ...]:
        """Both tokenizers' ids, and the time ids (made from host numbers: not in a captured graph)."""
        return (self._tokenize(self.tokenizer, prompts), self._tokenize(self.tokenizer_2, prompts),
                self._time_ids(len(prompts)))

    @torch.no_grad()
    def encode_tokens(self, ids_1: Tensor, ids_2: Tensor, time_ids: Tensor) -> Conditioning:
        out_1 = self.text_encoder(ids_1, output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2, output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, 2048)
        pooled = out_2.text_embeds  # (B, 1280)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    def unconditional(self, batch: int) -> Conditioning:
        cond = self.encode_prompts([""])
        zeros = Conditioning(torch.zeros_like(cond.hidden), {
            "text_embeds": torch.zeros_like(cond.added["text_embeds"]),
            "time_ids": cond.added["time_ids"],
        })
        return zeros.index([0] * batch)

    def save(self, folder: Path) -> None:
        self._save_parts(folder, {
            "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
            "text_encoder_2": self.text_encoder_2, "tokenizer_2": self.tokenizer_2,
        })
