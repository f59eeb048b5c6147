"""An exponential moving average of the generator's weights, kept beside the module.

The average is a list of tensors shaped like the module's parameters (sharded like them under
FSDP: a clone of a DTensor is a DTensor), not a deep copy of the module, so it works whatever
wraps the module and costs one copy of the trained parameters (a LoRA's adapter), nothing more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ParameterEMA:
    """``ema = decay * ema + (1 - decay) * p`` after every update; the first update copies.

    The same rule as ``torch.optim.swa_utils.get_ema_multi_avg_fn``.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        # Trained parameters only: a LoRA generator averages its adapter, not the frozen teacher.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        # The parameter objects themselves: under FSDP2 the sharded ones, which the optimiser
        # updates (the module exposes gathered copies while a pass holds them).
        self.params = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        params, average = [_local(p.detach()) for p in self.params], [_local(a) for a in self.average]
        if self.updates == 0:
            torch._foreach_copy_(average, params)
        else:
            torch._foreach_lerp_(average, params, 1 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """``{parameter name: average}`` (the module's parameter names)."""
        return dict(zip(self.names, self.average))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        for name, tensor in zip(self.names, self.average):
            tensor.copy_(state[name])
        self.updates = updates

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the parameters hold the average (and the average the live weights)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            p, a = _local(p.detach()), _local(a)
            live = p.clone()
            p.copy_(a)
            a.copy_(live)


def _local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
