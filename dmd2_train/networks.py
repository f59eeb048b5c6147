"""The three networks from one teacher, and the GAN head on the fake score's bottleneck.

real score  : the teacher UNet, frozen (bf16 on GPU).
fake score  : a trainable copy of the teacher; tracks the generator's distribution, trained in
              the teacher's parameterisation (eps or v).
generator   : a trainable copy of the teacher; the few-step student (the teacher's parameterisation).
GAN head    : a small conv classifier on the fake UNet's bottleneck (the adapter names the module;
              the mid block for every UNet family; DMD2 Sec. 4.3), reached with a forward hook,
              never by rewriting the UNet's forward.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dmd2_serve.model.adapters import Conditioning, unet_prediction
from dmd2_serve.model.schedule import Schedule

from .lora import LoraSpec


def head_groups(channels: int, most: int = 32, min_group: int = 16) -> int:
    """GroupNorm groups for the head: the most (up to ``most``) dividing ``channels`` with >= ``min_group`` each."""
    return max([g for g in range(1, most + 1) if channels % g == 0 and channels // g >= min_group], default=1)


class GanHead(nn.Module):
    """Conv -> GroupNorm -> SiLU blocks down to 1x1, then a 1x1 conv to one logit.

    Sized from the bottleneck (C, H, W): stride-2 4x4 convs while H > 4, then one conv that
    covers the rest (4x4 stride 4 at H = 4), as the authors' heads for SD1.5 (8x8) and SDXL (32x32).
    GroupNorm uses 32 groups (the authors') when every group keeps at least 16 channels, else
    fewer: the last blocks see a 1x1 map, where a group of 2 channels normalises to +-1, keeping
    only the sign of their difference, and the head stayed at chance (64 channels: 4 groups).
    """

    def __init__(self, channels: int, height: int) -> None:
        super().__init__()
        groups = head_groups(channels)

        def block(kernel: int, stride: int, padding: int) -> list[nn.Module]:
            return [nn.Conv2d(channels, channels, kernel, stride, padding),
                    nn.GroupNorm(groups, channels), nn.SiLU()]

        layers: list[nn.Module] = []
        size = height
        while size > 4:
            layers += block(4, 2, 1)
            size //= 2
        layers += block(size, size, 0)  # -> 1x1
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, H, W) bottleneck features -> (B,) logits."""
        return self.net(features).flatten(1).squeeze(1)


class FakeScore(nn.Module):
    """The fake score UNet with the GAN head on its bottleneck.

    Three calls, no mode flags:
        ``eps(x_t, t, cond)``     the prediction as eps (the DM loss's fake score, no head);
        ``logits(x_t, t, cond)``  the head's logits (the GAN generator loss);
        ``forward(x_t, t, cond)`` the raw prediction (eps or v, as the teacher's) and the logits
                                  from ONE pass (the fake-score step: denoising + discriminator).
    The UNet always runs to its end: stopping at the bottleneck would need an exception out of a
    hook, which leaves a sharded (FSDP) module half-way through its forward. The wasted decoder
    half costs forward FLOPs only on the generator's GAN pass (no gradient flows through it).
    """

    def __init__(self, unet: nn.Module, bottleneck_shape: tuple[int, int, int] | None, schedule: Schedule,
                 bottleneck: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule  # the prediction type and abar (on the training device)
        # No head without the GAN: parameters that never get a gradient would stall DDP.
        self.head = GanHead(bottleneck_shape[0], bottleneck_shape[1]) if bottleneck_shape else None
        self._features: Tensor | None = None
        (bottleneck if bottleneck is not None else unet.mid_block).register_forward_hook(self._grab)

    def _grab(self, module: nn.Module, args: object, output: Tensor) -> None:
        self._features = output

    def _unet(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        prediction = unet_prediction(self.unet, x_t, t, cond)
        features, self._features = self._features, None
        return prediction, features

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor | None]:
        """``(prediction, logits)``: (B, C, H, W) in the teacher's parameterisation and (B,),
        logits None without a head."""
        prediction, features = self._unet(x_t, t, cond)
        return prediction, (self.head(features) if self.head is not None else None)

    def eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The prediction as eps, (B, C, H, W)."""
        return self.schedule.eps(x_t, self._unet(x_t, t, cond)[0], t)

    def logits(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The GAN head's logits, (B,)."""
        if self.head is None:
            raise ValueError("this fake score was built without a GAN head (gan=false)")
        return self.head(self._unet(x_t, t, cond)[1])


@torch.no_grad()
def bottleneck_shape(unet: nn.Module, sample_shape: tuple[int, int, int], cond: Conditioning,
                     bottleneck: nn.Module | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the bottleneck's output (default ``unet.mid_block``) for inputs of
    ``sample_shape``, by one probe pass."""
    seen: list[torch.Size] = []
    module = bottleneck if bottleneck is not None else unet.mid_block
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        x = torch.zeros((1, *sample_shape), device=cond.hidden.device)
        unet_prediction(unet, x, torch.zeros(1, dtype=torch.long, device=x.device), cond.index([0]))
    finally:
        handle.remove()
    c, h, w = seen[0][1:]
    return int(c), int(h), int(w)


def build_networks(teacher: nn.Module, teacher_dtype: torch.dtype = torch.float32,
                   generator_lora: LoraSpec | None = None,
                   fake_lora: LoraSpec | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(real_score, fake_unet, generator) from one teacher UNet.

    The real score is the teacher itself, frozen and cast to ``teacher_dtype``; the fake score
    and the generator are float32 trainable copies (fp32 master weights), or, given a
    :class:`LoraSpec`, frozen copies in ``teacher_dtype`` with a trainable float32 adapter. The
    adapters go on the copies: the real score stays the plain teacher.
    """
    fake = copy.deepcopy(teacher).float().train().requires_grad_(True)
    generator = copy.deepcopy(teacher).float().train().requires_grad_(True)
    for net, lora in ((generator, generator_lora), (fake, fake_lora)):
        if lora is not None:
            lora.add_to(net, teacher_dtype)
    if next(teacher.parameters()).dtype != teacher_dtype:
        teacher = teacher.to(teacher_dtype)
    real = teacher.eval().requires_grad_(False)
    return real, fake, generator
