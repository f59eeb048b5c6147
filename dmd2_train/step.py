"""One DMD2 iteration's two losses as named functions: the generator's and the fake score's.

DMD2 Alg. 1, per iteration (the loop calls these; the two time-scale rule decides how often):

    generator_loss:   x = G(backward-simulated x_{t_k})                          (Sec. 4.4)
                      loss = DM(x; real score with CFG, fake score)          (DMD Eq. 7)
                             + w_G * softplus(-D(F(x, t)))                       (Sec. 4.3)
    fake_score_loss:  x = stopgrad(G(...));  loss = ||F(x_t, t) - target||^2  (eps, or v for a
                             v-prediction teacher: the fake score learns as its teacher did)
                             + w_D * [softplus(D(F(x))) + softplus(-D(F(x_real)))]
                      (the GAN's noise levels: t in [0, gan_t_max T), the official code's
                      diffusion_gan_max_timestep)

Each function takes the networks, the settings, the encoded prompts and the step's random draws
(made up front by ``draw_*``, so a batch of 2b and two accumulated batches of b see the very same
numbers), runs only forward passes, and returns ``(loss, logs)`` with ``logs`` as detached
device tensors (the loop reads them on the host only every ``log_every`` steps).

Mixed precision the way the official code does it: every forward pass gets its own autocast
region (``nets.autocast``), never a backward or an optimiser step. Autocast caches the low-
precision copy of a weight until the outermost region exits; on torch releases before the fix of
PyTorch issues 112583 / 142234 a weight cast under ``no_grad`` (backward simulation, the fake
score's DM pass) and reused with grad in the same region got no gradient at all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dmd2_serve.model.adapters import Conditioning, unet_eps
from dmd2_serve.model.sampling import add_noise, predict_x0, x0_from_eps
from dmd2_serve.model.schedule import Schedule

from .config import DistillConfig
from .losses import (
    classifier_free_guidance,
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .networks import FakeScore
from .simulate import backward_simulate


@dataclass
class Networks:
    """What one iteration runs, as the loop prepared it.

    ``generator`` and ``fake`` are the prepared modules (DDP wrappers or FSDP-sharded modules):
    the graded passes go through them so gradients are synchronised. ``fake_score`` is the fake
    network's own object, for its ``eps`` / ``logits`` calls (under DDP the plain module: those
    passes must not enter DDP's reducer; under FSDP the sharded module itself).
    """

    generator: nn.Module
    fake: nn.Module
    fake_score: FakeScore
    real: nn.Module
    schedule: Schedule  # abar on the device, the prediction type, the generator's steps
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext


@dataclass
class StudentDraws:
    """The draws that make the generator's input: step index k and the k + 1 noises.

    ``real_x0`` is set only for the no-backward-simulation ablation (noisy real images instead).
    """

    k: int
    noise: list[Tensor]  # k + 1 of (B, C, H, W)
    real_x0: Tensor | None = None


@dataclass
class GeneratorDraws:
    student: StudentDraws
    t_dm: Tensor  # (B,) DM noise level, in [dm_t_min T, dm_t_max T]
    eps_dm: Tensor  # (B, C, H, W)
    t_gan: Tensor  # (B,)
    eps_gan: Tensor


@dataclass
class FakeDraws:
    student: StudentDraws
    t: Tensor  # (B,) denoising noise level, in [0, T)
    eps: Tensor
    t_real: Tensor  # (B,) noise level of the real images for the discriminator
    eps_real: Tensor
    # gan_t_max < 1: G's samples for the discriminator at levels of their own (as t_real's); else
    # the discriminator reads the logits of the denoising pass at t (both uniform on [0, T))
    t_fake_gan: Tensor | None = None
    eps_fake_gan: Tensor | None = None


@dataclass
class RealBatch:
    """Real data for the GAN: images in the UNet's space and their encoded captions."""

    x0: Tensor  # (B, C, H, W)
    cond: Conditioning


T = TypeVar("T")


def micro_batch(value: T, i: int, n: int) -> T:
    """Part ``i`` of ``n`` equal parts (dim 0) of a batch: tensors, ``Conditioning``, lists and
    draws dataclasses (recursively); other values (k, None) pass through."""
    if torch.is_tensor(value):
        return value.chunk(n)[i]  # type: ignore[return-value]
    if isinstance(value, Conditioning):
        size = len(value) // n
        return value.index(slice(i * size, (i + 1) * size))  # type: ignore[return-value]
    if isinstance(value, list):
        return [micro_batch(v, i, n) for v in value]  # type: ignore[return-value]
    if hasattr(value, "__dataclass_fields__"):
        return replace(value, **{f.name: micro_batch(getattr(value, f.name), i, n) for f in fields(value)})
    return value


def draw_student(k: int, batch: int, shape: tuple[int, ...], g: torch.Generator,
                 real_x0: Tensor | None = None) -> StudentDraws:
    """Noise for backward simulation to step ``k``, drawn on ``g``'s device."""
    return StudentDraws(k, [_randn(batch, shape, g) for _ in range(k + 1)], real_x0)


def draw_generator(student: StudentDraws, cfg: DistillConfig, num_train_timesteps: int,
                   g: torch.Generator) -> GeneratorDraws:
    """Every draw of one generator step beyond the student's input."""
    batch, shape = student.noise[0].shape[0], tuple(student.noise[0].shape[1:])
    t_lo, t_hi = int(cfg.dm_t_min * num_train_timesteps), int(cfg.dm_t_max * num_train_timesteps)
    return GeneratorDraws(student, _randint(t_lo, t_hi + 1, batch, g), _randn(batch, shape, g),
                          _randint(0, gan_levels(cfg, num_train_timesteps), batch, g), _randn(batch, shape, g))


def draw_fake(student: StudentDraws, cfg: DistillConfig, num_train_timesteps: int, g: torch.Generator) -> FakeDraws:
    """Every draw of one fake-score step beyond the student's input."""
    batch, shape = student.noise[0].shape[0], tuple(student.noise[0].shape[1:])
    levels = gan_levels(cfg, num_train_timesteps)
    d = FakeDraws(student, _randint(0, num_train_timesteps, batch, g), _randn(batch, shape, g),
                  _randint(0, levels, batch, g), _randn(batch, shape, g))
    if levels < num_train_timesteps:  # drawn last: with gan_t_max = 1 the draws are what they always were
        d.t_fake_gan, d.eps_fake_gan = _randint(0, levels, batch, g), _randn(batch, shape, g)
    return d


def gan_levels(cfg: DistillConfig, num_train_timesteps: int) -> int:
    """The GAN's noise levels are ``[0, gan_levels)``."""
    return max(1, round(cfg.gan_t_max * num_train_timesteps))


def _randn(batch: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randn((batch, *shape), generator=g, device=g.device)


def _randint(lo: int, hi: int, batch: int, g: torch.Generator) -> Tensor:
    return torch.randint(lo, hi, (batch,), generator=g, device=g.device)


def _eps_fn(unet: nn.Module, cond: Conditioning, schedule: Schedule) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x_t, t: unet_eps(unet, x_t, t, cond, schedule)


def student_x0(nets: Networks, cfg: DistillConfig, cond: Conditioning, d: StudentDraws) -> Tensor:
    """G's x0 at step k of the schedule (DMD2 Sec. 4.4), with grad when grad is enabled.

    The input is what inference would give G at step k: k no-grad generator steps from fresh
    noise (backward simulation, its own autocast region), re-noised to t_k; or, in the ablation,
    a real image noised to t_k. Returns (B, C, H, W) float32.
    """
    schedule = nets.schedule
    abar, timesteps = schedule.alphas_cumprod, schedule.timesteps
    generator = _eps_fn(nets.generator, cond, schedule)
    if d.real_x0 is not None:
        t = torch.full((d.real_x0.shape[0],), timesteps[d.k], device=d.real_x0.device, dtype=torch.long)
        x_t = add_noise(d.real_x0, d.noise[d.k], t, abar)
    else:
        with nets.autocast():
            sim = backward_simulate(generator, schedule, d.k, d.noise)
        x_t, t = sim.x_t, sim.t
    with nets.autocast():
        return predict_x0(generator, x_t, t, abar)


def generator_loss(nets: Networks, cfg: DistillConfig, cond: Conditioning, uncond: Conditioning,
                   d: GeneratorDraws) -> tuple[Tensor, dict[str, Tensor]]:
    """The generator's loss: distribution matching plus the non-saturating GAN term.

    The fake network is frozen for the GAN term without touching ``requires_grad`` (which breaks
    gradient checkpointing and sharded parameters): the term's gradient is taken with respect to
    x alone (``torch.autograd.grad``: no weight gradients are computed or stored) and joins the
    returned loss as a surrogate whose value is the term and whose gradient is that one. A plain
    backward of the returned loss then reaches the generator's parameters only.
    """
    abar = nets.schedule.alphas_cumprod
    x = student_x0(nets, cfg, cond, d.student)  # (B, C, H, W), grad to G
    # Distribution matching (DMD Eq. 7): real score with CFG vs fake score, both without grad.
    x_t = add_noise(x.detach(), d.eps_dm, d.t_dm, abar)
    with torch.no_grad(), nets.autocast():
        both = Conditioning.cat([uncond, cond])
        eps_u, eps_c = unet_eps(nets.real, torch.cat([x_t, x_t]), torch.cat([d.t_dm, d.t_dm]), both,
                                nets.schedule).chunk(2)
        eps_fake = nets.fake_score.eps(x_t, d.t_dm, cond)
    x0_real = x0_from_eps(x_t, classifier_free_guidance(eps_u.float(), eps_c.float(), cfg.guidance_scale), d.t_dm, abar)
    x0_fake = x0_from_eps(x_t, eps_fake, d.t_dm, abar)
    loss_dm = distribution_matching_loss(x, x0_real, x0_fake)
    logs = {"loss/dm": loss_dm.detach()}
    if not cfg.gan:
        return loss_dm, logs
    x_gan = x.detach().requires_grad_(True)
    with nets.autocast():  # non-saturating GAN through the fake network's trunk and head
        logits = nets.fake_score.logits(add_noise(x_gan, d.eps_gan, d.t_gan, abar), d.t_gan, cond)
    loss_gan = gan_generator_loss(logits)
    (grad_x,) = torch.autograd.grad(cfg.gan_weight_generator * loss_gan, x_gan)  # through the frozen fake net
    logs["loss/gan_generator"] = loss_gan.detach()
    surrogate = (x * grad_x).sum()  # value 0 after the subtraction below, gradient grad_x
    return loss_dm + cfg.gan_weight_generator * loss_gan.detach() + (surrogate - surrogate.detach()), logs


def fake_score_loss(nets: Networks, cfg: DistillConfig, cond: Conditioning, d: FakeDraws,
                    real: RealBatch | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The fake score's loss: denoising on G's samples plus the GAN discriminator term.

    Generator samples and (with the GAN) noised real images share ONE pass of the fake network,
    so a data-parallel wrapper sees one forward and one backward that use every parameter. With
    ``gan_t_max`` < 1 the discriminator judges G's samples at GAN levels of their own, a third
    part of that pass (the denoising part's levels cover all of [0, T)).
    """
    abar = nets.schedule.alphas_cumprod
    with torch.no_grad():
        x = student_x0(nets, cfg, cond, d.student)
    batch = x.shape[0]
    inputs, times, conds = [add_noise(x, d.eps, d.t, abar)], [d.t], [cond]
    if cfg.gan:
        if real is None:
            raise ValueError("the GAN needs a real batch")
        if d.t_fake_gan is not None:
            inputs.append(add_noise(x, d.eps_fake_gan, d.t_fake_gan, abar))
            times.append(d.t_fake_gan)
            conds.append(cond)
        inputs.append(add_noise(real.x0, d.eps_real, d.t_real, abar))
        times.append(d.t_real)
        conds.append(real.cond)
    with nets.autocast():
        prediction, logits = nets.fake(torch.cat(inputs), torch.cat(times), Conditioning.cat(conds))
    # in the teacher's parameterisation: eps itself, or v = sqrt(abar) eps - sqrt(1 - abar) x
    loss_denoise = denoising_loss(prediction[:batch], nets.schedule.target(x, d.eps, d.t))
    logs = {"loss/denoise": loss_denoise.detach()}
    if not cfg.gan:
        return loss_denoise, logs
    logits = logits.float()
    fake_logits, real_logits = logits[-2 * batch:-batch], logits[-batch:]  # G's samples at the GAN's levels, the reals
    loss_gan = gan_discriminator_loss(logits_real=real_logits, logits_fake=fake_logits)
    logs |= {"loss/gan_discriminator": loss_gan.detach(), "gan/d_real": torch.sigmoid(real_logits).mean().detach(),
             "gan/d_fake": torch.sigmoid(fake_logits).mean().detach()}
    return loss_denoise + cfg.gan_weight_discriminator * loss_gan, logs

