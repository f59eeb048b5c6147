"""Training benchmark: memory, speed and MFU of real DMD2 iterations; downloads nothing.

    python -m dmd2_train.bench [--rows sd15-b8,sdxl-b2-preset,...] [--budget-s 420] [--out FILE]
    python -m dmd2_train.bench --tiny            # the same code on toy models, on the CPU

Random weights in the real SD1.5 and SDXL UNet architectures (``dmd2_serve/configs``), random
prompt embeddings and random "real" latents: speed and memory do not depend on the values. Each
row builds the run's ``Trainer`` exactly as ``python -m dmd2_train`` does (generator and fake
score trained in full, GAN head, frozen bf16 teacher) in a child process of its own, so every
row starts from an empty GPU and an out-of-memory row is a result, not a crash.

Per row: peak allocated and reserved GPU memory, seconds per iteration (one generator step plus
``ratio`` fake-score steps, the two time-scale rule's unit) and per fake-only step, and the model
FLOPs utilisation: the FLOPs of one iteration (``torch.utils.flop_counter.FlopCounterMode``,
forward and backward, gradient-checkpointing recomputation included) / its time / the card's bf16
matmul peak, measured here. A memory lever whose package is missing (torchao) is reported as
unavailable. A time budget skips what would not fit, so the table always prints.

On an air-gapped GPU host with only torch and triton, bring diffusers, pydantic (+ pydantic-core,
annotated-types, typing-inspection), importlib_metadata (+ zipp) and torchao as wheels (about 15 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dmd2_serve.model.adapters import ReferenceArch, adapter
from dmd2_serve.model.schedule import Schedule
from dmd2_serve.server.launch import free_port

TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "transformer_layers_per_block": 1,
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "addition_time_embed_dim": 8}


@dataclass(frozen=True)
class Row:
    """One benchmarked configuration."""

    name: str
    arch: str  # a family id whose adapter has a reference architecture
    batch: int
    image: int
    preset: str  # the DistillConfig preset whose ratio / GAN weights apply
    options: dict[str, Any] = field(default_factory=dict)  # memory keys
    count_syncs: bool = False  # run one more iteration with CUDA's sync debug mode to count host syncs

    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        return f"{self.arch} b{self.batch} {self.image}px: {opts}"


ROWS = [  # in priority order: the budget skips the tail first
    # The two targets: SD1.5 MFU at batch 8 (with a count of host synchronisations), and SDXL at
    # 1024x1024, batch 2, on one 80 GB GPU (<= 75 GB reserved) with the sdxl preset's levers.
    Row("sd15-b8", "sd15", 8, 512, "sd15-4step", count_syncs=True),
    Row("sdxl-b2-preset", "sdxl", 2, 1024, "sdxl", {"gradient_checkpointing": True, "offload_optimizer": True}),
    Row("sdxl-b2-ckpt-8bit", "sdxl", 2, 1024, "sdxl", {"gradient_checkpointing": True, "optimizer": "adamw8bit"}),
    Row("sdxl-b2-ckpt", "sdxl", 2, 1024, "sdxl", {"gradient_checkpointing": True}),
    # The FSDP2 path on a one-process mesh, then each lever on its own where everything fits.
    Row("sd15-b8-fsdp2", "sd15", 8, 512, "sd15-4step", {"sharding": "fsdp2"}),
    Row("sd15-b8-ckpt", "sd15", 8, 512, "sd15-4step", {"gradient_checkpointing": True}),
    Row("sd15-b8-offload", "sd15", 8, 512, "sd15-4step", {"offload_optimizer": True}),
    Row("sd15-b8-keepgrads", "sd15", 8, 512, "sd15-4step", {"free_grads": False}),
    Row("sd15-b8-8bit", "sd15", 8, 512, "sd15-4step", {"optimizer": "adamw8bit"}),
    Row("sdxl-b2", "sdxl", 2, 1024, "sdxl"),
]
TINY_ROWS = [Row("tiny-sd15", "sd15", 2, 64, "sd15-4step"),
             Row("tiny-sd15-fsdp2", "sd15", 2, 64, "sd15-4step", {"sharding": "fsdp2"}),
             Row("tiny-sdxl-ckpt", "sdxl", 2, 64, "sdxl", {"gradient_checkpointing": True})]


class RandomBatches:
    """Random prompt embeddings and real latents of the architecture's shapes, on the device."""

    def __init__(self, arch: str, image: int, shape: tuple[int, int, int], device: torch.device) -> None:
        self.arch, self.image, self.shape, self.device = reference(arch), image, shape, device

    def _cond(self, n: int, g: torch.Generator) -> Any:
        return self.arch.conditioning(n, g, self.image)

    def prompts(self, n: int, g: torch.Generator) -> Any:
        return self._cond(n, torch.Generator(self.device).manual_seed(int(torch.randint(1 << 30, (1,), generator=g))))

    def real(self, n: int, g: torch.Generator, device_g: torch.Generator) -> Any:
        from .step import RealBatch

        return RealBatch(torch.randn((n, *self.shape), generator=device_g, device=self.device), self._cond(n, device_g))


def reference(arch: str) -> ReferenceArch:
    """The real architecture of a family (its adapter's)."""
    ref = adapter(arch).reference
    if ref is None:
        raise SystemExit(f"the {arch} family has no reference architecture to benchmark")
    return ref


def unet_config(arch: str, tiny: bool) -> dict[str, Any]:
    ref = reference(arch)
    cfg = ref.unet_config()
    if tiny:
        cfg.update(TINY_UNET)
        if "text_embeds" in ref.added:  # pooled text embedding + six time ids
            cfg["projection_class_embeddings_input_dim"] = ref.added["text_embeds"][0] + 6 * TINY_UNET[
                "addition_time_embed_dim"]
            cfg["attention_head_dim"] = 2
    return cfg


def matmul_peak_tflops(device: torch.device) -> float:
    """Measured bf16 matmul throughput (8192^3 on the GPU), TFLOP/s: the MFU denominator."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_row(row: Row, tiny: bool, peak_tflops: float) -> dict[str, Any]:
    """Child process: build the trainer, one counted warm-up iteration, the same iteration timed."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .config import DISTILL_PRESETS, DistillConfig
    from .trainer import Trainer

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if row.options.get("sharding") == "fsdp2" and not torch.distributed.is_initialized():
        port = free_port()  # a one-process mesh still runs the whole FSDP2 path
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    preset = DISTILL_PRESETS[row.preset] | row.options | dict(  # every row runs the whole step: GAN on
        batch_size=row.batch, image_size=row.image, warmup_steps=0, mixed_precision="bf16", gan=True,
        out=Path("/tmp/dmd2-bench"))
    cfg = DistillConfig(**preset)
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    factor = 8
    shape = (4, row.image // factor, row.image // factor)
    with torch.device(device):
        torch.manual_seed(0)
        teacher = UNet2DConditionModel.from_config(unet_config(row.arch, tiny))
    params = sum(p.numel() for p in teacher.parameters())
    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    batches = RandomBatches(row.arch, row.image, shape, device)
    uncond = batches._cond(1, torch.Generator(device).manual_seed(0))
    t0 = time.perf_counter()
    trainer = Trainer(cfg, accelerator, teacher, shape, Schedule(abar.double()), batches, uncond)
    del teacher
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    counter = FlopCounterMode(display=False)
    with counter, uncounted_optimizer_steps(trainer):  # warm-up iteration, counted: steps 0 .. ratio-1 (step 0 is the generator's)
        for step in range(cfg.ratio):
            trainer.train_step(step)
    trainer.flush_logs()
    flops = counter.get_total_flops()
    times = []
    for step in range(cfg.ratio):  # the same steps again (same draws), timed
        _sync(device)
        t1 = time.perf_counter()
        trainer.train_step(step)
        _sync(device)
        times.append(time.perf_counter() - t1)
    logs = trainer.flush_logs()
    iteration = sum(times)
    syncs = count_host_syncs(trainer, cfg.ratio) if row.count_syncs and device.type == "cuda" else None
    result = {"row": row.name, "arch": row.arch, "batch": row.batch, "image": row.image, **row.options,
              "ratio": cfg.ratio, "params_m": params / 1e6, "build_s": build_s, "iteration_s": iteration,
              "fake_step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None,
              "generator_step_s": times[0], "tflop_per_iteration": flops / 1e12,
              "mfu": flops / iteration / (peak_tflops * 1e12) if peak_tflops else None,
              "finite": all(v == v for v in logs.values()), "host_syncs_per_iteration": syncs}
    if device.type == "cuda":
        result |= {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                   "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    return result


def count_host_syncs(trainer: Any, ratio: int) -> int:
    """Host synchronisations in one iteration, from CUDA's sync debug mode (a quiet loop has none)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(ratio):
                trainer.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    trainer.flush_logs()
    return sum("synchroniz" in str(w.message) for w in caught)


@contextmanager
def uncounted_optimizer_steps(trainer: Any) -> Iterator[None]:
    """Optimiser steps run outside the FLOP counter: they do no matmul work, and torchao's compiled
    8-bit step cannot be traced under a dispatch mode."""
    from torch.utils._python_dispatch import _disable_current_modes

    inner = [trainer.opt_g.optimizer, trainer.opt_f.optimizer]

    def outside(step: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            with _disable_current_modes():
                return step(*args, **kwargs)
        return run

    for opt in inner:
        opt.step = outside(opt.step)
    try:
        yield
    finally:
        for opt in inner:
            del opt.step  # back to the class's method


def lever_available(row: Row) -> str | None:
    """Why a row cannot run here (a missing package), or None."""
    if row.options.get("optimizer") == "adamw8bit":
        try:
            import torchao.optim  # noqa: F401
        except ImportError:
            return "torchao is not installed (pip install 'dmd2-fast[lowmem]')"
    return None


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | memory options | peak allocated GiB | peak reserved GB | s / iteration | s / fake step |"
             " TFLOP / iteration | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={r[k]}" for k in ("sharding", "gradient_checkpointing", "optimizer",
                                                  "offload_optimizer", "free_grads") if k in r) or "defaults"
        if "error" in r:
            lines.append(f"| {r['row']} | {opts} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['row']} | {opts} | {_f(r.get('peak_allocated_gib'), 1)} | {_f(r.get('peak_reserved_gb'), 1)} |"
                     f" {_f(r['iteration_s'])} | {_f(r['fake_step_s'])} | {_f(r['tflop_per_iteration'], 1)} |"
                     f" {_f(100 * r['mfu'], 1) + '%' if r.get('mfu') is not None else ''} |")
    return "\n".join(lines)


def _f(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _catalogue(tiny: bool) -> dict[str, Row]:
    """The rows by name: the toy ones for the tests or the real ones."""
    return {r.name: r for r in (TINY_ROWS if tiny else ROWS)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked, row names included (argparse's one-line error and exit 2 on a bad one)."""
    p = argparse.ArgumentParser(prog="python -m dmd2_train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all, in order)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no row after this many seconds")
    p.add_argument("--row-timeout-s", type=float, default=150.0,
                   help="give up on one row after this (a row that starts within the budget gets all of it)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default docs/bench/train-<card>-<date>.json)")
    p.add_argument("--tiny", action="store_true", help="toy models on the CPU (the tests)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = _catalogue(args.tiny)
    if unknown := [n for n in (args.rows.split(",") if args.rows else []) if n not in names]:
        p.error(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(sorted(names))}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the rows within the budget, each in a process of its own; print the table and write the JSON."""
    args = parse_args(argv)
    catalogue = _catalogue(args.tiny)
    if args.child:
        try:
            print("result:" + json.dumps(run_row(catalogue[args.child], args.tiny, args.peak)), flush=True)
        except torch.OutOfMemoryError:
            print("result:" + json.dumps({"row": args.child, "error": "out of memory"}), flush=True)
        return 0

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = matmul_peak_tflops(device)
    header = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "bf16_matmul_tflops": peak, "rows": []}
    print(f"{card}, torch {torch.__version__}: bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    out = args.out or Path("docs/bench") / f"train-{card.lower().replace(' ', '-')}-{header['date']}.json"
    names = args.rows.split(",") if args.rows else list(catalogue)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    for name in names:
        row = catalogue[name]
        left = args.budget_s - (time.perf_counter() - start)
        why = lever_available(row) or (None if left > 20 else f"skipped: {left:.0f} s of the budget left")
        if why:
            result = {"row": name, **row.options, "error": why}
        else:
            cmd = [sys.executable, "-m", "dmd2_train.bench", "--child", name, "--peak", str(peak)] + (["--tiny"] if args.tiny else [])
            try:
                # The budget decides whether a row starts; a started row gets its whole timeout.
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout_s)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("result:")]
                result = json.loads(lines[-1][7:]) if lines else {
                    "row": name, **row.options, "error": f"failed: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else proc.returncode}"}
            except subprocess.TimeoutExpired as e:
                said = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
                result = {"row": name, **row.options, "error": f"timed out after {args.row_timeout_s:.0f} s",
                          "stderr_tail": said.strip()[-600:]}
        result.setdefault("label", row.label())
        header["rows"].append(result)
        print("row: " + json.dumps(result), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(header, indent=1))
    print(f"\n{card}, torch {torch.__version__}, {header['date']}; bf16 matmul peak {peak:.0f} TFLOP/s\n")
    print(table(header["rows"]), flush=True)
    for r in header["rows"]:
        if r.get("host_syncs_per_iteration") is not None:
            print(f"host synchronisations in one {r['row']} iteration (CUDA sync debug mode): {r['host_syncs_per_iteration']}")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
