"""What every backbone adapter is: the interface the trainer, the sampler and the server call.

An adapter (a :class:`Backbone` subclass, one file per family, registered in ``__init__``) is the
only place that knows a model family. It owns:

* loading: :meth:`Backbone.from_folder` builds the frozen encoders (and VAE) of a folder;
* the denoiser seam: :func:`unet_eps` (the one UNet call of the generator, the fake score, the
  teacher, the TensorRT wrapper and the benchmarks), with the prediction type taken care of by
  the :class:`~dmd2_serve.model.schedule.Schedule`;
* prompts -> :class:`Conditioning`, the unconditional conditioning for classifier-free guidance;
* the image facts: UNet-space shape, image size and channels, the request sizes it can render;
* the way between UNet space and images (decode, the encoded distribution of real images);
* the bottleneck module the GAN head reads (:meth:`Backbone.bottleneck`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..card import CARD_FILE as META_FILE  # re-exported: the card's file name
from ..card import ModelCard
from ..errors import ModelFolderError
from ..schedule import Schedule

REFERENCE_CONFIGS = Path(__file__).parent / "configs"  # the families' real architectures (diffusers configs)
MAX_SIDE = 2048  # the largest request side any adapter renders

__all__ = ["META_FILE", "Backbone", "Conditioning", "ModelFolderError", "ReferenceArch", "unet_eps", "unet_prediction"]


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


@dataclass(frozen=True)
class PaperEval:
    """How the DMD2 paper's official evaluation scores a family (``dmd2_train/fid_protocol.py``):
    the FID resolution (centre square, Lanczos), the number of COCO captions, patch-FID or not."""

    resolution: int
    images: int
    patch_fid: bool = False


@dataclass(frozen=True)
class ReferenceArch:
    """A family's real architecture, for benchmarks with random weights (no download).

    Attributes:
        unet, vae: config files in ``adapters/configs``; image: the native side in pixels;
        hidden: (L, D) of the cross-attention context; added: extra conditioning shapes;
        compile_scopes: the benchmark's compile scopes, the one worth its time first.
    """

    unet: str
    vae: str
    image: int
    hidden: tuple[int, int]
    added: dict[str, tuple[int, ...]] = field(default_factory=dict)
    compile_scopes: tuple[str, ...] = ("full", "regional")

    def unet_config(self) -> dict[str, Any]:
        return json.loads((REFERENCE_CONFIGS / self.unet).read_text())

    def vae_config(self) -> dict[str, Any]:
        return json.loads((REFERENCE_CONFIGS / self.vae).read_text())

    def conditioning(self, batch: int, g: torch.Generator, image: int | None = None) -> Conditioning:
        """Random conditioning of the architecture's shapes on ``g``'s device (time ids: the image size)."""
        side = float(image or self.image)
        added = {}
        for name, shape in self.added.items():
            added[name] = (torch.tensor([[side, side, 0, 0, side, side]], device=g.device).repeat(batch, 1)
                           if name == "time_ids" else torch.randn((batch, *shape), generator=g, device=g.device))
        return Conditioning(torch.randn((batch, *self.hidden), generator=g, device=g.device), added)


def unet_prediction(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """One UNet evaluation for (x_t, t) under ``cond``: its raw output (eps or v), in the UNet's dtype."""
    dtype = next(unet.parameters()).dtype
    return unet(x_t.to(dtype), t, **cond.to(x_t.device, dtype).unet_kwargs()).sample


def unet_eps(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning, schedule: Schedule) -> Tensor:
    """The denoiser seam: the UNet's prediction for (x_t, t) as eps.

    An eps-predicting UNet's output is returned as it is (in the UNet's dtype); a v-predicting
    one's is converted in float32 (``eps = sqrt(1 - abar) x_t + sqrt(abar) v``).
    """
    return schedule.eps(x_t, unet_prediction(unet, x_t, t, cond), t)


class Backbone(nn.Module):
    """The family-specific half of a model folder: encoders, the image <-> x map, the schedule.

    Subclasses hold the frozen text encoder(s) and, for latent models, the VAE; they set the
    class facts below and implement the abstract methods. ``schedule`` is the folder's noise
    schedule and prediction type (with the generator's steps for an exported generator).
    """

    family: ClassVar[str] = ""  # the id written in dmd2.json
    title: ClassVar[str] = ""  # how a message names it, e.g. "Stable Diffusion 1.x / 2.x"
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # diffusers pipeline classes it reads
    parts: ClassVar[tuple[str, ...]] = ()  # the sub-folders a diffusers folder of it must hold
    # Single-file checkpoints (original key layout): the model types diffusers'
    # ``infer_diffusers_model_type`` gives them, and the diffusers pipeline class that reads them.
    single_file_types: ClassVar[tuple[str, ...]] = ()
    single_file_pipeline: ClassVar[str | None] = None
    default_preset: ClassVar[str | None] = None  # the distillation preset for its teachers
    bundled_data: ClassVar[str | None] = None  # a dataset shipped with the family (digits)
    image_channels: ClassVar[int] = 3
    reference: ClassVar[ReferenceArch | None] = None  # the real architecture, for the benchmarks
    paper_eval: ClassVar[PaperEval | None] = None  # the official evaluation's settings, if it has one

    def __init__(self, sample_shape: tuple[int, int, int], image_size: int, schedule: Schedule) -> None:
        super().__init__()
        self.sample_shape = sample_shape  # (C, H, W) of the UNet's input
        self.image_size = image_size  # image side in pixels
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: Path, card: ModelCard, image_size: int | None,
                    schedule: Schedule) -> Backbone:  # pragma: no cover - abstract
        """The adapter of a pipeline or generator folder (CPU, float32, frozen)."""
        raise NotImplementedError

    @classmethod
    def matches(cls, index: dict[str, Any]) -> bool:
        """Whether a diffusers ``model_index.json`` describes a pipeline of this family."""
        return index.get("_class_name", "") in cls.pipeline_classes

    # -- the denoiser seam ------------------------------------------------------------------------
    def eps(self, unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``unet``'s prediction as eps, under this folder's schedule."""
        return unet_eps(unet, x_t, t, cond, self.schedule)

    @staticmethod
    def bottleneck(unet: nn.Module) -> nn.Module:
        """The module whose output the GAN head classifies (the UNet's mid block)."""
        return unet.mid_block

    # -- prompts ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> the UNet's conditioning: :meth:`encode_tokens` of :meth:`tokenize` (an adapter
        that cannot split the two overrides this instead)."""
        tokens = self.tokenize(prompts)
        if tokens is None:  # pragma: no cover - an adapter implements one or the other
            raise NotImplementedError(f"{type(self).__name__} implements neither tokenize nor encode_prompts")
        return self.encode_tokens(*tokens)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, ...] | None:
        """The host's part of prompt encoding: the tensors :meth:`encode_tokens` reads (token ids, and
        whatever else depends on the prompts' count only), on the device. None: the adapter encodes
        prompts in one piece (:meth:`encode_prompts`), so its encoder cannot join the loop's CUDA graph."""
        return None

    def encode_tokens(self, *tokens: Tensor) -> Conditioning:  # pragma: no cover - with tokenize
        """The device's part: :meth:`tokenize`'s tensors -> the conditioning. Tensor operations only,
        no host round trip (no ``.item()``, no data-dependent shapes), so that a CUDA graph can capture it."""
        raise NotImplementedError

    def text_encoders(self) -> list[nn.Module]:
        """The transformer(s) ``encode_prompts`` runs, for the serving fast path to compile (none: it
        leaves prompt encoding as it is)."""
        return []

    def unconditional(self, batch: int) -> Conditioning:
        """The unconditional ``Conditioning`` for classifier-free guidance (encoding of "")."""
        return self.encode_prompts([""]).index([0] * batch)

    # -- images -----------------------------------------------------------------------------------
    @classmethod
    def size_rule(cls, native: int, width: int, height: int) -> str | None:
        """None when a request for ``width`` x ``height`` can be served, else the rule to quote.

        Latent families render any multiple of 64 from 256 to 2048 per side.
        """
        ok = width % 64 == 0 and height % 64 == 0 and 256 <= min(width, height) and max(width, height) <= MAX_SIDE
        return None if ok else f"multiples of 64 from 256 to {MAX_SIDE} per side"

    @classmethod
    def render_size(cls, native: int, width: int, height: int) -> tuple[int, int]:
        """The size the model renders for a request (then scaled to the request's size)."""
        return width, height

    def shape_for(self, width: int, height: int) -> tuple[int, int, int]:
        """The UNet-space shape that decodes to a ``width`` x ``height`` image."""
        channels, h, _ = self.sample_shape
        factor = self.image_size // h
        return channels, height // factor, width // factor

    def decode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """UNet space -> images in [0, 1], (B, C_img, H_img, W_img), float32."""
        raise NotImplementedError

    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """Images in [-1, 1] -> (mean, std) of their distribution in UNet space, float32."""
        raise NotImplementedError

    # -- export -----------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:  # pragma: no cover - abstract
        """Write the encoders (and VAE) into an exported folder."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """Facts recorded in an exported folder's dmd2.json (image size, encoder source)."""
        return {"image_size": self.image_size, "prediction_type": self.schedule.prediction_type}
