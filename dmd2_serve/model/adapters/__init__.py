"""The backbone adapters' registry: which family a folder is, and loading its parts.

Adding a family is one new adapter file (a :class:`~.base.Backbone` subclass) plus its line in
``ADAPTERS`` below; nothing outside this package knows family names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..card import CARD_FILE as META_FILE
from ..card import ModelCard
from ..schedule import Schedule
from .base import Backbone, Conditioning, ModelFolderError, PaperEval, ReferenceArch, unet_eps, unet_prediction
from .digits import DigitsBackbone
from .sd import LatentBackbone, StableDiffusionBackbone, load_part
from .sdxl import StableDiffusionXLBackbone
from .single_file import is_single_file

ADAPTERS: dict[str, type[Backbone]] = {a.family: a for a in (DigitsBackbone, StableDiffusionBackbone,
                                                              StableDiffusionXLBackbone)}

# Families people bring that the project does not distil, by what gives them away in model_index.json.
UNSUPPORTED = {"StableDiffusion3Pipeline": "SD3 (flow matching)", "FluxPipeline": "Flux (flow matching)",
               "PixArtAlphaPipeline": "PixArt (a transformer)", "PixArtSigmaPipeline": "PixArt (a transformer)",
               "KandinskyV22Pipeline": "Kandinsky 2.2", "StableCascadePriorPipeline": "Stable Cascade",
               "LatentConsistencyModelPipeline": "an LCM pipeline"}

__all__ = ["ADAPTERS", "META_FILE", "Backbone", "Conditioning", "LatentBackbone", "ModelFolderError", "PaperEval", "ReferenceArch",
           "ModelCard", "adapter", "checkpoint_adapter", "is_single_file", "load_backbone", "load_schedule",
           "load_single_file", "load_unet", "read_card", "supported", "teacher_adapter", "unet_eps", "unet_prediction"]


def supported() -> str:
    """The supported families, for messages."""
    return "; ".join(f"{a.title} ({', '.join(a.pipeline_classes) or 'bundled'})" for a in ADAPTERS.values())


def adapter(family: str) -> type[Backbone]:
    """The adapter class of a family id (as written in dmd2.json)."""
    if family not in ADAPTERS:
        raise ModelFolderError(f"unknown model family {family!r}; supported: {supported()}")
    return ADAPTERS[family]


def checkpoint_adapter(path: Path) -> tuple[type[Backbone], str]:
    """The adapter of a single-file checkpoint and diffusers' model type of it (``v1``, ``xl_base`` ...)."""
    from .single_file import checkpoint_adapter as detect

    return detect(Path(path), list(ADAPTERS.values()))


def load_single_file(path: Path, config: Path | None) -> Any:
    """A single-file checkpoint as a diffusers pipeline, its configs and tokenizers from the local
    folder ``config``; refused with one line when it is not a supported family."""
    from .single_file import load_single_file as load

    return load(Path(path), config, list(ADAPTERS.values()))


def teacher_adapter(path: Path) -> type[Backbone]:
    """The adapter of a teacher: a diffusers folder, an exported generator or a single file."""
    return checkpoint_adapter(path)[0] if is_single_file(path) else adapter(read_card(path).family)


def _family_of_index(folder: Path, index: dict[str, Any]) -> str:
    name = index.get("_class_name", "")
    if name in UNSUPPORTED or "transformer" in index:
        what = UNSUPPORTED.get(name, f"{name or 'a pipeline'} with a transformer backbone")
        raise ModelFolderError(f"'{folder}' is {what}, which is not supported; supported teachers: {supported()}")
    for cls in ADAPTERS.values():
        if cls.matches(index):
            return cls.family
    raise ModelFolderError(f"'{folder}' holds a {name or 'pipeline of unknown class'}, which is not supported;"
                           f" supported teachers: {supported()}")


def read_card(folder: Path) -> ModelCard:
    """The folder's model card: its ``dmd2.json``, or for a stock diffusers folder the family its
    ``model_index.json`` names (checked against the parts that family needs)."""
    folder = Path(folder)
    if folder.is_file():
        raise ModelFolderError(
            f"'{folder}' is a file, not a model folder; a single-file checkpoint is a teacher for"
            " python -m dmd2_train --teacher FILE.safetensors --teacher-config DIR, which converts it to a folder"
        )
    if not folder.is_dir():
        raise ModelFolderError(
            f"model folder '{folder}' does not exist or is not a directory; pass the path of a"
            " diffusers-format Stable Diffusion 1.x / 2.x / SDXL folder (a teacher), or of an exported generator (to"
            " serve it, or to start training from it with init_from)"
        )
    meta_path = folder / META_FILE
    if meta_path.is_file():
        card = ModelCard.read(meta_path)
        if card.family not in ADAPTERS:
            raise ModelFolderError(f"'{meta_path}' names family {card.family!r}; expected one of {', '.join(ADAPTERS)}")
        return card
    index_path = folder / "model_index.json"
    if not index_path.is_file() and (folder / "generator" / META_FILE).is_file():
        raise ModelFolderError(f"'{folder}' is a training run's folder; its exported generator is"
                               f" '{folder / 'generator'}'")
    if not index_path.is_file():
        raise ModelFolderError(
            f"'{folder}' has neither {META_FILE} nor model_index.json, so it is not a diffusers"
            " pipeline folder; point at the folder that holds model_index.json, unet/, vae/ ..."
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"'{index_path}' is not valid JSON ({e})") from e
    family = _family_of_index(folder, index)
    for part in ADAPTERS[family].parts:
        if not (folder / part).is_dir():
            raise ModelFolderError(f"'{folder}' is missing the '{part}/' sub-folder a {ADAPTERS[family].title}"
                                   " pipeline needs")
    return ModelCard(family=family)


def load_schedule(folder: Path, card: ModelCard | None = None) -> Schedule:
    """The folder's noise schedule and prediction type (and a generator's recorded steps); a card
    whose prediction type disagrees with the scheduler's is refused."""
    card = card or read_card(folder)
    schedule = Schedule.from_folder(folder, tuple(card.timesteps or ()))
    if (Path(folder) / META_FILE).is_file() and card.prediction_type != schedule.prediction_type:
        raise ModelFolderError(f"'{Path(folder) / META_FILE}' says prediction_type {card.prediction_type!r} but the"
                               f" scheduler config says {schedule.prediction_type!r}; re-export the folder")
    return schedule


def load_backbone(folder: Path, card: ModelCard | None = None, image_size: int | None = None) -> Backbone:
    """Build the adapter for a teacher or generator folder (CPU, float32, frozen)."""
    folder = Path(folder)
    card = card or read_card(folder)
    return adapter(card.family).from_folder(folder, card, image_size, load_schedule(folder, card))


def load_unet(folder: Path) -> nn.Module:
    """The folder's ``unet/`` as a diffusers ``UNet2DConditionModel`` (float32; fp16 variants too)."""
    from diffusers import UNet2DConditionModel

    try:
        return load_part(UNet2DConditionModel, folder, "unet")
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"could not load '{Path(folder) / 'unet'}': {e}") from e
