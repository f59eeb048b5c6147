"""The model card: a folder's ``dmd2.json``, read and written through one pydantic model.

A teacher folder made by stock diffusers has no card (its family comes from ``model_index.json``);
the bundled digits teacher, every exported generator and every exported LoRA have one. The
export, the digits teacher's writer, the pipeline loader, the HTTP process and both command lines
go through :class:`ModelCard`, so an old or hand-edited card with a missing or wrong field fails
at start with a message that names the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ModelFolderError

CARD_FILE = "dmd2.json"
CARD_VERSION = 1


class LoraFacts(BaseModel):
    """How a generator's LoRA was made (rank, alpha, the adapted modules) and where it lies."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    targets: list[str]
    path: str | None = Field(None, description="the adapter's folder, relative to the generator folder")


class ModelCard(BaseModel):
    """Everything a folder says about itself beyond the diffusers files.

    Attributes:
        version: the card format (1).
        family: the backbone adapter's id (``digits``, ``sd15``, ``sdxl``).
        image_size: the image side in pixels the model renders natively.
        prediction_type: what the UNet predicts (``epsilon`` or ``v_prediction``).
        timesteps: a generator's few-step schedule; None for a teacher.
        text_encoder: where the text encoder comes from when it is not in the folder.
        teacher, base: where it was distilled from (provenance); a LoRA card's teacher folder.
        lora: the LoRA's facts, when the generator was trained as one.
        steps_trained, updates, world_size, guidance_scale, ema_decay: training facts.
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = CARD_VERSION
    family: str
    image_size: int | None = Field(None, gt=0)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    timesteps: list[int] | None = Field(None, min_length=1)
    text_encoder: str | None = None
    teacher: str | None = None
    base: str | None = None
    lora: LoraFacts | None = None
    steps_trained: int | None = Field(None, ge=0)
    updates: dict[str, int] | None = None
    world_size: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    ema_decay: float | None = Field(None, ge=0, lt=1)

    @field_validator("timesteps")
    @classmethod
    def _decreasing(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (any(t < 0 for t in v) or any(a <= b for a, b in zip(v, v[1:]))):
            raise ValueError("must be strictly decreasing non-negative integers, e.g. [999, 749, 499, 249]")
        return v

    @property
    def is_generator(self) -> bool:
        """Whether the folder is a distilled generator (it records its schedule)."""
        return self.timesteps is not None

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Parse ``path`` (a dmd2.json); ``ModelFolderError`` naming every bad field."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"'{path}' is not a readable JSON model card ({e}); re-export the folder") from None
        if not isinstance(data, dict):
            raise ModelFolderError(f"'{path}' must hold a JSON object (the model card); re-export the folder")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(_problem(err) for err in e.errors())
            raise ModelFolderError(f"'{path}' has a bad model card: {problems}; fix the field or re-export the"
                                   " folder") from None

    def write(self, folder: Path) -> Path:
        """Write ``folder/dmd2.json`` atomically (fields that are not set are left out)."""
        path = Path(folder) / CARD_FILE
        tmp = path.with_name(f".{CARD_FILE}.{os.getpid()}")
        tmp.write_text(self.model_dump_json(indent=2, exclude_none=True))
        os.replace(tmp, path)
        return path


def _problem(err: dict) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "card"
    if err["type"] == "missing":
        return f"field '{field}' is missing"
    if err["type"] == "extra_forbidden":
        return f"field '{field}' is not a model card field"
    return f"field '{field}': {err['msg']} (got {err.get('input')!r})"
