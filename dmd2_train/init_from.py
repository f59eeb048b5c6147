"""``init_from``: start a run from an earlier run's weights (the paper's two-stage recipe).

Stage 2 of DMD2's SD1.5 recipe starts from stage 1's generator with the GAN turned on. This
module reads the weights only (no optimiser state, no step count) from

* a run folder (its newest checkpoint), or one checkpoint folder ``checkpoints/step_XXXXXXX``:
  the generator (its EMA when the run kept one: the weights it served and exported) and the
  fake score's UNet (the GAN head too when both runs have one);
* an exported generator folder (``dmd2.json`` with a schedule, ``unet/``): the generator only;
  the fake score starts from the teacher, as in a fresh run.

LoRA weights start a LoRA run of the same rank, targets and ``lora_fake``; another ``lora_alpha``
is carried over: B is scaled by (alpha_then / r) / (alpha_now / r), so that ``(alpha / r) B A``,
and with it each network, starts as the earlier run left it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dmd2_serve.model.card import CARD_FILE, ModelCard
from dmd2_serve.model.lora import LORA_WEIGHTS

from . import checkpoint as ckpt
from .config import DistillConfig
from .lora import lora_settings
from .run import RunError

# Which weights to start from: {"generator": state dict, "fake": state dict (optional)}.
InitialWeights = dict[str, dict[str, Tensor]]


def _checkpoint_folder(path: Path) -> Path | None:
    if (path / ckpt.META).is_file():
        return path
    found = ckpt.latest(path)
    return found[1] if found else None


def read_initial_weights(path: Path, cfg: DistillConfig | None = None) -> InitialWeights:
    """The weights ``init_from=path`` names, fitted to the LoRA settings of ``cfg`` (the run they start);
    ``RunError`` with the fix when it names none or they cannot fit."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"init_from '{path}' {'is not a folder' if path.exists() else 'does not exist'}; give a run"
                       " folder, a checkpoint folder (checkpoints/step_XXXXXXX) or an exported generator folder")
    if (path / LORA_WEIGHTS).is_file():
        raise RunError(f"init_from '{path}' is a LoRA export ({LORA_WEIGHTS}); give its run folder to start from"
                       f" its adapters (init_from={path.parent.parent}), or the merged generator beside it"
                       f" (init_from={path.parent})")
    card_path = path / CARD_FILE
    if card_path.is_file() and ModelCard.read(card_path).is_generator:
        from safetensors.torch import load_file

        weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise RunError(f"init_from '{path}' is an exported generator without '{weights.name}' in unet/;"
                           " re-export it or give its run folder")
        return {"generator": load_file(str(weights))}
    folder = _checkpoint_folder(path)
    if folder is None:
        raise RunError(f"init_from '{path}' holds no checkpoint and no exported generator; give a run folder"
                       " (with checkpoints/), a checkpoint folder or a generator folder (with dmd2.json)")
    state = ckpt.read_checkpoint(folder)
    generator = dict(state["generator"])
    if state.get("generator_ema"):  # the weights the run served: its EMA
        generator.update(state["generator_ema"])
    init = {"generator": generator, "fake": dict(state["fake"])}
    then = state["meta"].get("config")
    return fit_lora(init, then, cfg, path) if cfg is not None and isinstance(then, dict) else init


def fit_lora(init: InitialWeights, then: Mapping[str, Any], cfg: DistillConfig, path: Path) -> InitialWeights:
    """``init``, from a run configured as ``then``, for a run configured as ``cfg``: refused when their
    adapters differ in shape, its B weights rescaled when only ``lora_alpha`` differs (module docstring)."""
    old, new = lora_settings(then), lora_settings(cfg.model_dump())
    if not (old["lora_rank"] and new["lora_rank"]):
        return init  # LoRA against full weights: apply_initial_weights says so
    differ = [key for key in ("lora_rank", "lora_targets", "lora_fake") if old[key] != new[key]]
    if differ:
        raise RunError(f"init_from '{path}' was trained with {', '.join(f'{k}={old[k]}' for k in differ)} and this"
                       f" run has {', '.join(f'{k}={new[k]}' for k in differ)}: LoRA weights start a run with the"
                       " same lora_rank, lora_targets and lora_fake; give those (lora_alpha may differ)")
    factor = (old["lora_alpha"] / old["lora_rank"]) / (new["lora_alpha"] / new["lora_rank"])
    if factor == 1:
        return init
    if os.environ.get("RANK", "0") == "0":
        print(f"init_from: lora_alpha {old['lora_alpha']:g} -> {new['lora_alpha']:g}; the adapters' B weights are"
              f" scaled by {factor:g}, so the networks start as that run left them")
    return {net: {k: v * factor if ".lora_B." in k else v for k, v in weights.items()}
            for net, weights in init.items()}


def apply_initial_weights(generator: nn.Module, fake: nn.Module, init: InitialWeights) -> None:
    """Load ``init`` into the freshly built networks (before sharding or wrapping).

    The generator must match exactly; the fake score's UNet too when given, while its GAN head is
    taken only when the earlier run had one of the same shape (stage 1 runs without the GAN).
    """
    ours, theirs = (any("lora_" in k for k in keys) for keys in (generator.state_dict(), init["generator"]))
    if ours != theirs:
        kinds = ("a LoRA", "a full") if theirs else ("a full", "a LoRA")
        raise RunError(f"init_from holds {kinds[0]} generator but this run trains {kinds[1]} one; use the earlier"
                       " run's lora_rank (and lora_targets)")
    try:
        generator.load_state_dict(init["generator"])
        if "fake" in init:
            own = fake.state_dict()
            kept = {k: v for k, v in init["fake"].items() if k in own and own[k].shape == v.shape}
            missing = [k for k in own if k.startswith("unet.") and k not in kept]
            if missing:
                raise RuntimeError(f"the fake score lacks {len(missing)} UNet weights, e.g. {missing[0]}")
            fake.load_state_dict(kept, strict=False)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # torch's: a title, then each key
        raise RunError(f"init_from does not fit this teacher's UNet ({' '.join(lines[:2])[:300]}); give a run or"
                       " generator distilled from the same teacher") from None
