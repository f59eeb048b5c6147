"""DMD2 losses as pure functions of tensors; the math reads as in the paper.

Shapes: x, x0_* are (B, C, H, W); logits are (B,) or (B, 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """``eps_u + s * (eps_c - eps_u)`` (Ho & Salimans, 2022)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def distribution_matching_grad(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The DMD gradient direction (DMD Eq. 7-8, with DMD2's normalisation).

    ``p_real = x - x0_real``, ``p_fake = x - x0_fake``;
    ``grad = (p_real - p_fake) / mean_{C,H,W} |p_real|`` per sample, non-finite values zeroed
    (a sample with p_real = 0 already sits on the teacher's prediction: 0/0 and c/0 give 0, not
    the huge finite value ``nan_to_num`` would make of an infinity).
    A descent step ``x - grad`` moves x toward the teacher's x0 and away from the fake's.
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    p_real = x - x0_real
    p_fake = x - x0_fake
    weight = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # (B, 1, 1, 1)
    grad = (p_real - p_fake) / weight
    return torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))


def distribution_matching_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """``0.5 * mse(x, stopgrad(x - grad))``: its gradient w.r.t. x is ``grad / numel``."""
    grad = distribution_matching_grad(x.detach(), x0_real, x0_fake)
    target = (x.detach().float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target)


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Fake score's denoising score matching: MSE to the target of its parameterisation (eps or v)."""
    return F.mse_loss(prediction.float(), target.float())


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN, discriminator side: ``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating GAN, generator side: ``softplus(-D(G(z)))``."""
    return F.softplus(-logits_fake.float()).mean()
