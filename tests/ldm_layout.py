"""A diffusers SD 1.x pipeline's weights in the original (CompVis / LDM) single-file key layout.

The inverse of what diffusers' single-file loader reads, written for the tests: it lets them
build a real single-file checkpoint from a tiny pipeline, offline. Driven by the UNet's config
(blocks, layers per block), so any SD1-shaped UNet maps; the LDM names:

    UNet   model.diffusion_model.   input_blocks.{i}.{0: ResBlock | 1: SpatialTransformer | 0.op: down}
                                    middle_block.{0, 2: ResBlock | 1: SpatialTransformer}
                                    output_blocks.{i}.{0: ResBlock | 1: SpatialTransformer | 1/2.conv: up}
                                    time_embed.{0, 2}, out.{0, 2}
    VAE    first_stage_model.       {en,de}coder.{down,up}.{i}.block.{j}, .mid.block_{1,2}, .mid.attn_1
    CLIP   cond_stage_model.transformer.text_model.*   (the transformers names)
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."

UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_FIXED = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed_first(rest: str, names: dict[str, str]) -> str:
    """``rest`` with its leading module name (one of ``names``) renamed."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(name: str, config: Any) -> str:
    """A diffusers ``UNet2DConditionModel`` parameter name -> its LDM name (without the prefix)."""
    per = config.layers_per_block + 1  # LDM: layers_per_block layers, then the down/up sampler
    head, _, leaf = name.rpartition(".")
    if head in UNET_FIXED:
        return f"{UNET_FIXED[head]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * per + j
        return f"input_blocks.{i}.0.{_renamed_first(rest, UNET_RESNET)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_renamed_first(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * per + j
        return f"output_blocks.{i}.0.{_renamed_first(rest, UNET_RESNET)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        b = int(m[1])
        slot = 2 if config.up_block_types[b].startswith("CrossAttn") else 1  # after the block's attention
        return f"output_blocks.{b * per + per - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet parameter {name}")


def vae_key(name: str, num_blocks: int) -> str:
    """A diffusers ``AutoencoderKL`` parameter name -> its LDM name (without the prefix)."""
    head, _, leaf = name.rpartition(".")
    if head in VAE_FIXED:
        return f"{VAE_FIXED[head]}.{leaf}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_renamed_first(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):  # LDM counts up blocks upwards
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_renamed_first(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        return f"{m[1]}.mid.attn_1.{_renamed_first(m[2], VAE_ATTENTION)}"
    return name  # encoder/decoder conv_in, conv_out, quant_conv, post_quant_conv: the same names


def sd1_single_file(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Tensor]:
    """The three models' weights as one original-layout state dict (an SD 1.x ``.safetensors``)."""
    out: dict[str, Tensor] = {}
    for name, value in unet.state_dict().items():
        out[UNET + unet_key(name, unet.config)] = value
    for name, value in vae.state_dict().items():
        key = vae_key(name, len(vae.config.block_out_channels))
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE + key] = value
    for name, value in text_encoder.state_dict().items():  # transformers >= 5.6 drops the text_model. level
        out[CLIP + (name if name.startswith("text_model.") else "text_model." + name)] = value
    return {k: v.contiguous() for k, v in out.items()}
