"""The fused re-noise kernel against eager PyTorch, plain launches and inside CUDA graphs."""

from __future__ import annotations

import torch
from torch import Tensor

from .report import Report, _bench_us, _graph_us


def bench_renoise(report: Report, device: torch.device, shapes: list[tuple[int, ...]], copy_gbps: float) -> None:
    """The fused kernel against eager PyTorch, plain launches and inside CUDA graphs."""
    from dmd2_kernels.renoise import renoise_reference, renoise_triton

    for shape in shapes:
        x = torch.randn(shape, device=device, dtype=torch.float16)
        eps = torch.randn_like(x)
        seeds = torch.arange(shape[0], device=device, dtype=torch.int64)
        a, s, inv_at, s_t = 0.5 ** 0.5, 0.5 ** 0.5, 1 / 0.1 ** 0.5, 0.9 ** 0.5
        modes = {
            "x0": (lambda: a * x + s * torch.randn_like(x), lambda: renoise_triton(x, seeds, 1, 0.5)),
            "from eps": (lambda: a * ((x.float() - s_t * eps.float()) * inv_at).half() + s * torch.randn_like(x),
                         lambda: renoise_triton(x, seeds, 1, 0.5, eps=eps, abar_t=0.1)),
        }
        for mode, (eager, kernel) in modes.items():
            # Correctness first: the kernel's numbers are the reference's (noise mode, exact formula).
            got = kernel().float()
            want = renoise_reference(x[:2].cpu(), seeds[:2].cpu(), 1, 0.5,
                                     eps=eps[:2].cpu() if mode == "from eps" else None,
                                     abar_t=0.1 if mode == "from eps" else None).float()
            err = (got[:2].cpu() - want).abs().max().item()
            row = {"kind": "renoise", "shape": "x".join(map(str, shape)), "mode": mode, "max_err": err,
                   "eager_us": _bench_us(eager, device), "kernel_us": _bench_us(kernel, device),
                   "kernel_graph_us": _graph_us(kernel, device), "eager_graph_us": _graph_us(eager, device)}
            moved = x.numel() * 2 * (3 if mode == "from eps" else 2)  # fp16 reads + write
            row["gbps"] = moved / (row["kernel_graph_us"] / 1e6) / 1e9
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            report.add(**row)
        if len(shapes) > 2 and shape not in (shapes[1], shapes[-1]):
            continue
        for block in (128, 256, 1024):  # tuning knobs of the kernel, for the note
            for fast_math in ((False, True) if device.type == "cuda" else (False,)):  # fast math: GPU only
                def variant(block: int = block, fast_math: bool = fast_math) -> Tensor:
                    return renoise_triton(x, seeds, 1, 0.5, eps=eps, abar_t=0.1, block=block, fast_math=fast_math)

                err = (variant()[:2].float().cpu() - renoise_reference(
                    x[:2].cpu(), seeds[:2].cpu(), 1, 0.5, eps=eps[:2].cpu(), abar_t=0.1).float()).abs().max().item()
                us = _graph_us(variant, device)
                gbps = x.numel() * 2 * 3 / (us / 1e6) / 1e9
                report.add(kind="renoise-variant", shape="x".join(map(str, shape)), block=block, fast_math=fast_math,
                           graph_us=us, gbps=gbps, pct_copy=100 * gbps / copy_gbps, max_err=err)
