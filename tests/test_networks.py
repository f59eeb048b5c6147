"""The three networks and the GAN head on the fake score's bottleneck."""

import pytest
import torch
from conftest import tiny_digits_unet

from dmd2_serve.backbones import Conditioning
from dmd2_train.networks import FakeScore, GanHead, bottleneck_shape, build_networks


@pytest.mark.parametrize("shape", [(1280, 8, 8), (1280, 32, 32), (64, 4, 4), (16, 2, 2)])
def test_head_reduces_any_bottleneck_to_one_logit(shape):
    c, h, w = shape
    head = GanHead(c, h)
    assert head(torch.randn(2, c, h, w)).shape == (2,)


def test_head_matches_the_authors_layouts():
    convs = lambda head: [(m.kernel_size[0], m.stride[0]) for m in head.net if isinstance(m, torch.nn.Conv2d)]
    assert convs(GanHead(1280, 8)) == [(4, 2), (4, 4), (1, 1)]  # SD1.5
    assert convs(GanHead(1280, 32)) == [(4, 2), (4, 2), (4, 2), (4, 4), (1, 1)]  # SDXL


def test_fake_score_head_sees_the_bottleneck():
    unet = tiny_digits_unet()
    cond = Conditioning(torch.randn(3, 16, 384))
    shape = bottleneck_shape(unet, (1, 8, 8), cond)
    assert shape == (16, 4, 4)  # last block width, 8x8 halved once
    fake = FakeScore(unet, shape)
    seen = []
    fake.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    eps, logits = fake(x, t, cond, logits=True)
    assert eps.shape == x.shape and logits.shape == (3,)
    assert seen == [torch.Size([3, *shape])]
    # the classification-only pass stops at the bottleneck and gives the same logits
    eps_none, logits_only = fake(x, t, cond, eps=False, logits=True)
    assert eps_none is None
    torch.testing.assert_close(logits_only, logits)
    # and the normal path still works afterwards
    assert fake(x, t, cond)[0].shape == x.shape


def test_gan_loss_trains_trunk_and_head():
    unet = tiny_digits_unet()
    cond = Conditioning(torch.randn(2, 16, 384))
    fake = FakeScore(unet, bottleneck_shape(unet, (1, 8, 8), cond))
    _, logits = fake(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), cond, eps=False, logits=True)
    logits.sum().backward()
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
