"""The served models as the HTTP process knows them: read from their cards, never loaded.

A server serves one or more generators by name (``--model name=DIR``, the first the default).
Each may have a folder of exported LoRA adapters (``--lora-dir name=DIR``) that requests name;
an adapter is checked against its model from its files the first time a request names it, so
a bad one is refused (422 naming ``lora``) before it is queued, never failing a batch.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..model.adapters import META_FILE, ModelCard, ModelFolderError, adapter, read_card
from ..model.errors import first_line
from ..model.lora import LORA_WEIGHTS, file_stamp, lora_base, lora_problem, unet_weight_shapes
from .schemas import LORA_NAME_PATTERN, SIZE_PATTERN

LORA_NAME = re.compile(LORA_NAME_PATTERN)
# Adapters are checked in the HTTP process's threads, one at a time.
_CHECKING = threading.Lock()


# The weights files the worker loads: each component's default (not a variant like .fp16, not a root
# single-file checkpoint), whole or in shards, and a LoRA export's adapter.
LOADED_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors$")
LOADED_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def check_servable(folder: Path) -> None:
    """Before any worker starts: ModelFolderError for what would fail the worker's load (a teacher, a
    LoRA export whose teacher is not here or that does not fit it, a weights file it reads that is not
    whole safetensors or not readable, a folder this user may not enter), so the operator reads one line
    instead of a worker's traceback."""
    try:
        _check_servable(Path(folder))
    except PermissionError as e:  # a folder saved under umask 077, mounted for another uid
        raise ModelFolderError(f"'{e.filename or folder}' cannot be read by this user (uid {os.getuid()}): give the"
                               " model folder read and search permission (chmod -R a+rX), or run the server as its"
                               " owner") from None


def _check_servable(folder: Path) -> None:
    card = read_card(folder)
    if not card.is_generator:
        raise ModelFolderError(f"'{folder}' is a teacher, not a distilled generator (no recorded schedule)")
    base = lora_base(folder, card)  # raises when the LoRA's teacher or its weights file is missing
    files = [folder / LORA_WEIGHTS] if base is not None else []
    if base is not None:
        read_card(base)  # a folder that is not a diffusers teacher: said as such
        if why := lora_problem(folder, card, unet_weight_shapes(base)):
            raise ModelFolderError(f"'{folder}' cannot adapt its teacher '{base}': {why}")
    for root in (folder, base) if base is not None else (folder,):
        files += [f for part in LOADED_PARTS if (root / part).is_dir()
                  for f in sorted((root / part).iterdir()) if LOADED_WEIGHTS.match(f.name)]
    for weights in files:
        _check_safetensors(weights)


def _check_safetensors(weights: Path) -> None:
    """ModelFolderError unless ``weights`` is readable and its header describes the whole file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt"):  # the header: names, shapes, offsets within the file
            pass
    except PermissionError:
        raise ModelFolderError(f"'{weights}' is not readable by this user (mode {weights.stat().st_mode & 0o777:o}):"
                               " give it read permission (chmod a+r) or run the server as its owner") from None
    except (OSError, SafetensorError) as e:
        raise ModelFolderError(f"'{weights}' is not a readable safetensors file ({first_line(e)}): it is damaged or"
                               " was cut off while copied; copy or export it again") from None


class RequestProblem(ValueError):
    """A request the model cannot serve as asked; names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


class UnknownModel(LookupError):
    """A request for a model this server does not serve: 404, in OpenAI's shape on every route."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"the model '{name}' does not exist on this server; it serves {', '.join(known)}"
                         f" (GET /v1/models lists them; leave model out for {known[0]})")
        self.name = name


class LoraCatalog:
    """The exported LoRAs in one folder, for one model (HTTP process).

    Each sub-folder holding a model card is an adapter named by the folder's name; folders may be
    added while the server runs. The verdict (:func:`~..model.lora.lora_problem`: it fits, and its values are finite) is
    kept per adapter while its card and weights file stay unchanged. The model's UNet shapes are read at
    construction (the main process, at start), so that no request waits for them.
    """

    def __init__(self, folder: Path, model_folder: Path, model_card: ModelCard) -> None:
        self.folder = Path(folder).resolve()
        self.model_card = model_card
        self._unet_shapes = unet_weight_shapes(lora_base(model_folder, model_card) or model_folder)
        self._verdicts: dict[str, tuple[tuple, str | None]] = {}  # name -> (files' stamp, problem or None)

    def names(self) -> list[str]:
        """The adapters in the folder now, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if LORA_NAME.fullmatch(p.name) and (p / META_FILE).is_file())

    def resolve(self, name: str) -> Path:
        """The folder of adapter ``name``, checked against the model; RequestProblem naming ``lora`` if unusable."""
        folder = self.folder / name
        if not LORA_NAME.fullmatch(name) or not (folder / META_FILE).is_file():
            if LORA_NAME.fullmatch(name) and (folder / LORA_WEIGHTS).is_file():
                raise RequestProblem("lora", f"the LoRA adapter '{name}' has {LORA_WEIGHTS} but no {META_FILE} (the"
                                             " card that names its base and schedule): serve adapters exported by a"
                                             " LoRA distillation run (its generator/lora folder)")
            known = self.names()
            listing = f"; it has {', '.join(known[:20])}" if known else "; it has none"
            raise RequestProblem("lora", f"no LoRA adapter named '{name}' for this model{listing}")
        stamp = tuple(file_stamp(folder / f) for f in (META_FILE, LORA_WEIGHTS))
        with _CHECKING:
            verdict = self._verdicts.get(name)
            if verdict is None or verdict[0] != stamp:
                verdict = self._verdicts[name] = (stamp, lora_problem(folder, self.model_card, self._unet_shapes))
        if verdict[1] is not None:
            raise RequestProblem("lora", f"the LoRA adapter does not fit this model: {verdict[1]}")
        return folder


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@dataclass
class ModelFacts:
    """What the HTTP process knows of one served model without loading it (from ``dmd2.json``)."""

    name: str
    family: str
    steps: int
    native: int  # image side in pixels
    folder: Path | None = None
    card: ModelCard | None = None
    loras: LoraCatalog | None = None

    @classmethod
    def read(cls, folder: Path, name: str | None = None, lora_dir: Path | None = None) -> ModelFacts:
        folder = Path(folder)
        card = read_card(folder)
        facts = cls(name or folder.name, card.family, len(card.timesteps or ()), card.image_size or 512, folder, card)
        if lora_dir is not None:
            facts.loras = LoraCatalog(lora_dir, folder, card)
        return facts

    @property
    def created(self) -> int:
        """When the folder was exported (its card's modification time), Unix seconds; 0 if unknown."""
        stamp = _mtime(self.folder / META_FILE) if self.folder is not None else None
        return (stamp or 0) // 10**9

    @property
    def own_lora(self) -> Path | None:
        """A LoRA export served with adapters: its own adapter, which runs beside the teacher's
        weights (not fused into them) so that a request's adapter can take its place."""
        if self.loras is not None and self.card is not None and self.card.base is not None:
            return self.folder
        return None

    def lora_folder(self, name: str) -> Path:
        """The checked folder of the adapter a request names; RequestProblem naming ``lora``."""
        if self.loras is None:
            raise RequestProblem("lora", f"the model '{self.name}' serves no LoRA adapters (the server gives them"
                                         f" with --lora-dir {self.name}=DIR)")
        return self.loras.resolve(name)

    def resolve_size(self, size: str | None) -> tuple[int, int]:
        """(width, height) for a ``WxH`` string, or the native size (None, ``auto``); RequestProblem if unsupported."""
        if size is None or size == "auto":
            return self.native, self.native
        m = SIZE_PATTERN.fullmatch(size)
        if not m:
            raise RequestProblem("size", f"size must look like WIDTHxHEIGHT, e.g. {self.native}x{self.native}")
        w, h = int(m.group(1)), int(m.group(2))
        rule = adapter(self.family).size_rule(self.native, w, h)
        if rule is not None:
            raise RequestProblem("size", f"size {size} is not supported by this model; use {rule}")
        return w, h

    def check_steps(self, steps: int | None) -> None:
        if steps is not None and steps > self.steps:
            raise RequestProblem("steps", f"steps must be at most {self.steps}, the length of the trained schedule")

    def render_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The (width, height) the model draws for a delivered ``size`` (an input image is fitted to it)."""
        return adapter(self.family).render_size(self.native, *size)

    @property
    def image_channels(self) -> int:
        return adapter(self.family).image_channels
