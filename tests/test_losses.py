"""Each loss against a value computed by hand on small tensors."""

import math

import torch

from dmd2_train.losses import (
    classifier_free_guidance,
    denoising_loss,
    distribution_matching_grad,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, 1, -1)  # (B, C, H, W)


def test_cfg_by_hand():
    assert classifier_free_guidance(t(1.0), t(3.0), 1.5).item() == 4.0  # 1 + 1.5 * (3 - 1)


def test_dm_grad_and_loss_by_hand():
    x, x0_real, x0_fake = t(2.0, 0.0), t(1.0, 1.0), t(3.0, -1.0)
    # p_real = (1, -1), p_fake = (-1, 1), mean|p_real| = 1 -> grad = (2, -2)
    assert torch.equal(distribution_matching_grad(x, x0_real, x0_fake), t(2.0, -2.0))
    # 0.5 * mean(grad^2) = 0.5 * 4
    assert distribution_matching_loss(x, x0_real, x0_fake).item() == 2.0


def test_dm_loss_gradient_is_grad_over_numel():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.randn_like(x), torch.randn_like(x)
    distribution_matching_loss(x, x0_real, x0_fake).backward()
    expected = distribution_matching_grad(x.detach(), x0_real, x0_fake) / x.numel()
    torch.testing.assert_close(x.grad, expected)


def test_dm_normalisation_is_per_sample():
    x = torch.zeros(2, 1, 1, 2)
    x0_real = torch.tensor([[[[1.0, 1.0]]], [[[10.0, 10.0]]]])
    grad = distribution_matching_grad(x, x0_real, torch.zeros_like(x))
    # p_real = -x0_real; (p_real - p_fake) / mean|p_real| = -1 for both samples despite the 10x scale
    assert torch.equal(grad, -torch.ones_like(x))


def test_dm_grad_non_finite_zeroed():
    x = t(1.0, 1.0)
    assert torch.equal(distribution_matching_grad(x, x.clone(), x.clone()), t(0.0, 0.0))  # 0 / 0
    assert torch.equal(distribution_matching_grad(x, x.clone(), t(0.0, 0.0)), t(0.0, 0.0))  # c / 0


def test_dm_gradient_points_to_teacher_and_away_from_fake():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    x0_real, x0_fake = torch.randn_like(x), torch.randn_like(x)
    dot = lambda a, b: (a * b).flatten(1).sum(dim=1)
    # the descent direction -grad, in general: toward the teacher's x0 relative to the fake's
    direction = -distribution_matching_grad(x, x0_real, x0_fake)
    assert (dot(direction, x0_real - x0_fake) > 0).all()
    # the fake agrees with x: the step goes straight toward the teacher's x0
    direction = -distribution_matching_grad(x, x0_real, x)
    torch.testing.assert_close(direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1),
                               (x0_real - x) / (x0_real - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    # the teacher (almost) agrees with x: the step goes away from the fake's x0
    direction = -distribution_matching_grad(x, x + 1e-3 * torch.randn_like(x), x0_fake)
    assert (dot(direction, x0_fake - x) < 0).all()
    # a small step along it shortens the distance to the teacher's x0
    x_new = x - 1e-2 * distribution_matching_grad(x, x0_real, x0_fake)
    assert ((x_new - x0_real).flatten(1).norm(dim=1) < (x - x0_real).flatten(1).norm(dim=1)).all()


def test_denoising_loss_by_hand():
    assert denoising_loss(t(1.0, 2.0), t(0.0, 0.0)).item() == 2.5  # (1 + 4) / 2


def test_gan_losses_by_hand():
    ln2 = math.log(2)
    zero = torch.zeros(3)
    assert math.isclose(gan_discriminator_loss(zero, zero).item(), 2 * ln2, rel_tol=1e-6)
    assert math.isclose(gan_generator_loss(zero).item(), ln2, rel_tol=1e-6)
    # a confident, correct discriminator has a small loss; the generator it fools has a large one
    assert gan_discriminator_loss(torch.full((3,), 20.0), torch.full((3,), -20.0)).item() < 1e-8
    assert math.isclose(gan_generator_loss(torch.full((3,), -20.0)).item(), 20.0, rel_tol=1e-6)
