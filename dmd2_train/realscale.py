"""Real-scale evaluation of SD-family generators and teachers: FID, patch-FID and CLIP score, local files only.

The paper's protocol (DMD2, Sec. 5), as the official code runs it (tianweiy/DMD2 8d8fa55,
``main/test_folder_sd.py``, ``main/sdxl/test_folder_sdxl.py``, ``main/coco_eval/coco_evaluator.py``):
one image per COCO-2014 caption (30k for SD1.5 against all of val2014, 10k for SDXL against a
10k subset); FID with clean-fid's preprocessing at 256 px (SD1.5) or 512 px (SDXL) and, for SDXL,
patch-FID on the centre 299x299 of the full image -- see ``fid_protocol`` for each step. CLIP score
(``compute_clip_score``): each image's centre square, Lanczos-resized to 256, then the CLIP model's
own preprocessing; the caption prefixed with "A photo depicts "; the mean cosine similarity of the
two embeddings (not x100, not clipped at 0), with open_clip ViT-g-14 (laion2b_s12b_b42k).

Every piece comes from a path the user gives, nothing is downloaded:

    captions   a text file, one caption a line, or JSON lines with ``caption`` / ``text`` / ``prompt``;
    reference  a folder of real images (searched recursively);
    inception  the TorchScript ``inception-2015-12-05.pt`` of StyleGAN2-ADA / clean-fid;
    clip       (optional) a local CLIP folder for ``transformers.CLIPModel`` / ``CLIPProcessor``
               (laion/CLIP-ViT-g-14-laion2B-s12B-b42K is the paper's model in that format).

Sample i uses caption i and seed i. The output records every setting that changes a number and the
SHA-256 of the network files, so two results say whether they compare.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .data import IMAGE_SUFFIXES, read_prompts
from .evaluate import Sampler
from .fid_protocol import EvalError, FidFeatures, FidProtocol, InceptionFeatures, square

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["ClipScore", "EvalError", "FidProtocol", "RealScaleScores", "read_images", "reference_files",
           "score_real_scale"]


@dataclass
class RealScaleScores:
    fid: float
    patch_fid: float | None
    clip_score: float | None  # mean cosine similarity, as the paper reports it (not x100)
    images: int  # generated
    reference_images: int
    image_size: list[int]  # generated images, (H, W)
    ms_per_image: float  # sampling only
    protocol: dict[str, object]  # FidProtocol.settings(), plus the CLIP score's when there is one
    inputs: dict[str, str | None]  # paths and SHA-256 of the network files

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def sha256_of(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes, one after another in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def to_images(samples: Tensor) -> list[PILImage]:
    """(B, C, H, W) in [-1, 1] -> RGB images, cast to uint8 by truncation as the official evaluation does."""
    from PIL import Image

    pixels = ((samples.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)  # grey -> RGB
    return [Image.fromarray(p) for p in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def reference_files(folder: Path) -> list[Path]:
    """The images of a reference folder (recursive, sorted by path); checked before any sampling."""
    if not Path(folder).is_dir():
        raise EvalError(f"reference image folder '{folder}' does not exist")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise EvalError(f"'{folder}' holds {len(files)} images; FID needs a reference set (COCO val images)")
    return files


def read_rgb(path: Path) -> PILImage:
    """An image file as RGB, as it is on disk."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def read_images(files: Sequence[Path], batch_size: int, pool: Executor | None = None) -> Iterator[list[PILImage]]:
    """Batches of the files as RGB images, decoded on ``pool``'s threads when given."""
    for start in range(0, len(files), batch_size):
        yield list((pool.map if pool is not None else map)(read_rgb, files[start:start + batch_size]))


def _embedding(out: object) -> Tensor:
    """transformers 5 returns an output object (embeddings in ``pooler_output``), 4 a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class ClipScore:
    """Cosine similarity of CLIP image and caption embeddings, preprocessed as the official evaluation does."""

    prefix = "A photo depicts "
    image_resolution = 256

    def __init__(self, folder: Path, resize_filter: str = "lanczos", device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not (Path(folder) / "config.json").is_file():
            what = "does not exist" if not Path(folder).exists() else "is not a CLIP model folder (no config.json)"
            raise EvalError(f"CLIP folder '{folder}' {what}: save one with CLIPModel.save_pretrained and"
                            " CLIPProcessor.save_pretrained (the paper: laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
        self.folder, self.resize_filter, self.device = Path(folder), resize_filter, device
        self.model = CLIPModel.from_pretrained(str(folder)).eval().to(device)
        self.processor = CLIPProcessor.from_pretrained(str(folder))
        self.max_length = self.model.config.text_config.max_position_embeddings

    def weight_files(self) -> list[Path]:
        """The weight files transformers loads: the safetensors ones, else the .bin ones."""
        return sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))

    def settings(self) -> dict[str, object]:
        """The CLIP score's settings, for the output JSON."""
        return {"clip_image_resolution": self.image_resolution, "clip_resize_filter": self.resize_filter,
                "clip_prompt_prefix": self.prefix, "clip_score": "mean cosine similarity"}

    @torch.no_grad()
    def __call__(self, images: Sequence[PILImage], captions: Sequence[str]) -> Tensor:
        """(B,) cosine similarities of each image with its caption."""
        inputs = self.processor(text=[self.prefix + c for c in captions],
                                images=[square(im, self.image_resolution, self.resize_filter) for im in images],
                                return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        image = _embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        text = _embedding(self.model.get_text_features(input_ids=inputs["input_ids"].to(self.device),
                                                       attention_mask=inputs["attention_mask"].to(self.device)))
        return torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=1).cpu()


def score_real_scale(sample: Sampler, captions: Path, reference: Path, inception: Path, clip: Path | None = None,
                     protocol: FidProtocol | None = None, batch_size: int = 8, device: str | torch.device = "cpu",
                     workers: int | None = None) -> RealScaleScores:
    """Generate one image per caption and score the set: FID (and patch-FID) under ``protocol``, CLIP score
    when ``clip`` is given. ``workers`` threads preprocess the images (default: the CPU count, at most 16)."""
    protocol = protocol or FidProtocol()
    prompts = read_prompts(Path(captions))[:protocol.num_images]
    if len(prompts) < 2:
        raise EvalError(f"'{captions}' holds {len(prompts)} captions; FID needs at least two samples")
    references = reference_files(reference)
    with ThreadPoolExecutor(workers or min(16, os.cpu_count() or 1)) as pool:
        features = FidFeatures(InceptionFeatures(inception), protocol, device, pool)
        clip_score = ClipScore(clip, protocol.resize_filter, device) if clip is not None else None
        similarities: list[Tensor] = []
        elapsed, size = 0.0, [0, 0]
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            t0 = time.perf_counter()
            with torch.no_grad():
                samples = sample(batch, list(range(start, start + len(batch))))
            elapsed += time.perf_counter() - t0
            size = list(samples.shape[-2:])
            images = to_images(samples)
            features.add(images, real=False)
            if clip_score is not None:
                similarities.append(clip_score(images, batch))
        for images in read_images(references, max(batch_size, 32), pool):
            features.add(images, real=True)
    inputs = {"captions": str(captions), "reference": str(reference), "inception": str(inception),
              "inception_sha256": sha256_of([Path(inception)]), "clip": None if clip is None else str(clip),
              "clip_weights_sha256": None}
    settings = protocol.settings()
    if clip_score is not None:
        weights = clip_score.weight_files()
        inputs["clip_weights_sha256"] = sha256_of(weights) if weights else None
        settings.update(clip_score.settings())
    return RealScaleScores(
        fid=features.fid(), patch_fid=features.fid(patch=True) if protocol.patch_fid else None,
        clip_score=float(torch.cat(similarities).mean()) if similarities else None,
        images=len(prompts), reference_images=features.count(real=True), image_size=size,
        ms_per_image=1000 * elapsed / len(prompts), protocol=settings, inputs=inputs)
