"""Backward simulation: the generator's training input made the way inference makes it.

DMD2 Sec. 4.4: draw k ~ U{0..K-1}; from fresh noise run G without grad through steps
0..k-1 exactly as the sampler does, re-noise its x0 to t_k with fresh noise, and let G denoise
that with grad. k = 0 is pure noise at t_0. The first k steps call ``few_step_sample``, the very
loop the server runs, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dmd2_serve.model.sampling import EpsFn, add_noise, few_step_sample
from dmd2_serve.model.schedule import Schedule


@dataclass
class SimulatedInput:
    """Where the generator's graded step starts: x_{t_k} at step index k."""

    x_t: Tensor  # (B, C, H, W)
    t: Tensor  # (B,) all equal to timesteps[k]
    k: int


def backward_simulate(
    eps_fn: EpsFn,
    schedule: Schedule,
    k: int,
    noise: Sequence[Tensor],
) -> SimulatedInput:
    """The noisy input of step ``k`` that inference would give G.

    Args:
        eps_fn: the generator as an eps-predictor (conditioning bound in); called under ``no_grad`` here.
        schedule: abar and the fixed steps.
        k: the step whose input is wanted, 0 <= k < len(timesteps).
        noise: at least ``k + 1`` fresh (B, C, H, W) draws: ``noise[0]`` starts the chain and
            ``noise[i]`` re-noises into ``timesteps[i]``, the same roles as in the sampler.
    """
    timesteps = schedule.timesteps
    if not 0 <= k < len(timesteps):
        raise ValueError(f"k={k} is outside the schedule of {len(timesteps)} steps")
    batch = noise[0].shape[0]
    t_k = torch.full((batch,), int(timesteps[k]), device=noise[0].device, dtype=torch.long)
    if k == 0:
        return SimulatedInput(noise[0], t_k, 0)
    with torch.no_grad():
        x0 = few_step_sample(eps_fn, noise[0], schedule.with_timesteps(timesteps[:k]), noise[1:k])
    return SimulatedInput(add_noise(x0, noise[k], t_k, schedule.alphas_cumprod).to(noise[0].dtype), t_k, k)
