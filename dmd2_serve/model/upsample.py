"""``--subpixel-upsample``: "repeat each pixel, then a 3x3 convolution" as one transposed
convolution (stride 2, 4x4 kernel) of the low-resolution image.

The UNet's and the VAE decoder's upsamplers (diffusers' ``Upsample2D``) double the image by
nearest-neighbour repetition, ``U[p] = x[p // 2]`` (per axis), then convolve it with a 3x3 kernel
``W`` (padding 1). Output row ``p = 2i + a`` reads ``U`` at rows ``p - 1, p, p + 1``, which are only
two rows of ``x``, so the three taps of ``W`` fall on them as

    a = 0:  x row i - 1 gets W[0],          x row i     gets W[1] + W[2]
    a = 1:  x row i     gets W[0] + W[1],   x row i + 1 gets W[2]

and likewise along the columns. That is a transposed convolution with stride 2, padding 1 and a
4x4 kernel ``K`` (output row ``p`` takes ``x`` row ``m`` through ``K[p - 2m + 1]``): per axis
``K = Q W`` with the 4x3 tap matrix ``Q`` below (``K[3] = W[0]``, ``K[1] = W[1] + W[2]``,
``K[2] = W[0] + W[1]``, ``K[0] = W[2]``). The same sums, with ``W``'s taps added once (in float64
from the weights in their final dtype, rounded once to it): each output pixel reads 2x2 input
pixels instead of 3x3 (16 multiply-adds per low-resolution pixel and channel pair instead of 36),
and the four-times-larger repeated image is never written. The output comes out interleaved, as it
should be: no phases to reassemble. Upsampling convolutions are about a quarter of a VAE
decoder's multiply-adds (SD's decoder at 1024x1024: 2.8 of 10.3 TFLOP), a few percent of a UNet's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Q[r][k]: the taps of W (k) that land on row r of the transposed convolution's kernel (see above).
TAPS = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)


def fold_weight(weight: Tensor) -> Tensor:
    """A 3x3 convolution's kernel ``(O, C, 3, 3)`` -> the transposed convolution's ``(C, O, 4, 4)``,
    ``K[c, o] = Q W[o, c] Q^T``."""
    taps = TAPS.to(weight.device)
    return torch.einsum("rk,sl,ockl->cors", taps, taps, weight.double()).to(weight.dtype)


def foldable(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``Upsample2D`` that repeats pixels, then applies a plain 3x3
    convolution (no norm, not transposed): the kind :class:`SubpixelUpsample` computes."""
    conv = getattr(module, "conv", None)
    return (type(module).__name__ == "Upsample2D" and getattr(module, "interpolate", False)
            and getattr(module, "use_conv", False) and not getattr(module, "use_conv_transpose", True)
            and getattr(module, "norm", None) is None and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class SubpixelUpsample(nn.Module):
    """An ``Upsample2D`` computed as one transposed convolution of the low-resolution image.

    It holds the upsampler's own convolution as ``conv`` (so the model's parameter names and state
    dict stay as they were) and the folded kernel, made once from the weights as they are now
    (buffers: ``.to()`` moves and casts them with the model; not saved). A call that asks for
    another size than twice the input (diffusers' ``output_size``, for odd latent sizes) runs the
    original module, which :func:`set_subpixel_upsample` also puts back.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.conv: nn.Conv2d = original.conv  # the same module: one set of weights, moved together
        self.__dict__["original"] = original  # not a submodule: its only weights are ``conv``'s
        with torch.no_grad():
            self.register_buffer("weight", fold_weight(self.conv.weight), persistent=False)
            bias = self.conv.bias.detach().clone() if self.conv.bias is not None else None
            self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> Tensor:
        if output_size is not None and tuple(output_size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.original(x, output_size, *args, **kwargs)
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1)


def set_subpixel_upsample(model: nn.Module, on: bool) -> int:
    """Swap every foldable upsampler of ``model`` for a :class:`SubpixelUpsample` (``on``), or every
    such one back for its original (``off``), in place; returns how many it swapped."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if on and foldable(child):
                swaps.append((parent, name, SubpixelUpsample(child)))
            elif not on and isinstance(child, SubpixelUpsample):
                swaps.append((parent, name, child.original))
    for parent, name, child in swaps:
        setattr(parent, name, child)
    return len(swaps)
