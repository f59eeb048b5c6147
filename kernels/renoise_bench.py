"""The re-noise kernel's own benchmark, beside it: the fused Triton kernel against eager PyTorch.

    python -m dmd2_kernels.renoise_bench [--shapes 1x4x64x64,8x4x128x128] [--out rows.json]
    TRITON_INTERPRET=1 python -m dmd2_kernels.renoise_bench --tiny        # the CPU, toy shapes

Per shape (fp16, batch x channels x height x width) and mode (``x0``: re-noise an x0 estimate;
``from eps``: x0 from the UNet's eps first), it checks the kernel against
:func:`~dmd2_kernels.renoise.renoise_reference` (max error), then times eager PyTorch and the
kernel, each with plain launches and replayed from a CUDA graph, and judges the kernel's bytes
moved against the device's copy bandwidth (``% of copy``: a memory-bound kernel's roofline).
The second and last shapes (every shape of two or fewer) also time the kernel's tuning knobs
(block size, fast math). The
serving benchmark (``python -m dmd2_serve.bench``) runs the same rows in its report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .renoise import renoise_reference, renoise_triton
from .timing import copy_bandwidth_gbps, graph_us, time_us

GPU_SHAPES = [(1, 4, 64, 64), (8, 4, 128, 128), (64, 4, 128, 128), (256, 4, 128, 128)]  # SD1.5 b1 .. SDXL b256
TINY_SHAPES = [(1, 4, 8, 8), (2, 4, 16, 16)]
BLOCKS = (128, 256, 1024)


def renoise_rows(device: torch.device, shapes: list[tuple[int, ...]], copy_gbps: float) -> Iterator[dict[str, Any]]:
    """The benchmark's rows, one at a time (``kind`` ``renoise``, then ``renoise-variant``)."""
    for i, shape in enumerate(shapes):
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
            err = _error(kernel(), x, seeds, eps if mode == "from eps" else None)  # correctness first
            row = {"kind": "renoise", "shape": _name(shape), "mode": mode, "max_err": err,
                   "eager_us": time_us(eager, device), "kernel_us": time_us(kernel, device),
                   "kernel_graph_us": graph_us(kernel, device), "eager_graph_us": graph_us(eager, device)}
            moved = x.numel() * 2 * (3 if mode == "from eps" else 2)  # fp16 reads + write
            row["gbps"] = moved / (row["kernel_graph_us"] / 1e6) / 1e9
            row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            yield row
        if len(shapes) > 2 and i not in (1, len(shapes) - 1):
            continue
        for block in BLOCKS:  # the kernel's tuning knobs
            for fast_math in ((False, True) if device.type == "cuda" else (False,)):  # fast math: GPU only
                def variant(block: int = block, fast_math: bool = fast_math) -> Tensor:
                    return renoise_triton(x, seeds, 1, 0.5, eps=eps, abar_t=0.1, block=block, fast_math=fast_math)

                us = graph_us(variant, device)
                gbps = x.numel() * 2 * 3 / (us / 1e6) / 1e9
                yield {"kind": "renoise-variant", "shape": _name(shape), "block": block, "fast_math": fast_math,
                       "graph_us": us, "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
                       "max_err": _error(variant(), x, seeds, eps)}


def _name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _error(got: Tensor, x: Tensor, seeds: Tensor, eps: Tensor | None) -> float:
    """Max difference of the first two samples from the reference (noise mode, exact formula)."""
    want = renoise_reference(x[:2].cpu(), seeds[:2].cpu(), 1, 0.5, eps=None if eps is None else eps[:2].cpu(),
                             abar_t=None if eps is None else 0.1)
    return (got[:2].float().cpu() - want.float()).abs().max().item()


def renoise_table(rows: list[dict[str, Any]]) -> str:
    """The ``renoise`` and ``renoise-variant`` rows among ``rows`` as two Markdown tables."""
    lines = ["| re-noise, fp16 | eager PyTorch us | kernel us | kernel in graph us | eager in graph us |"
             " speed-up (graph) | GB/s (kernel) | % of copy | max err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "renoise":
            lines.append(f"| {r['shape']} {r['mode']} | {r['eager_us']:.2f} | {r['kernel_us']:.2f} |"
                         f" {r['kernel_graph_us']:.2f} | {r['eager_graph_us']:.2f} |"
                         f" {r['eager_us'] / r['kernel_graph_us']:.1f}x | {r['gbps']:.0f} | {r['pct_copy']:.0f}% |"
                         f" {r['max_err']:.1e} |")
    lines += ["", "| re-noise from eps, variants | block | fast math | in graph us | GB/s | % of copy | max err |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "renoise-variant":
            lines.append(f"| {r['shape']} | {r['block']} | {r['fast_math']} | {r['graph_us']:.2f} |"
                         f" {r['gbps']:.0f} | {r['pct_copy']:.0f}% | {r['max_err']:.1e} |")
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(d) for d in part.split("x")) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are BxCxHxW, comma-separated (e.g. 8x4x128x128), not '{text}'")
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes are BxCxHxW with every size at least 1, not '{text}'")
    return shapes


def main(argv: list[str] | None = None) -> int:
    """Run the rows on the GPU (``--tiny``: toy shapes on the CPU), print the tables, write ``--out``."""
    p = argparse.ArgumentParser(prog="python -m dmd2_kernels.renoise_bench", description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_shapes, default=None, help="BxCxHxW,... (default: SD1.5 batch 1 to SDXL 256)")
    p.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (set TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("error: no CUDA device here: run on a GPU, or add --tiny (with TRITON_INTERPRET=1) for toy shapes on"
              " the CPU", file=sys.stderr)
        return 2
    copy_gbps = copy_bandwidth_gbps(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; copy bandwidth (read + write) {copy_gbps:.0f} GB/s", flush=True)
    rows = list(renoise_rows(device, args.shapes or (TINY_SHAPES if args.tiny else GPU_SHAPES), copy_gbps))
    if args.out is not None:
        args.out.write_text(json.dumps({"device": name, "copy_gbps": copy_gbps, "rows": rows}, indent=1))
    print(renoise_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
