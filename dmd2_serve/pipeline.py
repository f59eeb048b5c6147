"""A few-step generator: load an exported folder; prompts and seeds in, images out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .backbones import (
    META_FILE,
    Backbone,
    Conditioning,
    ModelFolderError,
    load_alphas_cumprod,
    load_backbone,
    load_unet,
    read_meta,
    unet_eps,
)
from .sampling import few_step_sample, seeded_noise


class FewStepPipeline:
    """The generator, its prompt encoder and its schedule, ready to sample.

    Args:
        unet: the eps-predicting generator UNet.
        backbone: the family adapter (prompt encoding, decode).
        alphas_cumprod: (T,) of the teacher's scheduler.
        timesteps: the schedule the generator was distilled for, e.g. (999, 749, 499, 249).
        name: a display name (the folder's name when loaded).
    """

    def __init__(
        self, unet: nn.Module, backbone: Backbone, alphas_cumprod: Tensor, timesteps: Sequence[int],
        name: str = "generator",
    ) -> None:
        self.unet = unet
        self.backbone = backbone
        self.alphas_cumprod = alphas_cumprod
        self.timesteps = tuple(int(t) for t in timesteps)
        self.name = name

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> FewStepPipeline:
        """Load a generator folder written by ``dmd2_train`` export."""
        folder = Path(folder)
        meta = read_meta(folder)
        if "timesteps" not in meta:
            raise ModelFolderError(
                f"'{folder}' has no '{META_FILE}' with a recorded schedule: it is a teacher, not a"
                " distilled generator; distil it first with python -m dmd2_train --teacher ..."
            )
        backbone = load_backbone(folder, meta).to(device)
        unet = load_unet(folder).to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(unet, backbone, load_alphas_cumprod(folder), meta["timesteps"], name=folder.name)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def generate_x0(self, cond: Conditioning, seeds: Sequence[int], steps: int | None = None,
                    shape: tuple[int, int, int] | None = None) -> Tensor:
        """Sample in the UNet's space (latents or pixels), one seed per sample, float32.

        ``shape`` (C, H, W) overrides the model's own sample shape (other image sizes).
        """
        timesteps = self.timesteps[: steps or len(self.timesteps)]
        dtype = next(self.unet.parameters()).dtype
        noises = seeded_noise(seeds, shape or self.backbone.sample_shape, len(timesteps), self.device, dtype)
        cond = cond.to(self.device, dtype)

        def eps_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return unet_eps(self.unet, x_t, t, cond)

        return few_step_sample(eps_fn, noises[0], timesteps, self.alphas_cumprod, noises[1:])

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                 shape: tuple[int, int, int] | None = None) -> Tensor:
        """Images in [0, 1], (B, C, H, W), for ``prompts[b]`` drawn from ``seeds[b]``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        cond = self.backbone.encode_prompts(list(prompts))
        return self.backbone.decode(self.generate_x0(cond, seeds, steps, shape))

    @torch.no_grad()
    def generate_padded(self, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                        bucket: int = 8, shape: tuple[int, int, int] | None = None) -> Tensor:
        """Like ``__call__``, but every forward pass holds exactly ``bucket`` samples.

        Short chunks are padded with blank prompts. With one fixed batch shape, a sample's
        pixels do not depend on how many or which other samples share its pass (CPU kernels
        round differently for different batch sizes), and fixed shapes suit CUDA graphs.
        """
        out = []
        for i in range(0, len(prompts), bucket):
            chunk_p, chunk_s = list(prompts[i:i + bucket]), list(seeds[i:i + bucket])
            pad = bucket - len(chunk_p)
            images = self(chunk_p + [""] * pad, chunk_s + [0] * pad, steps, shape)
            out.append(images[: len(chunk_p)])
        return torch.cat(out)
