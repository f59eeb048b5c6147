"""LoRA networks: a peft adapter on a frozen copy of the teacher, and its diffusers export.

With ``lora_rank = r > 0`` each targeted linear layer computes (LoRA, Hu et al. 2021, Eq. 3)

    h = W0 x + (alpha / r) * B A x        W0 frozen (the teacher's), A: (r, in), B: (out, r)

B starts at zero, so the generator starts as the teacher, exactly as in full fine-tuning. Only A
and B (float32) train and sit in the optimiser and the EMA; W0 stays in the real score's dtype
(bf16 on GPU with bf16 mixed precision: autocast runs the matmuls in bf16 either way).

The adapter goes in through diffusers' PEFT integration (``unet.add_adapter``), the way diffusers'
own LoRA training scripts do it, and the export is what they write: the peft state dict saved by
the pipeline class's ``save_lora_weights``, which stock diffusers loads with
``pipe.load_lora_weights(folder)``. The file holds no alpha (older diffusers and other tools read
none), so the scale ``alpha / r`` is folded into B: it loads with the same output anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmd2_serve.model.errors import first_line
from dmd2_serve.model.lora import LORA_WEIGHTS

from .config import ConfigError, DistillConfig

ADAPTER = "default"  # peft's adapter name: the state dict's keys carry it (``to_q.lora_A.default.weight``)
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_fake", "lora_targets")


def effective_alpha(rank: int, alpha: float | None) -> float:
    """``lora_alpha`` as it acts: unset (null) is the rank, so the adapter's scale alpha / r is 1."""
    return float(alpha or rank)


def lora_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's LoRA settings (a config, or the one a checkpoint keeps) as they act: ``lora_rank`` 0 alone
    for a run that trains every weight, ``lora_alpha`` as a number (null: the rank), targets sorted."""
    rank = int(config.get("lora_rank") or 0)
    if not rank:
        return {"lora_rank": 0}
    targets = config.get("lora_targets") or DistillConfig.model_fields["lora_targets"].default
    return {"lora_rank": rank, "lora_alpha": effective_alpha(rank, config.get("lora_alpha")),
            "lora_fake": bool(config.get("lora_fake")), "lora_targets": sorted(targets)}


def lora_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The LoRA settings that differ between two configs, as 'key old -> new'."""
    old, new = lora_settings(before), lora_settings(after)
    return [f"{key} {old.get(key)} -> {new.get(key)}" for key in LORA_KEYS if old.get(key) != new.get(key)]


@dataclass(frozen=True)
class LoraSpec:
    """The adapter of a LoRA run: rank, alpha and the targeted module names."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    @classmethod
    def of(cls, cfg: DistillConfig) -> LoraSpec | None:
        """The run's adapter, or None when it trains every weight (``lora_rank = 0``)."""
        if not cfg.lora_rank:
            return None
        return cls(cfg.lora_rank, effective_alpha(cfg.lora_rank, cfg.lora_alpha), tuple(cfg.lora_targets))

    @property
    def scale(self) -> float:
        """alpha / r, the factor on B A x."""
        return self.alpha / self.rank

    def add_to(self, unet: nn.Module, base_dtype: torch.dtype = torch.float32) -> nn.Module:
        """Freeze ``unet`` (its weights cast to ``base_dtype``) and add a trainable float32 adapter, in place.

        Initialised as diffusers' LoRA scripts do (``init_lora_weights="gaussian"``: A ~ N(0, 1/r),
        B = 0), so the network starts as it was.
        """
        from peft import LoraConfig

        unet.requires_grad_(False)
        try:
            unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                                        target_modules=list(self.targets)), adapter_name=ADAPTER)
        except ValueError as e:
            raise ConfigError(f"lora_targets {list(self.targets)} do not fit this UNet ({first_line(e)});"
                              " use module names such as to_q, to_k, to_v, to_out.0 (attention), proj_in, proj_out,"
                              " ff.net.0.proj, ff.net.2") from None
        for p in unet.parameters():  # after add_adapter: peft gives an adapter its base layer's dtype
            p.data = p.data.float() if p.requires_grad else p.data.to(base_dtype)
        return unet

    def diffusers_layers(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The adapter as ``save_lora_weights`` takes it (``...to_q.lora_A.weight``, ``...lora_B.weight``:
        what ``get_peft_model_state_dict`` gives) from the trainer's (``...to_q.lora_A.default.weight``),
        alpha / r folded into B.

        Not passed through ``convert_state_dict_to_diffusers``: it renames the attention projections
        only, and diffusers' loader then reads a mix of both namings as the old one and drops the
        rest (``proj_in``, ``ff.net.2``) without an error.
        """
        layers = {}
        for key, value in weights.items():
            key = key.replace(f".{ADAPTER}.", ".")
            value = value.detach().float().cpu()
            layers[key] = value * self.scale if ".lora_B." in key else value
        return layers

    def save(self, weights: dict[str, Tensor], folder: Path, pipeline_class: str = "StableDiffusionPipeline") -> Path:
        """Write ``folder/pytorch_lora_weights.safetensors`` with ``pipeline_class.save_lora_weights``
        (the class whose ``load_lora_weights`` reads it back)."""
        import diffusers

        saver = getattr(diffusers, pipeline_class, diffusers.StableDiffusionPipeline)
        saver.save_lora_weights(str(folder), unet_lora_layers=self.diffusers_layers(weights), weight_name=LORA_WEIGHTS,
                                safe_serialization=True)
        return Path(folder) / LORA_WEIGHTS

    def meta(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser steps: all of them, or a LoRA network's adapter (and GAN head)."""
    return [p for p in module.parameters() if p.requires_grad]
