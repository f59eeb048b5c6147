"""A generator exported as a LoRA: the adapter file plus the teacher it adapts.

A LoRA export folder (``run/generator/lora/``) holds

    pytorch_lora_weights.safetensors   the adapter in diffusers' format (``pipe.load_lora_weights``)
    dmd2.json                          family, the few-step timesteps, ``base`` (the teacher folder)
                                       and ``lora`` (rank, alpha, targets)

so it is a model folder of its own: :func:`lora_base` says which teacher supplies the encoders,
VAE and base UNet, and :func:`fused_lora_unet` is that UNet with the adapter fused into its
weights, as stock diffusers' ``load_lora_weights`` + ``fuse_lora`` give it. The exporter builds
the merged generator folder with the same function, so both forms serve the same weights.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .adapters import META_FILE, ModelCard, ModelFolderError, load_unet

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def lora_base(folder: Path, card: ModelCard) -> Path | None:
    """The teacher folder a LoRA export adapts (None for a full generator folder).

    Raises ``ModelFolderError`` when the recorded teacher or the adapter file is not there.
    """
    if card.base is None:
        return None
    folder, base = Path(folder), Path(card.base)
    if not (folder / LORA_WEIGHTS).is_file():
        raise ModelFolderError(f"'{folder}' is a LoRA export without its '{LORA_WEIGHTS}'; export the run again")
    if not base.is_dir():
        raise ModelFolderError(
            f"'{folder}' is a LoRA on the teacher '{base}', which is not on this machine: put the teacher"
            f" there or set 'base' in '{folder / META_FILE}' to its folder (or serve the merged generator, the"
            " folder above it)")
    return base


def fused_lora_unet(base: Path, lora: Path) -> nn.Module:
    """``base``'s UNet (float32) with the LoRA in ``lora/`` fused into its weights, adapter layers removed."""
    unet = load_unet(base)
    try:
        unet.load_lora_adapter(str(lora), prefix="unet", weight_name=LORA_WEIGHTS)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelFolderError(f"could not apply the LoRA in '{lora}' to the UNet of '{base}': "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    unet.fuse_lora()
    unet.unload_lora()
    return unet
