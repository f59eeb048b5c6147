"""``--precision fp8``: float8 matmuls for the UNet's attention blocks, through torchao.

The linear layers inside the UNet's transformer blocks (attention projections and the
feed-forward, most of its matmul FLOPs at 1024x1024) get torchao's dynamic float8 quantisation
with one scale per row (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``):
weights stored in float8 e4m3, each activation row scaled and cast on the fly, ``torch._scaled_mm``
on the tensor cores. Row-wise scaling produces bfloat16, so the UNet runs in bfloat16 around
them. Convolutions, norms and the VAE are untouched. Needs a GPU with float8 tensor cores
(compute capability 8.9: Ada, Hopper and later) and ``pip install 'dmd2-fast[fp8]'`` (torchao).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from torch import nn

from .errors import BackendError

Precision = Literal["default", "fp8"]
PRECISIONS: tuple[str, ...] = ("default", "fp8")
FP8_CAPABILITY = (8, 9)


def check_precision(precision: str, backend: str) -> None:
    """Fail early, naming the fix, when ``precision`` cannot run with this install (no device query:
    the server's main process must not initialise CUDA before its workers start)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp8":
        return
    if backend in ("tensorrt", "aoti"):
        raise BackendError(f"--precision fp8 runs through torchao's float8 tensors, which {backend} does not take;"
                           " use it with --backend compile (or eager)")
    if importlib.util.find_spec("torchao") is None:
        raise BackendError("--precision fp8 needs torchao, which is not installed: pip install 'dmd2-fast[fp8]'")
    if not torch.cuda.is_available():
        raise BackendError("--precision fp8 needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or"
                           " newer: L4, L40S, RTX 4090, H100, H200); none is visible here, so serve without it")


def is_attention_linear(module: nn.Module, name: str) -> bool:
    """Whether ``name`` is a linear layer in a transformer block with float8-friendly sizes."""
    return (isinstance(module, nn.Linear) and ".transformer_blocks." in f".{name}"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def quantize_fp8(unet: nn.Module) -> None:
    """Put ``unet`` in bfloat16 and its attention-block linears in float8 (in place). Raises
    :class:`BackendError` where the device cannot run float8 matmuls."""
    device = next(unet.parameters()).device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < FP8_CAPABILITY:
        where = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})" \
            if capability else f"the {device.type} device"
        raise BackendError(f"--precision fp8 needs float8 tensor cores (compute capability 8.9 or newer: L4, L40S,"
                           f" RTX 4090, H100, H200); the model is on {where}; serve without --precision fp8")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise BackendError(f"--precision fp8 needs torchao: pip install 'dmd2-fast[fp8]' ({e})") from e
    unet.to(torch.bfloat16)
    # set_inductor_config=False: the compile backend's own settings stay as they are.
    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
              filter_fn=is_attention_linear)
