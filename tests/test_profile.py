"""Batch 1's device time by class of kernel: the classes, and a profiled call adds up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dmd2_serve.bench.profile import OTHER, TRITON_FUSED, TRITON_TEMPLATE, device_time_by_class, kernel_class


@pytest.mark.parametrize("name, cls", [
    # kernel names as the profiler shows them on an H100 / H200 (cuDNN, cuBLAS, flash and cutlass attention, Inductor)
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1",
     "convolution"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "copies and layout"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("triton_poi_fused_convolution_silu_3", TRITON_FUSED),  # a convolution's epilogue, not a convolution
    ("triton_red_fused_native_group_norm_7", TRITON_FUSED),
    ("triton_tem_fused_mm_4", TRITON_TEMPLATE),
    ("Memcpy DtoD (Device -> Device)", "copies and layout"),
    ("void at::native::elementwise_kernel<128, 4>", OTHER),
    # ATen ops, as the CPU profile shows them
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_group_norm", OTHER),
])
def test_kernel_class(name: str, cls: str) -> None:
    assert kernel_class(name) == cls


def test_device_time_by_class_adds_up() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.Flatten(),
                          nn.Linear(32 * 16 * 16, 64))
    x = torch.randn(4, 8, 16, 16)
    with torch.no_grad():
        model(x)
    classes = device_time_by_class(lambda: model(x), torch.device("cpu"), calls=3, top=2)
    assert {"convolution", "matmul"} <= set(classes)
    assert sum(c["share"] for c in classes.values()) == pytest.approx(1.0)
    assert all(0 < len(c["largest"]) <= 2 and c["ms"] >= c["largest"][0][1] > 0 for c in classes.values())
    assert list(classes) == sorted(classes, key=lambda c: -classes[c]["ms"])  # largest first
    assert any("convolution" in name for name, _ in classes["convolution"]["largest"])
