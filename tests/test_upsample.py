"""--subpixel-upsample: diffusers' upsamplers as one stride-2 transposed convolution give their numbers."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D

from dmd2_serve.model.upsample import SubpixelUpsample, fold_weight, foldable, set_subpixel_upsample


def upsampler(channels: int = 6, out_channels: int = 5, **kwargs: object) -> Upsample2D:
    torch.manual_seed(0)
    return Upsample2D(channels, use_conv=True, out_channels=out_channels, **kwargs).double().eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (1, 1), (8, 8)])
def test_subpixel_upsample_gives_the_upsamplers_numbers(size: tuple[int, int], channels_last: bool) -> None:
    original = upsampler()
    folded = SubpixelUpsample(original)
    x = torch.randn(3, 6, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = original(x)
    got = folded(x)
    assert got.shape == want.shape == (3, 5, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)  # the same sums, in float64 to the last bits
    if channels_last and size != (1, 1):  # assembled in the layout it came in (a 1x1 image is both)
        assert got.is_contiguous(memory_format=torch.channels_last)
    elif not channels_last:
        assert got.is_contiguous()
    torch.testing.assert_close(folded(x, output_size=(2 * size[0], 2 * size[1])), want, atol=1e-12, rtol=0)
    # another size than twice the input (diffusers' output_size for odd latents): the original runs
    odd = (2 * size[0] + 1, 2 * size[1] - 1)
    torch.testing.assert_close(folded(x, output_size=odd), original(x, output_size=odd), atol=0, rtol=0)


def test_folded_kernel_is_the_taps_sums() -> None:
    w = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = fold_weight(w)[0, 0]  # the transposed convolution's 4x4 kernel, rows and columns (W2 | W1+W2 | W0+W1 | W0)
    def fold(t: torch.Tensor) -> torch.Tensor:  # along the first axis
        return torch.stack([t[2], t[1] + t[2], t[0] + t[1], t[0]])

    torch.testing.assert_close(k, fold(fold(w[0, 0]).T).T)  # the rows folded, then the columns
    assert k[3, 3] == 0 and k[1, 1] == 4 + 5 + 7 + 8 and k[0, 0] == 8 and k[2, 2] == 0 + 1 + 3 + 4
    assert fold_weight(torch.randn(5, 6, 3, 3).half()).shape == (6, 5, 4, 4)  # (in, out, 4, 4), the module's dtype
    assert fold_weight(w.half()).dtype == torch.float16


def test_only_plain_upsamplers_are_folded() -> None:
    assert foldable(upsampler())
    assert not foldable(Upsample2D(4, use_conv=False))  # repetition alone: nothing to fold
    assert not foldable(Upsample2D(4, use_conv_transpose=True))
    assert not foldable(Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True))
    assert not foldable(Upsample2D(4, use_conv=True, kernel_size=5, padding=2))
    assert not foldable(Upsample2D(4, use_conv=True, interpolate=False))


def test_models_swap_in_and_back_with_their_names_and_numbers() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3).eval()
    x, t, c, z = torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 3, 8), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want_eps, want_img = unet(x, t, c).sample, vae.decode(z).sample
        names = {m: sorted(model.state_dict()) for m, model in (("unet", unet), ("vae", vae))}
        assert set_subpixel_upsample(unet, True) == 1 and set_subpixel_upsample(vae, True) == 2
        assert set_subpixel_upsample(unet, True) == 0  # already folded
        assert {m: sorted(model.state_dict()) for m, model in (("unet", unet), ("vae", vae))} == names
        unet.to(torch.float64)  # the folded kernels move with the model
        assert all(m.weight.dtype == torch.float64 for m in unet.modules() if isinstance(m, SubpixelUpsample))
        unet.float()
        torch.testing.assert_close(unet(x, t, c).sample, want_eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(z).sample, want_img, atol=1e-5, rtol=0)
        assert set_subpixel_upsample(unet, False) == 1 and set_subpixel_upsample(vae, False) == 2
        assert not any(isinstance(m, SubpixelUpsample) for m in [*unet.modules(), *vae.modules()])
        assert all(type(m).__name__ == "Upsample2D" for m in vae.decoder.modules() if "Upsample" in type(m).__name__)
