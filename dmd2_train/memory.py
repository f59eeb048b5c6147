"""Memory levers of a training run: the optimiser, where its state lives, and the OOM message.

| key | what it saves (SDXL UNet, 2.57 B parameters, per trained network) |
|---|---|
| ``free_grads`` (on) | gradients freed right after each network's step: one network's fp32 grads, 9.6 GiB, live at a time instead of two |
| ``optimizer: adamw8bit`` | torchao's 8-bit AdamW: 2 bytes of state per parameter instead of 8: 14.3 GiB |
| ``offload_optimizer`` | the idle network's AdamW state waits in pinned host memory: 19.1 GiB on the GPU |
| ``gradient_checkpointing`` | activations recomputed in the backward pass (the largest lever at 1024x1024) |
| ``mixed_precision: bf16`` | frozen teacher, text encoders and VAE held in bf16: 4.8 + 0.8 + 0.1 GiB |

AdamW is fused (one kernel for all parameters, no foreach temporaries) on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import DistillConfig


class MemoryOptionError(RuntimeError):
    """A memory option this installation cannot provide; the message says what to install."""


def make_optimizer(params: Iterable[nn.Parameter], lr: float, cfg: DistillConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW as configured: torch's (fused on CUDA) or torchao's 8-bit AdamW."""
    kwargs: dict[str, Any] = dict(lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise MemoryOptionError(
                "optimizer=adamw8bit needs torchao: pip install 'dmd2-fast[lowmem]' (or pip install torchao),"
                " or use optimizer=adamw") from e
        return AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> Iterable[tuple[dict[str, Any], str, Tensor]]:
    """(state dict, key, tensor) for every plain tensor in an optimiser's state."""
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps optimisers
    for state in inner.state.values():
        for key, value in state.items():
            if type(value) is Tensor and value.dim() > 0:  # 8-bit states are subclasses: they stay
                yield state, key, value


class StateParking:
    """Moves an optimiser's state between the GPU and pinned host buffers (kept for reuse).

    ``park()`` after a step sends it to the host, ``unpark()`` before the next step brings it
    back. Copies are non-blocking; the step that follows waits for them on the same stream.
    """

    def __init__(self, opt: torch.optim.Optimizer, device: torch.device) -> None:
        self.opt = opt
        self.device = device
        self.host: dict[tuple[int, str], Tensor] = {}
        self.parked = False

    def park(self) -> None:
        if self.parked or self.device.type != "cuda":
            return
        for state, key, value in optimizer_state_tensors(self.opt):
            slot = (id(state), key)
            if slot not in self.host:
                self.host[slot] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            state[key] = self.host[slot].copy_(value, non_blocking=True)
        self.parked = True

    def unpark(self) -> None:
        if not self.parked:
            return
        for state, key, value in optimizer_state_tensors(self.opt):
            state[key] = value.to(self.device, non_blocking=True)
        self.parked = False


def memory_options(cfg: DistillConfig) -> dict[str, Any]:
    """The configuration's memory-relevant keys, for messages and benchmark rows."""
    return {k: getattr(cfg, k) for k in ("batch_size", "gradient_accumulation_steps", "image_size",
                                         "mixed_precision", "gradient_checkpointing", "optimizer",
                                         "offload_optimizer", "free_grads", "sharding")}


def out_of_memory_message(cfg: DistillConfig, model: str, world_size: int, step: int, last_checkpoint: str) -> str:
    """One message for a CUDA OOM: the configuration and the options that would help."""
    helps = []
    if not cfg.gradient_checkpointing:
        helps.append("gradient_checkpointing=true")
    if cfg.optimizer != "adamw8bit":
        helps.append("optimizer=adamw8bit")
    if not cfg.offload_optimizer and cfg.sharding != "fsdp2":
        helps.append("offload_optimizer=true")
    if not cfg.free_grads:
        helps.append("free_grads=true")
    if cfg.mixed_precision in ("no", "auto"):
        helps.append("mixed_precision=bf16")
    if cfg.batch_size > 1:
        helps.append(f"batch_size={max(1, cfg.batch_size // 2)} gradient_accumulation_steps="
                     f"{cfg.gradient_accumulation_steps * 2} (the same batch, half the activations)")
    if world_size > 1 and cfg.sharding != "fsdp2":
        helps.append("sharding=fsdp2 (shards both networks and their optimiser states over the GPUs)")
    options = ", ".join(f"{k}={v}" for k, v in memory_options(cfg).items())
    return (f"out of GPU memory at step {step} ({model}, {options}, {world_size} process(es)); "
            f"{last_checkpoint}; try: {'; '.join(helps) or 'a GPU with more memory or more GPUs with sharding=fsdp2'}"
            " (the README's training-memory table shows what each option saves)")
