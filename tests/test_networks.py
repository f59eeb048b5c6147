"""The three networks and the GAN head on the fake score's bottleneck."""

import pytest
import torch
from conftest import tiny_digits_unet

from dmd2_serve.model.adapters import Conditioning
from dmd2_serve.model.schedule import Schedule
from dmd2_train.losses import gan_discriminator_loss
from dmd2_train.networks import FakeScore, GanHead, bottleneck_shape, build_networks, head_groups

SCHEDULE = Schedule(torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1280, 8, 8), (1280, 32, 32), (64, 4, 4), (16, 2, 2)])
def test_head_reduces_any_bottleneck_to_one_logit(shape):
    c, h, w = shape
    head = GanHead(c, h)
    assert head(torch.randn(2, c, h, w)).shape == (2,)


def test_head_matches_the_authors_layouts():
    convs = lambda head: [(m.kernel_size[0], m.stride[0]) for m in head.net if isinstance(m, torch.nn.Conv2d)]
    assert convs(GanHead(1280, 8)) == [(4, 2), (4, 4), (1, 1)]  # SD1.5
    assert convs(GanHead(1280, 32)) == [(4, 2), (4, 2), (4, 2), (4, 4), (1, 1)]  # SDXL


def test_head_groups_keep_sixteen_channels_each():
    assert head_groups(1280) == 32  # the authors' GroupNorm(32) on SD1.5 / SDXL
    assert head_groups(64) == 4 and head_groups(16) == 1 and head_groups(48) == 3


def test_small_head_learns_to_separate_real_from_fake():
    # The digits bottleneck (64 x 4 x 4) ends in a 1x1 map. With 32 groups of 2 channels GroupNorm
    # leaves only the sign of each pair's difference, so zero-mean features that differ in their
    # channel scales look alike: the loss stayed at log 4 = 1.39 (chance) before head_groups.
    torch.manual_seed(0)
    head = GanHead(64, 4)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    scale = torch.cat([torch.full((32, 1, 1), 1.6), torch.full((32, 1, 1), 0.3)])
    for _ in range(200):
        real, fake = torch.randn(64, 64, 4, 4) * scale, torch.randn(64, 64, 4, 4) * 1.2
        loss = gan_discriminator_loss(head(real), head(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0


def test_fake_score_head_sees_the_bottleneck():
    unet = tiny_digits_unet()
    cond = Conditioning(torch.randn(3, 16, 384))
    shape = bottleneck_shape(unet, (1, 8, 8), cond)
    assert shape == (16, 4, 4)  # last block width, 8x8 halved once
    fake = FakeScore(unet, shape, SCHEDULE)
    seen = []
    fake.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    eps, logits = fake(x, t, cond)
    assert eps.shape == x.shape and logits.shape == (3,)
    assert seen == [torch.Size([3, *shape])]
    # the named calls give the same numbers as the shared pass
    torch.testing.assert_close(fake.logits(x, t, cond), logits)
    torch.testing.assert_close(fake.eps(x, t, cond), eps)
    assert len(seen) == 2  # eps() does not run the head
    with pytest.raises(ValueError, match="without a GAN head"):
        FakeScore(tiny_digits_unet(), None, SCHEDULE).logits(x, t, cond)


def test_gan_loss_trains_trunk_and_head():
    unet = tiny_digits_unet()
    cond = Conditioning(torch.randn(2, 16, 384))
    fake = FakeScore(unet, bottleneck_shape(unet, (1, 8, 8), cond), SCHEDULE)
    fake.logits(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), cond).sum().backward()
    assert fake.head.net[0].weight.grad is not None
    assert unet.down_blocks[0].resnets[0].conv1.weight.grad is not None  # the shared trunk
    assert unet.conv_out.weight.grad is None  # the decoder half is not on the GAN path


def test_build_networks_freezes_real_and_copies_the_rest():
    teacher = tiny_digits_unet()
    real, fake, gen = build_networks(teacher)
    assert not any(p.requires_grad for p in real.parameters())
    assert all(p.requires_grad for p in fake.parameters()) and all(p.requires_grad for p in gen.parameters())
    w = lambda m: m.conv_in.weight
    assert torch.equal(w(real), w(fake)) and torch.equal(w(real), w(gen))
    with torch.no_grad():
        w(gen).add_(1)
    assert not torch.equal(w(real), w(gen)) and torch.equal(w(real), w(fake))
    real_bf16, _, _ = build_networks(tiny_digits_unet(), torch.bfloat16)
    assert next(real_bf16.parameters()).dtype == torch.bfloat16
