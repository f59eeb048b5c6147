"""Real-scale evaluation of SD-family generators and teachers: FID and CLIP score, local weights only.

The paper's protocol (DMD2, Sec. 5): captions from COCO-2014 val (30k for SD1.5, 10k for SDXL),
one image per caption at the model's resolution, FID against the COCO images, CLIP score of each
image with its caption. Here every piece comes from a path the user gives, nothing is
downloaded:

    captions   a text file, one caption a line, or JSON lines with ``caption`` / ``text`` / ``prompt``;
    reference  a folder of real images (center-cropped to a square and resized to the samples' size);
    inception  the TorchScript FID Inception network used by StyleGAN2-ADA and clean-fid
               (``inception-2015-12-05.pt``), called as ``net(uint8 NCHW, return_features=True)``
               and giving 2048-d pool features; FID itself is torchmetrics' ``FrechetInceptionDistance``;
    clip       (optional) a local CLIP folder for ``transformers.CLIPModel`` / ``CLIPProcessor``
               (e.g. openai/clip-vit-large-patch14 downloaded once); torchmetrics' ``CLIPScore``.

Sample i uses caption i and seed i.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .data import IMAGE_SUFFIXES, centre_square, read_prompts
from .evaluate import Sampler


class EvalError(ValueError):
    """A missing or unusable evaluation input; the message says which and how to fix it."""


@dataclass
class RealScaleScores:
    fid: float
    clip_score: float | None
    images: int
    reference_images: int
    ms_per_image: float

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


class InceptionFeatures(nn.Module):
    """A TorchScript FID feature network as the ``feature`` module torchmetrics' FID expects."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise EvalError(f"Inception weights '{path}' do not exist: pass the TorchScript file"
                            " inception-2015-12-05.pt (the FID network of StyleGAN2-ADA / clean-fid)")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise EvalError(f"'{path}' is not a TorchScript file: {str(e).splitlines()[0]}") from e

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(images, return_features=True).float()


def read_reference(folder: Path, size: int, batch_size: int, limit: int | None = None) -> Iterator[Tensor]:
    """Batches of uint8 (B, 3, size, size) images from a folder, center-cropped and resized."""
    from PIL import Image

    if not Path(folder).is_dir():
        raise EvalError(f"reference image folder '{folder}' does not exist")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise EvalError(f"'{folder}' holds {len(files)} images; FID needs a reference set (COCO val images)")
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start:start + batch_size]:
            image = centre_square(Image.open(path).convert("RGB"), size)
            batch.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3))
        yield torch.stack(batch).permute(0, 3, 1, 2).contiguous()


class _ClipFeatures(nn.Module):
    """A CLIPModel whose ``get_*_features`` return the embedding tensors.

    transformers 5 returns an output object (embeddings in ``pooler_output``) where torchmetrics'
    CLIPScore expects a tensor, as transformers 4 gave.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: object) -> Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args: object, **kwargs: object) -> Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: object, **kwargs: object) -> Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip_score(folder: Path) -> nn.Module:
    """torchmetrics' CLIPScore on a local CLIP folder."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not (Path(folder) / "config.json").is_file():
        raise EvalError(f"'{folder}' is not a CLIP model folder (no config.json): save one with"
                        " CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    return CLIPScore(model_name_or_path=lambda: (_ClipFeatures(CLIPModel.from_pretrained(str(folder)).eval()),
                                                 CLIPProcessor.from_pretrained(str(folder))))


def score_real_scale(sample: Sampler, captions: Path, reference: Path, inception: Path, clip: Path | None = None,
                     num: int | None = None, batch_size: int = 8) -> RealScaleScores:
    """Generate one image per caption and score the set (FID; CLIP score when ``clip`` is given)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    prompts = read_prompts(Path(captions))[:num]
    if len(prompts) < 2:
        raise EvalError(f"'{captions}' holds {len(prompts)} captions; FID needs at least two samples")
    fid = FrechetInceptionDistance(feature=InceptionFeatures(inception), normalize=False)
    clip_metric = load_clip_score(clip) if clip is not None else None
    size = None
    elapsed = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        t0 = time.perf_counter()
        with torch.no_grad():
            images = sample(batch, list(range(start, start + len(batch))))
        elapsed += time.perf_counter() - t0
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = images.shape[-1]
        fid.update(images, real=False)
        if clip_metric is not None:
            clip_metric.update(images, batch)
    count = 0
    for real in read_reference(reference, size, batch_size, limit=None):
        fid.update(real, real=True)
        count += len(real)
    return RealScaleScores(float(fid.compute()), float(clip_metric.compute()) if clip_metric is not None else None,
                           len(prompts), count, 1000 * elapsed / len(prompts))
