"""The few-step sampling loop: denoise, re-noise, with the schedule as data.

This is the one home of the loop. The server runs it to make images and the trainer runs the
first k steps of it for backward simulation (DMD2, Sec. 4.4), so training and inference can
never disagree about what the generator sees.

Notation (DDPM): ``abar[t]`` is the scheduler's ``alphas_cumprod``;
``x_t = sqrt(abar[t]) * x0 + sqrt(1 - abar[t]) * eps``. Every loop works in eps: a denoiser
converts its UNet's prediction (eps or v) with ``Schedule.eps`` before the loop sees it, so the
fused kernel keeps one eps -> x0 mode. The loops take a :class:`Schedule` (abar and the steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from dmd2_kernels.renoise import renoise
from torch import Tensor

from .schedule import Schedule, _abar

# A denoiser maps (x_t, t) to eps. Conditioning is bound in by the caller.
EpsFn = Callable[[Tensor, Tensor], Tensor]

DEFAULT_TIMESTEPS: tuple[int, ...] = (999, 749, 499, 249)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (DDPM Eq. 4).

    Computed in float32, returned in ``x0``'s dtype. ``t`` is a (B,) tensor of integer steps.
    """
    a = _abar(alphas_cumprod, t, x0)
    x_t = a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()
    return x_t.to(x0.dtype)


def x0_from_eps(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Invert forward diffusion for x0: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``.

    Always float32: at t = 999 ``abar`` is tiny and the division amplifies rounding error.
    """
    a = _abar(alphas_cumprod, t, x_t)
    return (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def predict_x0(eps_fn: EpsFn, x_t: Tensor, t: int | Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Run an eps-predicting network and convert its output to x0 (float32)."""
    if not torch.is_tensor(t):
        t = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
    return x0_from_eps(x_t, eps_fn(x_t, t), t, alphas_cumprod)


# One move of the few-step loop: (x_t at timesteps[i], eps predicted there, i) -> the input at
# timesteps[i + 1] (a step) or the x0 estimate (the final move).
StepFn = Callable[[Tensor, Tensor, int], Tensor]


def _steps(t: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), int(t), device=like.device, dtype=torch.long)


def few_step_loop(eps_fn: EpsFn, x: Tensor, timesteps: Sequence[int], step: StepFn, final: StepFn) -> Tensor:
    """Multi-step consistency-style sampling (DMD2 Sec. 4.4), with the moves as data.

    For each ``t_i``: eps = G(x, t_i); every step but the last moves on with
    ``x = step(x, eps, i)`` (x0 from eps, then fresh noise at t_{i+1}); the last returns
    ``final(x, eps, i)``, the x0 estimate.
    """
    if len(timesteps) == 0:
        raise ValueError("few_step_sample needs at least one timestep")
    for i, t in enumerate(timesteps[:-1]):
        x = step(x, eps_fn(x, _steps(t, x)), i)
    last = len(timesteps) - 1
    return final(x, eps_fn(x, _steps(timesteps[last], x)), last)


def few_step_sample(
    eps_fn: EpsFn,
    noise: Tensor,
    schedule: Schedule,
    renoise: Sequence[Tensor] | Callable[[int], Tensor],
) -> Tensor:
    """Multi-step sampling with given noise draws (the trainer's backward simulation uses this).

    Starting from ``x = noise`` at ``timesteps[0]``, alternate
    ``x0 = G(x, t_i)`` and ``x = add_noise(x0, eps_i, t_{i+1})`` and return the last ``x0``.

    Args:
        eps_fn: the generator as an eps-predictor, conditioning bound in.
        noise: (B, C, H, W) starting Gaussian noise (the input at ``timesteps[0]``).
        schedule: abar and the fixed steps, e.g. (999, 749, 499, 249); their number is the step count.
        renoise: the fresh noise for each re-noise: ``renoise[i]`` (or ``renoise(i)``) is the
            eps that takes ``x0`` of step i to ``timesteps[i + 1]``.

    Returns:
        x0 of the last step, float32, shaped like ``noise``.
    """
    draw = renoise if callable(renoise) else renoise.__getitem__
    timesteps, alphas_cumprod = schedule.timesteps, schedule.alphas_cumprod

    def final(x: Tensor, eps: Tensor, i: int) -> Tensor:
        return x0_from_eps(x, eps, _steps(timesteps[i], x), alphas_cumprod)

    def step(x: Tensor, eps: Tensor, i: int) -> Tensor:
        return add_noise(final(x, eps, i), draw(i), _steps(timesteps[i + 1], x), alphas_cumprod).to(noise.dtype)

    return few_step_loop(eps_fn, noise, timesteps, step, final)


def sdedit_start(strength: float, num_steps: int) -> int:
    """The schedule index an image-to-image run starts at: it runs the last ``round(strength * K)`` steps.

    SDEdit (Meng et al., ICLR 2022) on the generator's own K-step schedule: strength 1 starts at
    ``timesteps[0]`` (from noise), strength 0.5 of (999, 749, 499, 249) at 499. At least one step
    always runs, so a small strength still denoises once. A strength under 1 that would run every
    step (any with one step; 0.75 or more of two) is refused: it would draw from noise, the image unused.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    runs = min(num_steps, max(1, math.floor(strength * num_steps + 0.5)))  # round half up
    if runs == num_steps and strength < 1:
        fix = ("image to image needs 2 steps or more" if num_steps == 1 else
               f"give a strength below {(num_steps - 0.5) / num_steps:g} (the last round(strength x {num_steps})"
               " steps run)")
        raise ValueError(f"strength {strength:g} with {num_steps} step{'s' if num_steps > 1 else ''} runs every step,"
                         f" from pure noise, so the image would go unused; {fix}, or strength 1 to draw from noise alone")
    return num_steps - runs


def philox_sample(
    eps_fn: EpsFn, seeds: Tensor, shape: Sequence[int], schedule: Schedule, dtype: torch.dtype = torch.float32,
    start: Tensor | None = None, x0_start: Tensor | None = None, start_step: int = 0,
) -> Tensor:
    """The serving sampler: every draw comes from the fused Philox re-noise kernel.

    Sample b's starting noise is stream 0 of ``seeds[b]`` and the noise after step i is stream
    i + 1, so a seed gives the same image whatever shares its batch, on any device. Each
    re-noise reads x_t and eps once and writes the next input once (eps -> x0 fused in).

    Image to image (SDEdit): with ``x0_start`` the loop runs ``timesteps[start_step:]`` from
    ``add_noise(x0_start, z, timesteps[start_step])``, z being stream ``start_step``: the same
    draw that takes the full loop to that step, so the noise still depends on the seed alone.

    Args:
        eps_fn: the generator as an eps-predictor, conditioning bound in.
        seeds: (B,) int64 seeds on the sampling device.
        shape: (C, H, W) of one sample.
        schedule: the steps and abar, read on the host (the loop itself touches no host memory,
            so it can be captured in a CUDA graph).
        dtype: the dtype of the generator's inputs.
        start: the starting noise (B, *shape) instead of stream 0 (a caller's ``latents``).
        x0_start: (B, *shape) clean samples (encoded images) to start from, re-noised to
            ``timesteps[start_step]``.
        start_step: the index into ``schedule.timesteps`` of the first step (with ``x0_start``).

    Returns:
        x0 of the last step, float32.
    """
    timesteps = schedule.timesteps
    abar = [schedule.abar(t) for t in timesteps]
    k = int(start_step)
    if not 0 <= k < len(timesteps):
        raise ValueError(f"start_step {k} is outside the {len(timesteps)}-step schedule")
    if x0_start is not None:
        if start is not None:
            raise ValueError("give either start (noise) or x0_start (an image to re-noise), not both")
        x = renoise(x0_start, seeds, k, abar[k], dtype=dtype)  # x0 mode: sqrt(abar) x0 + sqrt(1 - abar) z
    elif k > 0:
        raise ValueError("start_step > 0 needs x0_start, the clean sample to re-noise")
    else:
        x = renoise(None, seeds, 0, 0.0, shape=tuple(shape), dtype=dtype) if start is None else start.to(dtype)

    def step(x: Tensor, eps: Tensor, i: int) -> Tensor:
        j = k + i  # the step's index in the whole schedule, which numbers its draw
        return renoise(x, seeds, j + 1, abar[j + 1], eps=eps, abar_t=abar[j])

    def final(x: Tensor, eps: Tensor, i: int) -> Tensor:  # x0_from_eps with the schedule as numbers
        j = k + i
        return (x.float() - (1 - abar[j]) ** 0.5 * eps.float()) / abar[j] ** 0.5

    return few_step_loop(eps_fn, x, timesteps[k:], step, final)


def ddim_sample(eps_fn: EpsFn, noise: Tensor, schedule: Schedule) -> Tensor:
    """Deterministic DDIM (eta = 0, Song et al. 2021, Eq. 12): how a teacher is sampled.

    At each step the x0 estimate is moved to the next timestep with the predicted eps (not fresh
    noise, which is the few-step generator's rule). Returns the final x0, float32.
    """
    timesteps, alphas_cumprod = schedule.timesteps, schedule.alphas_cumprod
    x = noise
    x0 = noise.float()
    for i, t in enumerate(timesteps):
        t_now = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = eps_fn(x, t_now).float()
        x0 = x0_from_eps(x, eps, t_now, alphas_cumprod)
        if i + 1 < len(timesteps):
            t_next = torch.full_like(t_now, int(timesteps[i + 1]))
            x = add_noise(x0, eps, t_next, alphas_cumprod).to(noise.dtype)
    return x0
