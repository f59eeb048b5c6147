"""A generator exported as a LoRA: the adapter file plus the teacher it adapts.

A LoRA export folder (``run/generator/lora/``) holds

    pytorch_lora_weights.safetensors   the adapter in diffusers' format (``pipe.load_lora_weights``)
    dmd2.json                          family, the few-step timesteps, ``base`` (the teacher folder)
                                       and ``lora`` (rank, alpha, targets)

so it is a model folder of its own: :func:`lora_base` says which teacher supplies the encoders,
VAE and base UNet, and :func:`fused_lora_unet` is that UNet with the adapter fused into its
weights, as stock diffusers' ``load_lora_weights`` + ``fuse_lora`` give it. The exporter builds
the merged generator folder with the same function, so both forms serve the same weights.

A server may also add exported LoRAs to a loaded UNet per batch, beside its weights
(:class:`LoraAdapters`), after :func:`lora_mismatch` has checked from the files alone that an
adapter fits the model.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from .adapters import META_FILE, ModelCard, ModelFolderError, load_unet, read_card
from .errors import first_line

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
# What diffusers, peft and safetensors raise for a LoRA file that is damaged or does not fit.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
NONFINITE = "'{key}' holds NaN or infinite values (its training diverged); export it from an earlier checkpoint"
_LORA_KEY = re.compile(r"unet\.(.+)\.lora_([AB])\.weight")  # diffusers' UNet LoRA tensors, peft-named


def lora_base(folder: Path, card: ModelCard) -> Path | None:
    """The teacher folder a LoRA export adapts (None for a full generator folder); a relative ``base``
    in the card is relative to the card's folder.

    Raises ``ModelFolderError`` when the recorded teacher or the adapter file is not there.
    """
    if card.base is None:
        return None
    folder = Path(folder)
    base = folder / card.base  # a relative base (a card edited by hand) is read from the card's folder
    if not (folder / LORA_WEIGHTS).is_file():
        raise ModelFolderError(f"'{folder}' is a LoRA export without its '{LORA_WEIGHTS}'; export the run again")
    if not base.is_dir():
        raise ModelFolderError(
            f"'{folder}' is a LoRA on the teacher '{base}', which is not on this machine: put the teacher"
            f" there or set 'base' in '{folder / META_FILE}' to its folder (or serve the merged generator, the"
            " folder above it)")
    return base


def nonfinite_tensor(lora: Path) -> str | None:
    """The first tensor of the adapter in ``lora/`` that holds a NaN or an infinity (None: none does),
    read one tensor at a time. Raises ``OSError`` or ``SafetensorError`` for a file that does not read."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(lora) / LORA_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle: not iterable itself)
            if not torch.isfinite(f.get_tensor(key)).all():
                return key
    return None


def check_finite(lora: Path) -> None:
    """Raises ``ModelFolderError`` when the adapter in ``lora/`` does not read or holds a NaN or an
    infinity (a run that diverged before the training loop checked for it: every image black)."""
    try:
        key = nonfinite_tensor(lora)
    except (OSError, SafetensorError) as e:
        raise ModelFolderError(f"'{Path(lora) / LORA_WEIGHTS}' is not a readable safetensors file"
                               f" ({first_line(e)})") from None
    if key is not None:
        raise ModelFolderError(f"the LoRA in '{lora}' is broken: {NONFINITE.format(key=key)}")


def fused_lora_unet(base: Path, lora: Path) -> nn.Module:
    """``base``'s UNet (float32) with the LoRA in ``lora/`` fused into its weights, adapter layers removed."""
    check_finite(lora)
    unet = load_unet(base)
    try:
        unet.load_lora_adapter(str(lora), prefix="unet", weight_name=LORA_WEIGHTS)
    except LOAD_ERRORS as e:
        raise ModelFolderError(f"could not apply the LoRA in '{lora}' to the UNet of '{base}': {first_line(e)}") from None
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def file_stamp(path: Path) -> tuple[int, int, int]:
    """A file as (inode, modification time in ns, size), to see that it changed; zeros when it is gone.
    An export replaces its folder by a rename, so the inode changes even where times are coarse."""
    try:
        st = Path(path).stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def unet_weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of the UNet in ``folder/unet``, from its config alone (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(folder) / "unet"))
    return {name: tuple(p.shape) for name, p in unet.named_parameters()}


def lora_mismatch(lora: Path, model: ModelCard, unet_shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Why the exported LoRA in ``lora`` cannot adapt a model with card ``model`` (None: it can).

    It must be of the model's family and prediction type and distilled for the model's
    timesteps (else its images are not those it was trained to make), and each of its tensors
    must fit a module of the model's UNet (``unet_shapes``, see :func:`unet_weight_shapes`):
    ``lora_A`` (rank, in, ...) and ``lora_B`` (out, rank, ...) beside a weight (out, in, ...).
    Reads the card and the safetensors header, no weights.
    """
    from safetensors import safe_open

    lora = Path(lora)
    try:
        card = read_card(lora)
    except ModelFolderError:
        return f"'{lora.name}' has no readable model card ({META_FILE}); export it again"
    if card.base is None or not (lora / LORA_WEIGHTS).is_file():
        return f"'{lora.name}' is not an exported LoRA (a '{LORA_WEIGHTS}' beside a card that names its base)"
    for field in ("family", "prediction_type", "timesteps"):
        theirs, ours = getattr(card, field), getattr(model, field)
        if theirs != ours:
            return f"'{lora.name}' was made for {field} {theirs!r} but this model has {ours!r}"
    try:
        with safe_open(str(lora / LORA_WEIGHTS), framework="pt") as f:
            keys = f.keys()  # a safetensors handle: not iterable itself
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
    except (OSError, SafetensorError) as e:
        return f"'{lora.name}/{LORA_WEIGHTS}' is not a readable safetensors file ({first_line(e)})"
    if not shapes:
        return f"'{lora.name}/{LORA_WEIGHTS}' holds no tensors"
    ranks: dict[str, dict[str, int]] = {}  # module -> {"A": rank it writes, "B": rank it reads}
    for key, shape in shapes.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            return f"'{lora.name}' holds '{key}', which is not a UNet LoRA tensor (unet.<module>.lora_A/B.weight)"
        module, half = m.groups()
        weight = unet_shapes.get(f"{module}.weight")
        if weight is None:
            return f"'{lora.name}' adapts '{module}', which this model's UNet does not have: it was made for another base"
        side = 1 if half == "A" else 0  # A reads the module's input features, B writes its output features
        if len(shape) != len(weight) or shape[side] != weight[side]:
            return (f"'{lora.name}' does not fit this model's UNet: '{key}' is {list(shape)} beside a weight of"
                    f" {list(weight)}; it was made for another base")
        ranks.setdefault(module, {})[half] = shape[0] if half == "A" else shape[1]
    for module, rank in ranks.items():
        if rank.get("A") != rank.get("B"):
            return f"'{lora.name}' is damaged: the lora_A and lora_B of '{module}' do not pair (ranks {rank})"
    return None


def lora_problem(lora: Path, model: ModelCard, unet_shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Why the adapter in ``lora`` cannot serve with a model (None: it can): its files do not fit
    (:func:`lora_mismatch`, header and card only), or, read whole, a value is NaN or infinite."""
    problem = lora_mismatch(lora, model, unet_shapes)
    if problem is not None:
        return problem
    try:
        key = nonfinite_tensor(lora)
    except (OSError, SafetensorError) as e:
        return f"'{Path(lora).name}/{LORA_WEIGHTS}' is not a readable safetensors file ({first_line(e)})"
    return None if key is None else f"'{Path(lora).name}' is broken: {NONFINITE.format(key=key)}"


class LoraAdapters:
    """Exported LoRAs added to one UNet as named peft adapters, one active at a time.

    An adapter is loaded on first use and kept; at most ``capacity`` stay loaded, and loading
    one more deletes the least recently used. Adapters sit beside the UNet's weights, never
    fused into them, so switching adapters or scales leaves the base weights bit-exact.
    """

    def __init__(self, unet: nn.Module, capacity: int = 4) -> None:
        if capacity < 1:
            raise ValueError("the LoRA cache must hold at least 1 adapter")
        self.unet, self.capacity = unet, capacity
        self.active: tuple[Path, float] | None = None  # (adapter folder, scale), None: the UNet alone
        self._names: OrderedDict[Path, str] = OrderedDict()  # folder -> peft adapter name, least recent first
        self._stamps: dict[Path, tuple[int, int, int]] = {}  # folder -> its weights file's file_stamp when loaded
        self._made = 0

    @property
    def loaded(self) -> list[Path]:
        """The adapters loaded now, least recently used first."""
        return list(self._names)

    def activate(self, folder: Path | None, scale: float = 1.0) -> bool:
        """Run the UNet with the adapter in ``folder`` at ``scale`` (None: the UNet alone).

        Returns whether the adapter had to be loaded; ``ModelFolderError`` when it cannot be.
        """
        wanted = None if folder is None else (Path(folder), float(scale))
        # before any load: a file replaced during it shows at the next call
        stamp = None if wanted is None else file_stamp(wanted[0] / LORA_WEIGHTS)
        if wanted is not None and wanted[0] in self._names and stamp != self._stamps[wanted[0]]:
            self._delete(self._names.pop(wanted[0]))  # exported again into the same folder: load it anew
            if self.active is not None and self.active[0] == wanted[0]:
                self.active = None
        if wanted == self.active:  # as the last batch ran: no walk over the UNet's modules
            if wanted is not None:
                self._names.move_to_end(wanted[0])
            return False
        if wanted is None:
            self._run_alone()
            return False
        folder = wanted[0]
        loading = folder not in self._names
        if loading:
            try:
                check_finite(folder)  # before any adapter is evicted for it
            except ModelFolderError:
                self._run_alone()
                raise
            while len(self._names) >= self.capacity:
                evicted, old = self._names.popitem(last=False)
                self._stamps.pop(evicted, None)
                self._delete(old)
            name = f"lora{self._made}"  # peft names key module dicts: the folder's name may not be one
            self._made += 1
            try:
                with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
                    warnings.simplefilter("ignore", UserWarning)
                    self.unet.load_lora_adapter(str(folder), prefix="unet", weight_name=LORA_WEIGHTS,
                                                adapter_name=name)
            except LOAD_ERRORS as e:
                self._delete(name)  # whatever part of it was added
                self._run_alone()
                raise ModelFolderError(f"could not add the LoRA in '{folder}' to the UNet: {first_line(e)}") from None
            self._names[folder], self._stamps[folder] = name, stamp
        self._names.move_to_end(folder)
        self.unet.enable_lora()
        self.unet.set_adapters([self._names[folder]], [float(scale)])
        self.active = (folder, float(scale))
        return loading

    def _run_alone(self) -> None:
        """The UNet alone: asked for, or the known state after a failed load (peft may have made a
        remaining adapter active)."""
        if self._names:
            self.unet.disable_lora()
        self.active = None

    def _delete(self, name: str) -> None:
        if name in getattr(self.unet, "peft_config", {}):
            with warnings.catch_warnings():  # peft warns when the active adapter goes; the next batch sets one
                warnings.simplefilter("ignore", UserWarning)
                self.unet.delete_adapters(name)
