"""Training data: prompts for the generator and captioned real images for the GAN.

Sources:
    the bundled digits: scikit-learn's 8x8 handwritten digits (real scans, shipped inside
        scikit-learn, no download) with varied captions ("a handwritten 7", "the number seven");
    a prompt file: one prompt a line, or JSON lines with a "text" (or "prompt"/"caption") field;
    real images at scale (image folders, WebDataset shards, latent shards): streamed, never held
        whole in memory, in ``datasets.py`` / ``stream.py``.
Every draw takes an explicit ``torch.Generator``, so a run is reproducible step by step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {d}: the numeral, {w}: the word. Several phrasings so the model learns the meaning, not a string.
CAPTION_TEMPLATES = (
    "a handwritten {d}", "the number {w}", "a drawing of a {w}", "the digit {d}", "{d}", "{w}",
    "a handwritten digit {w}", "an image of the number {d}", "a scan of a handwritten {w}",
    "the numeral {d}, written by hand",
)
HELD_OUT_EVERY = 5  # every fifth digit is held out of training, for evaluation
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from .datasets import StreamedImages


def centre_square(image: PILImage, size: int) -> PILImage:
    """The centred square of ``image`` (its shorter side), resized to ``size`` x ``size`` (bicubic)."""
    from PIL import Image

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


class DataError(ValueError):
    """Training data that cannot be used; the message says what to fix."""


def digit_caption(label: int, template: int) -> str:
    """Caption number ``template`` for a digit ``label``."""
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(d=label, w=NUMBER_WORDS[label])


def load_digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) images in [-1, 1] and (N,) labels.

    ``split``: "train" (4 of every 5), "heldout" (the fifth) or "all".
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0 * 2 - 1).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    index = torch.arange(len(labels))
    keep = {"train": index % HELD_OUT_EVERY != 0, "heldout": index % HELD_OUT_EVERY == 0,
            "all": torch.ones_like(index, dtype=torch.bool)}[split]
    return images[keep], labels[keep]


@dataclass
class CaptionedImages:
    """Real images in [-1, 1] (N, C, H, W) with one or more captions each."""

    images: Tensor
    captions: list[list[str]]

    def draw(self, n: int, g: torch.Generator) -> tuple[Tensor, list[str]]:
        """``n`` random indices (with replacement) and one of each image's captions."""
        idx = torch.randint(len(self.images), (n,), generator=g)
        pick = torch.randint(1 << 30, (n,), generator=g)
        caps = [self.captions[i][p % len(self.captions[i])] for i, p in zip(idx.tolist(), pick.tolist())]
        return idx, caps

    def sample(self, n: int, g: torch.Generator) -> tuple[Tensor, list[str]]:
        idx, caps = self.draw(n, g)
        return self.images[idx], caps


class TrainingData:
    """Prompts for the generator and (optionally) real images for the GAN: in memory (the bundled
    digits) or streamed (``StreamedImages``)."""

    def __init__(self, prompts: list[str], real: CaptionedImages | StreamedImages | None) -> None:
        if not prompts:
            raise DataError("the prompt set is empty; give a file with at least one prompt")
        self.prompt_list = prompts
        self.real = real

    def texts(self) -> list[str]:
        """Every text the run may encode: the prompts and the real images' captions."""
        captions = [c for caps in self.real.captions for c in caps] if isinstance(self.real, CaptionedImages) else []
        return self.prompt_list + captions

    def prompts(self, n: int, g: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompt_list), (n,), generator=g)
        return [self.prompt_list[i] for i in idx.tolist()]

    def real_batch(self, n: int, g: torch.Generator) -> tuple[Tensor, list[str]]:
        if not isinstance(self.real, CaptionedImages):
            raise DataError("the GAN needs real images: pass real_images=FOLDER or set gan=false")
        return self.real.sample(n, g)


def digits_data() -> TrainingData:
    """The bundled default: every caption of every digit as prompts; the train split as real data."""
    images, labels = load_digits("train")
    caps = [[digit_caption(int(label), j) for j in range(len(CAPTION_TEMPLATES))] for label in labels]
    prompts = [digit_caption(d, j) for d in range(10) for j in range(len(CAPTION_TEMPLATES))]
    return TrainingData(prompts, CaptionedImages(images, caps))


def prompt_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a prompt file (it is missing, a folder, or an empty file); None otherwise
    (what the file holds is read by :func:`read_prompts`)."""
    if path.is_file():
        return f"prompt file '{path}' is empty; give a file with at least one prompt" if path.stat().st_size == 0 else None
    return f"prompt file '{path}' is a folder: give the file itself" if path.is_dir() else f"prompt file '{path}' does not exist"


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one a line) or JSON lines (``.jsonl`` or ``.json``, any case; each line
    an object with ``text``, ``prompt`` or ``caption``)."""
    if (problem := prompt_file_problem(path)) is not None:
        raise DataError(problem)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first prompt
    except UnicodeDecodeError as e:
        raise DataError(f"prompt file '{path}' is not UTF-8 text (byte {e.start}): give a .txt of prompts, one a"
                        " line, or a .jsonl with a 'text' field") from None
    except OSError as e:  # no read permission (another user's file), an I/O error
        raise DataError(f"prompt file '{path}' cannot be read ({e.strerror}); check its permissions") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"prompt file '{path}' holds no prompts (only blank lines); give at least one")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON: {e}") from e
        text = next((row[k] for k in ("text", "prompt", "caption") if k in row), None) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{n} has no 'text', 'prompt' or 'caption' string")
        prompts.append(text)
    return prompts
