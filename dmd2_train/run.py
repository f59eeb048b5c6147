"""What a run needs that is not DMD2: the run folder, the accelerator, prompt encoding, real data.

Kept apart from ``loop.py`` so the loop reads top to bottom, and shared with the digits teacher's
trainer and the training benchmark.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dmd2_serve.model.adapters import Backbone, Conditioning

from .config import DistillConfig
from .data import TrainingData, digits_data, read_image_folder, read_prompts
from .step import RealBatch


class RunError(RuntimeError):
    """A run that cannot start or go on (bad output folder, missing data, out of memory); the
    message says why and what to do."""


def check_output_folder(out: Path) -> None:
    """Fail early, with a clear message, when the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder '{out}' ({e.strerror}); pass --out DIR with a writable folder") from None


def make_accelerator(cfg: DistillConfig) -> Any:
    """accelerate's ``Accelerator`` for the run: precision, trackers, the run folder."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "wandb" in cfg.log_with:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RunError("log_with includes wandb, which is not installed: pip install 'dmd2-fast[wandb]',"
                           " or log_with=[tensorboard]") from None
    return Accelerator(
        mixed_precision=precision, cpu=not cuda, log_with=list(cfg.log_with) or None,
        # DDP's gradients live in its all-reduce buckets instead of beside them (one copy, not two)
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)],
        project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "logs")),
    )


class PromptEncoder:
    """Encodes prompts with the backbone; a known set is encoded once, up front, kept on the host.

    Encoding the known set in one fixed order (not lazily, batch by batch) keeps a resumed run
    bit-identical: the same text always gets the same bits. The cache lives in (pinned) host
    memory, not on the GPU: 8,192 SDXL prompts are 5 GB at float32.
    """

    def __init__(self, backbone: Backbone, known: list[str] | None = None, chunk: int = 256) -> None:
        self.backbone = backbone
        self.cache: dict[str, Conditioning] = {}
        pin = backbone.device.type == "cuda"
        texts = sorted(set(known or []))
        for i in range(0, len(texts), chunk):
            part = texts[i:i + chunk]
            enc = backbone.encode_prompts(part).to("cpu")
            for j, p in enumerate(part):
                row = enc.index(slice(j, j + 1))
                self.cache[p] = row.pin_memory() if pin else Conditioning(row.hidden.clone(), {
                    k: v.clone() for k, v in row.added.items()})

    def __call__(self, prompts: list[str]) -> Conditioning:
        """Encoded prompts on the backbone's device."""
        if all(p in self.cache for p in prompts):
            return Conditioning.cat([self.cache[p] for p in prompts]).to(self.backbone.device, non_blocking=True)
        return self.backbone.encode_prompts(prompts)


class RealLatents:
    """Real images encoded ONCE into their latent distribution (mean, std), kept on the host.

    Each use draws a fresh sample ``mean + std * z`` (what ``latent_dist.sample()`` would give)
    on the training device, so the VAE encoder never runs inside the loop. Encoded in fixed
    chunks, so the numbers do not depend on when a run started or resumed.
    """

    def __init__(self, backbone: Backbone, images: Tensor, chunk: int = 16) -> None:
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), chunk):
                mean, std = backbone.encode_distribution(images[i:i + chunk].to(backbone.device))
                means.append(mean.cpu())
                stds.append(std.cpu())
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        if backbone.device.type == "cuda":
            self.mean, self.std = self.mean.pin_memory(), self.std.pin_memory()

    def sample(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Samples of images ``idx`` on ``g``'s device, (B, C, H, W) float32."""
        mean = self.mean[idx].to(g.device, non_blocking=True)
        std = self.std[idx].to(g.device, non_blocking=True)
        return mean + std * torch.randn(mean.shape, generator=g, device=g.device)


class RunBatches:
    """A run's conditioning and real data: prompts drawn from the prompt set, encoded; real
    images with their captions for the GAN."""

    def __init__(self, data: TrainingData, encode: PromptEncoder, backbone: Backbone) -> None:
        self.data, self.encode = data, encode
        self.latents = RealLatents(backbone, data.real.images) if data.real is not None else None

    def prompts(self, n: int, g: torch.Generator) -> Conditioning:
        return self.encode(self.data.prompts(n, g))

    def real(self, n: int, g: torch.Generator, device_g: torch.Generator) -> RealBatch:
        if self.data.real is None or self.latents is None:
            raise RunError("the GAN needs real images: pass real_images=FOLDER, or gan=false")
        idx, captions = self.data.real.draw(n, g)
        return RealBatch(self.latents.sample(idx, device_g), self.encode(captions))


def make_data(cfg: DistillConfig, backbone: Backbone) -> TrainingData:
    """The family's bundled data (digits) when no data is given, otherwise the prompt file and images."""
    if backbone.bundled_data and cfg.prompts is None and cfg.real_images is None:
        return digits_data()
    if cfg.prompts is None:
        raise RunError("this teacher needs a prompt set: pass prompts=FILE (a .txt or .jsonl of captions)")
    real = None
    if cfg.gan or not cfg.backward_simulation:
        if cfg.real_images is None:
            raise RunError("the GAN needs real images: pass real_images=FOLDER, or gan=false")
        real = read_image_folder(cfg.real_images, cfg.image_size or backbone.image_size, backbone.image_channels)
    return TrainingData(read_prompts(cfg.prompts), real)
