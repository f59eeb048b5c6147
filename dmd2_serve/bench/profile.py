"""Where a call's device time goes: its kernels by class (convolutions, matrix products, attention,
Inductor's generated Triton kernels, copies, the rest), from ``torch.profiler``.

Batch 1's breakdown (one UNet evaluation, the VAE decode) says how long each part takes; this says
what inside it, so that a lever is chosen for the time it can reach: float8 touches the matrix
products only, max-autotune the convolutions and matrix products, freezing the layouts and copies.

On a GPU the classes come from the kernels' own names (cuDNN's ``..._fprop_implicit_gemm...``,
cuBLAS's ``nvjet...`` / ``..._gemm...``, ``flash``/``fmha`` attention, Inductor's ``triton_...``),
each kernel's time as the device ran it (the profiled calls launch kernel by kernel, outside the
CUDA graph; their gaps are not counted, so the classes add up to about the graph's time). On the
CPU the classes come from the ATen ops' names, each op's own time; the kernels Inductor generates
for the CPU are not seen one by one and count as "other".
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

# Inductor's kernels are named by what they fused ("triton_poi_fused_convolution_silu_3" is the
# bias and SiLU after a convolution, not one): they are classed by their prefix first, its
# templates ("triton_tem_...", max-autotune's matrix products and convolutions) apart.
TRITON_TEMPLATE = "Triton templates (matmul, conv)"
TRITON_FUSED = "Triton (Inductor's fused)"
# Every other kernel by (class, pattern), first match wins. Order matters: cuDNN's convolution
# kernels have "gemm" and "nhwc" in their names, CUTLASS's matmuls "Copy_Atom" in their template
# arguments, a transposed convolution "transpose"; cuDNN's own NCHW <-> NHWC transforms (a layout
# the convolution did not take as it came) are layout, not convolution.
LAYOUT = "copies and layout"
CLASSES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    (LAYOUT, r"nchwToNhwc|nhwcToNchw"),
    ("convolution", r"convolution|conv[_\d]|fprop|dgrad|wgrad|winograd|implicit_gemm|cudnn"),
    ("matmul", r"gemm|gemv|nvjet|cutlass|cublas|scaled_mm|\b(aten::)?(addmm|mm|bmm|matmul|linear)\b"),
    (LAYOUT, (r"direct_copy|copy_kernel|CatArray|Memcpy|Memset|upsample_nearest|aten::(copy_|_to_copy|cat|clone|"
              r"contiguous|transpose|permute)\b")),
)
OTHER = "other"


def kernel_class(name: str) -> str:
    """The class of a kernel (or, on the CPU, an ATen op) by its name; :data:`OTHER` when none fits."""
    if name.startswith("triton_tem"):
        return TRITON_TEMPLATE
    if name.startswith("triton"):
        return TRITON_FUSED
    for cls, pattern in CLASSES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return OTHER


def device_time_by_class(fn: Callable[[], Any], device: torch.device, calls: int = 3,
                         top: int = 3) -> dict[str, dict[str, Any]]:
    """Per class: ``ms`` per call of ``fn`` (already warmed up), its ``share`` of the profiled time,
    and its ``largest`` kernels (name, ms per call), largest first, at most ``top`` of them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        # Inductor marks each compiled graph's call ("## Call CompiledFxGraph ... ##"), and the profiler
        # files that mark as a device event spanning its kernels: it is not a kernel
        if cuda and event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            by_kernel[_short(event.name)] += event.device_time_total
        elif not cuda and event.device_type == DeviceType.CPU:
            by_kernel[event.name] += event.self_cpu_time_total
    if not by_kernel:
        raise RuntimeError(f"the profiler recorded no {'kernels' if cuda else 'ops'} (CUPTI unavailable?)")
    total_us = sum(by_kernel.values())
    classes: dict[str, dict[str, Any]] = {}
    for kernel, us in sorted(by_kernel.items(), key=lambda kv: -kv[1]):
        entry = classes.setdefault(kernel_class(kernel), {"ms": 0.0, "share": 0.0, "largest": []})
        entry["ms"] += us / 1000 / calls
        entry["share"] += us / total_us
        if len(entry["largest"]) < top:
            entry["largest"].append((kernel[:120], us / 1000 / calls))
    return dict(sorted(classes.items(), key=lambda kv: -kv[1]["ms"]))


def _short(kernel: str) -> str:
    """A kernel's name without C++'s ``void`` and ``at::native::`` noise (its template arguments kept:
    they tell CUTLASS's and PyTorch's generic kernels apart)."""
    return re.sub(r"^void |at::native::|\(anonymous namespace\)::", "", kernel)


def profile_table(rows: list[dict[str, Any]]) -> str:
    """The ``kind == "profile"`` rows as a markdown table (empty when there are none)."""
    rows = [r for r in rows if r.get("kind") == "profile"]
    if not rows:
        return ""
    lines = ["| arch | part | class | ms / call | share | largest kernels (ms / call) |", "|---|---|---|---|---|---|"]
    for r in rows:
        largest = "; ".join(f"{name} ({ms:.2f})" for name, ms in r["largest"])
        lines.append(f"| {r['arch']} | {r['part']} | {r['class']} | {r['ms']:.2f} | {100 * r['share']:.0f}% |"
                     f" {largest} |")
    return "\n".join(lines)
