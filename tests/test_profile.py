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
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda"
     "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(float)#1}>>", "copies and layout"),
    ("void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<c10::BFloat16>", "copies and layout"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),  # transposed
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::Copy_Atom<cute::SM90_TMA_LOAD>>>", "matmul"),
    ("void GammaBetaBackwardCUDAKernel_convert<float>", OTHER),  # "convert" is not a convolution
    # ATen ops, as the CPU profile shows them
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_group_norm", OTHER),
    ("aten::conv_transpose2d", "convolution"),
    ("mkldnn::_convolution_transpose_pointwise", "convolution"),  # --subpixel-upsample with freezing on the CPU
    ("aten::copy_", "copies and layout"),
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


def test_cuda_profile_counts_kernels_not_inductors_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the profiler files Inductor's "## Call CompiledFxGraph ##" mark as a device event that spans the
    graph's kernels: counted, it would double the total and fill "other" (pytorch#130730)."""
    from torch.autograd import DeviceType

    class Event:
        def __init__(self, name: str, us: float, device: DeviceType = DeviceType.CUDA, mark: bool = False) -> None:
            self.name, self.device_time_total, self.device_type, self.is_user_annotation = name, us, device, mark
            self.self_cpu_time_total = 0.0

    events = [Event("## Call CompiledFxGraph fxyz ##", 1000.0, mark=True),
              Event("sm90_xmma_fprop_implicit_gemm_bf16_nhwc", 600.0), Event("nvjet_hsh_128x256", 300.0),
              Event("triton_poi_fused_add_silu_0", 90.0), Event("Memcpy DtoD (Device -> Device)", 10.0),
              Event("aten::convolution", 5000.0, device=DeviceType.CPU)]  # host side: not device time

    class Profile:
        def __init__(self, **kwargs: object) -> None:
            pass

        def __enter__(self) -> Profile:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def events(self) -> list[Event]:
            return events

    monkeypatch.setattr(torch.profiler, "profile", Profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    classes = device_time_by_class(lambda: None, torch.device("cuda"), calls=2)
    assert {c: round(e["ms"], 3) for c, e in classes.items()} == {
        "convolution": 0.3, "matmul": 0.15, TRITON_FUSED: 0.045, "copies and layout": 0.005}
    assert classes["convolution"]["share"] == pytest.approx(0.6)
    events[:] = [events[0]]  # nothing but the mark: an error (the caller notes it), not an empty table
    with pytest.raises(RuntimeError, match="recorded no kernels"):
        device_time_by_class(lambda: None, torch.device("cuda"))
