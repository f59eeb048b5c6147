"""GPU benchmark of the fast path; downloads nothing.

    python -m dmd2_serve.bench [--archs sd15,sdxl] [--batches 1,4,16] [--budget-s 450]

Random weights in the real SD1.5 and SDXL architectures (configs in ``dmd2_serve/configs``;
speed does not depend on weight values), fp16 UNet and bf16 VAE. For each architecture and
batch it times the 4-step loop end to end, from noise to decoded image (text encoding
excluded), for:

* ``plain``: the eager diffusers-style loop: UNet, ``LCMScheduler.step`` (which draws its noise
  with ``torch.randn``), ``vae.decode``;
* ``eager``: our loop (fused Philox re-noise kernel) on the same eager modules, without and with
  the whole-loop CUDA graph;
* ``compile``: torch.compile (``full`` and/or ``regional`` scope) + the CUDA graph; its first
  call (compilation + capture) is reported as ``prepare s``, and its images are compared with
  the eager path's;
* ``tensorrt`` and xformers attention where those packages are installed (said otherwise);

plus the re-noise kernel against eager PyTorch, the copy bandwidth it is judged by, and the
cold start of a second process with a warm compile cache. Every stage checks the time budget
first and a watchdog stops the run at the budget, so the table always prints. ``--tiny`` runs
the same code on small models on the CPU (for the tests).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model.adapters import ADAPTERS, ReferenceArch

TIMESTEPS = (999, 749, 499, 249)
Arch = ReferenceArch
# The families with a real architecture to benchmark (their adapters' reference configs).
ARCHS = {family: a.reference for family, a in ADAPTERS.items() if a.reference is not None}

# --tiny: the same families at toy size (CPU tests of this script).
TINY = {
    "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": 1,
             "addition_time_embed_dim": 4},
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
}


class OutOfTime(Exception):
    """Raised by the watchdog when the budget is spent."""


class Report:
    """Rows of the result table, printed as they come and written to JSON at the end."""

    def __init__(self, out: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.out = out

    def add(self, **row: Any) -> None:
        self.rows.append(row)
        print("row:", json.dumps(row), flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print("note:", text, flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps({"rows": self.rows, "notes": self.notes}, indent=1))

    def table(self) -> str:
        """The end-to-end and kernel rows as two markdown tables."""
        lines = ["| arch | batch | backend | ms / batch | ms / image | vs plain | prepare s | peak GiB | check |",
                 "|---|---|---|---|---|---|---|---|---|"]
        plain = {(r["arch"], r["batch"]): r["ms"] for r in self.rows if r.get("backend") == "plain"}
        for r in self.rows:
            if "arch" not in r:
                continue
            base = plain.get((r["arch"], r["batch"]))
            speed = f"{base / r['ms']:.2f}x" if base and r.get("ms") else ""
            lines.append(f"| {r['arch']} | {r['batch']} | {r['backend']} | {_f(r.get('ms'))} | "
                         f"{_f(r['ms'] / r['batch'] if r.get('ms') else None)} | {speed} | {_f(r.get('prepare_s'), 1)} | "
                         f"{_f(r.get('peak_gib'), 1)} | {r.get('check', '')} |")
        lines += ["", "| re-noise, fp16 | eager PyTorch us | kernel us | kernel in graph us | eager in graph us |"
                  " speed-up (graph) | GB/s (kernel) | % of copy |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if r.get("kind") == "renoise":
                lines.append(f"| {r['shape']} {r['mode']} | {_f(r['eager_us'])} | {_f(r['kernel_us'])} | "
                             f"{_f(r['kernel_graph_us'])} | {_f(r['eager_graph_us'])} | "
                             f"{_f(r['eager_us'] / r['kernel_graph_us'], 1)}x | {_f(r['gbps'], 0)} | "
                             f"{_f(r['pct_copy'], 0)}% |")
        lines += ["", "| re-noise from eps, variants | block | fast math | in graph us | GB/s | % of copy | max err |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            if r.get("kind") == "renoise-variant":
                lines.append(f"| {r['shape']} | {r['block']} | {r['fast_math']} | {_f(r['graph_us'])} | "
                             f"{_f(r['gbps'], 0)} | {_f(r['pct_copy'], 0)}% | {r['max_err']:.1e} |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def _f(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def timed_ms(fn: Callable[[], Any], device: torch.device, target_s: float = 1.5, max_reps: int = 30) -> float:
    """Median milliseconds of ``fn`` (CUDA events on the GPU), after one warm-up call."""
    return timed(fn, device, target_s, max_reps)[0]


def timed(fn: Callable[[], Any], device: torch.device, target_s: float = 1.5, max_reps: int = 30) -> tuple[float, Any]:
    """(median ms, last result) of ``fn`` after one warm-up call; calls over 0.5 s are timed twice."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    min_reps = 2 if time.perf_counter() - t0 > 0.5 else 3
    times: list[float] = []
    deadline = time.perf_counter() + target_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t1 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t1) * 1000)
    return statistics.median(times), out


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, bytes read plus written, GB/s."""
    n = 2**28 if device.type == "cuda" else 2**22
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = timed_ms(lambda: b.copy_(a), device, target_s=0.5)
    return 2 * a.numel() * 4 / (ms / 1000) / 1e9


# --------------------------------------------------------------------------------------------
# Re-noise kernel
# --------------------------------------------------------------------------------------------

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


def _bench_us(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return 1000 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return 1000 * timed_ms(fn, device, target_s=0.2)


def _graph_us(fn: Callable[[], Any], device: torch.device, calls: int = 20) -> float:
    """Per-call time of ``fn`` replayed from a CUDA graph of ``calls`` calls (no launch gaps)."""
    if device.type != "cuda":
        return _bench_us(fn, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _bench_us(graph.replay, device) / calls


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

def build(arch: Arch, device: torch.device, tiny: bool, name: str = "generator") -> Any:
    """A few-step pipeline on a random-weight fp16 UNet and bf16 (CPU: fp32) VAE, made on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from ..model.adapters import LatentBackbone
    from ..model.pipeline import FewStepPipeline
    from ..model.schedule import Schedule

    unet_cfg = arch.unet_config()
    vae_cfg = arch.vae_config()
    if tiny:
        unet_cfg.update(TINY["unet"])
        if arch.added:  # pooled text embedding + six time ids, each embedded in addition_time_embed_dim
            unet_cfg["projection_class_embeddings_input_dim"] = arch.added["text_embeds"][0] + 6 * 4
        vae_cfg.update(TINY["vae"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
    half = device.type == "cuda"
    unet = unet.to(torch.float16 if half else torch.float32).eval().requires_grad_(False)
    vae = vae.to(torch.bfloat16 if half else torch.float32).eval().requires_grad_(False)
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    schedule = Schedule(alphas.double(), timesteps=TIMESTEPS)
    return FewStepPipeline(unet, LatentBackbone(vae, 32 if tiny else arch.image, schedule), name=name)


def conditioning(arch: Arch, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
    return arch.conditioning(batch, torch.Generator(device="cpu").manual_seed(batch)).to(device, dtype)


def plain_loop(unet: nn.Module, vae: nn.Module, cond: Any, latent: tuple[int, ...], seed: int = 0) -> Callable[[], Tensor]:
    """The eager diffusers-style baseline: UNet, LCMScheduler.step, vae.decode."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    device = cond.hidden.device

    def run() -> Tensor:
        scheduler.set_timesteps(timesteps=list(TIMESTEPS), device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((len(cond), *latent), generator=g, device=device, dtype=cond.hidden.dtype)
        denoised = x
        for t in scheduler.timesteps:
            eps = unet(x, t, **cond.unet_kwargs()).sample
            x, denoised = scheduler.step(eps, t, x, generator=g, return_dict=False)
        image = vae.decode((denoised / vae.config.scaling_factor).to(vae.dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    return run


def release(pipe: Any) -> None:
    """Free a row's CUDA graphs and cached blocks before the next row."""
    pipe.release_graphs()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def uncompile(module: nn.Module) -> None:
    """Undo ``nn.Module.compile`` on a module tree (to compile it again another way)."""
    for m in module.modules():
        m._compiled_call_impl = None


def bench_arch(report: Report, name: str, batches: list[int], scopes: list[str], device: torch.device,
               budget: Budget, cache_dir: Path, tiny: bool, backends: list[str], eager_rows: bool = True) -> None:
    """All rows of one architecture (``eager_rows`` False: only the compile rows, for a second scope)."""
    from ..model.backends import FastPath, check_fast_path

    arch = ARCHS[name]
    pipe = build(arch, device, tiny, name)
    unet, vae = pipe.unet, pipe.backbone.vae
    latent = pipe.backbone.sample_shape
    reference: dict[int, Tensor] = {}

    def row(backend: str, batch: int, run: Callable[[], Tensor], prepare_s: float | None = None,
            compare: bool = False) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms, out = timed(run, device)
        check = "finite" if torch.isfinite(out).all() else "NON-FINITE"
        if compare and batch in reference:
            check = f"max |diff| vs eager {(out.float() - reference[batch]).abs().max().item():.1e}"
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        report.add(arch=name, batch=batch, backend=backend, ms=ms, prepare_s=prepare_s, peak_gib=peak, check=check)

    for batch in batches:
        budget.require(5 if tiny else 20, f"{name} eager rows at batch {batch}")
        cond = conditioning(arch, batch, device, pipe.dtype)
        seeds = torch.arange(batch, device=device, dtype=torch.int64)
        if not eager_rows:
            pipe.fast = FastPath(cuda_graphs=False)
            reference[batch] = pipe.images(cond, seeds, TIMESTEPS).float()
            continue
        row("plain", batch, plain_loop(unet, vae, cond, latent))
        pipe.fast = FastPath(cuda_graphs=False)
        row("eager", batch, lambda: pipe.images(cond, seeds, TIMESTEPS))
        if device.type == "cuda":
            pipe.fast = FastPath(cuda_graphs=True)
            t0 = time.perf_counter()
            reference[batch] = pipe.images(cond, seeds, TIMESTEPS).float()
            row("eager + graph", batch, lambda: pipe.images(cond, seeds, TIMESTEPS), time.perf_counter() - t0)
            release(pipe)
        else:
            reference[batch] = pipe.images(cond, seeds, TIMESTEPS).float()

    if "compile" in backends:
        for scope in scopes:
            for batch in batches:
                budget.require(60 if tiny else (80 if batch == batches[0] else 60), f"{name} compile {scope} b{batch}")
                if batch == batches[0]:
                    uncompile(pipe.unet)
                    uncompile(pipe.backbone.vae)
                    torch._dynamo.reset()
                    pipe.accelerate(FastPath(backend="compile", compile_scope=scope, cache_dir=cache_dir))
                cond = conditioning(arch, batch, device, pipe.dtype)
                seeds = torch.arange(batch, device=device, dtype=torch.int64)
                t0 = time.perf_counter()
                pipe.images(cond, seeds, TIMESTEPS)
                prepare = time.perf_counter() - t0
                label = f"compile {scope}" + (" + graph" if pipe.graphed else "")
                row(label, batch, lambda: pipe.images(cond, seeds, TIMESTEPS), prepare, compare=True)
                release(pipe)
    for backend, fast in (("tensorrt", FastPath(backend="tensorrt")), ("xformers", FastPath(attention="xformers"))):
        if backend not in backends:
            continue
        try:
            check_fast_path(fast)
        except Exception as e:  # the package is not installed: say so, do not guess
            report.note(f"{name}: {backend} not measured: {e}")
            continue
        budget.require(200, f"{name} {backend}")
        uncompile(pipe.unet)
        uncompile(pipe.backbone.vae)
        pipe.accelerate(fast, buckets=batches, example=conditioning(arch, 1, device, pipe.dtype))
        for batch in batches:
            cond = conditioning(arch, batch, device, pipe.dtype)
            seeds = torch.arange(batch, device=device, dtype=torch.int64)
            t0 = time.perf_counter()
            pipe.images(cond, seeds, TIMESTEPS)
            row(backend, batch, lambda: pipe.images(cond, seeds, TIMESTEPS), time.perf_counter() - t0, compare=True)
            release(pipe)


def cold_start(name: str, scope: str, cache_dir: Path, tiny: bool, launched: float) -> float:
    """Child process: seconds from its launch (``launched``, the parent's clock) to the first
    batch-1 image of the compile path."""
    from ..model.backends import FastPath

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = ARCHS[name]
    pipe = build(arch, device, tiny)
    pipe.accelerate(FastPath(backend="compile", compile_scope=scope, cache_dir=cache_dir))
    pipe.images(conditioning(arch, 1, device, pipe.dtype), torch.zeros(1, dtype=torch.int64, device=device), TIMESTEPS)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.time() - launched


def preflight(device: torch.device, cache_dir: Path) -> None:
    """Fail in seconds, not minutes: the kernel and a graphed compiled loop must be right here."""
    from dmd2_kernels.renoise import renoise_reference, renoise_triton

    from ..model.backends import FastPath

    seeds = torch.tensor([0, 1, 2**33 + 5], device=device)
    x = torch.randn(3, 4, 9, 13, device=device, dtype=torch.float16)
    eps = torch.randn_like(x)
    noise = renoise_triton(None, seeds, 0, 0.0, shape=(4, 9, 13)).cpu()
    err = (noise - renoise_reference(None, seeds.cpu(), 0, 0.0, shape=(4, 9, 13))).abs().max().item()
    assert err < 1e-4, f"kernel noise differs from the reference by {err}"
    for extra in ({}, {"eps": eps, "abar_t": 0.2}):
        got = renoise_triton(x, seeds, 2, 0.6, **extra).float().cpu()
        cpu_extra = {k: v.cpu() if torch.is_tensor(v) else v for k, v in extra.items()}
        want = renoise_reference(x.cpu(), seeds.cpu(), 2, 0.6, **cpu_extra).float()
        err = (got - want).abs().max().item()
        assert err < 2e-2, f"kernel ({'from eps' if extra else 'x0'}) differs from the reference by {err}"
    arch = next(iter(ARCHS.values()))
    pipe = build(arch, device, tiny=True)
    cond = conditioning(arch, 2, device, pipe.dtype)
    seeds = torch.tensor([3, 4], device=device)
    pipe.fast = FastPath(cuda_graphs=False)
    eager = pipe.images(cond, seeds, TIMESTEPS)
    if device.type == "cuda":
        pipe.fast = FastPath(cuda_graphs=True)
        graphed = pipe.images(cond, seeds, TIMESTEPS)
        assert pipe.graphed and torch.equal(eager, graphed), "the CUDA-graph replay differs from the eager loop"
    pipe.accelerate(FastPath(backend="compile", compile_scope="regional", cache_dir=cache_dir))
    compiled = pipe.images(cond, seeds, TIMESTEPS)
    err = (compiled - eager).abs().max().item()
    assert err < 2e-2, f"compiled + graphed images differ from eager by {err}"
    torch._dynamo.reset()
    print(f"preflight ok: kernel = reference, graph = eager, compile within {err:.1e}", flush=True)


class Budget:
    """Seconds left for the run; stages that would not fit are skipped with a note."""

    def __init__(self, seconds: float, report: Report) -> None:
        self.end = time.perf_counter() + seconds
        self.report = report

    def left(self) -> float:
        return self.end - time.perf_counter()

    def require(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"skipped {what} and everything after it in its stage: {self.left():.0f} s left,"
                            f" about {seconds:.0f} s needed")


def _watchdog(seconds: float) -> None:
    def fire(signum: int, frame: Any) -> None:
        raise OutOfTime(f"the {seconds:.0f} s budget ran out mid-stage")

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, fire)
        signal.alarm(max(1, int(seconds)))


def _list(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    """Run the stages in priority order within the budget; print the tables."""
    p = argparse.ArgumentParser(prog="python -m dmd2_serve.bench", description=__doc__.split("\n")[0])
    p.add_argument("--archs", type=_list, default=list(ARCHS))
    p.add_argument("--batches", type=lambda s: [int(b) for b in _list(s)], default=[1, 4, 16])
    p.add_argument("--backends", type=_list, default=["compile", "tensorrt", "xformers"])
    p.add_argument("--scopes", type=_list, default=None,
                   help="compile scopes per arch, e.g. full or full,regional (default: sd15 full,regional;"
                        " sdxl regional,full, the second only when time is left)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new stages after this")
    p.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default: a fresh temp folder)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--tiny", action="store_true", help="small models (CPU tests of this script)")
    p.add_argument("--skip-cold-start", action="store_true", help="do not time a second process's start")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="turn cuDNN's algorithm search on for every row (measured on an H100: no gain in the"
                        " graphed rows, slower eager rows)")
    p.add_argument("--cold-start", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scope", default="full", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="dmd2-bench-cache-"))
    if args.cold_start:
        seconds = cold_start(args.cold_start, args.scope, cache_dir, args.tiny, args.launched or time.time())
        print(json.dumps({"cold_start_s": seconds}))
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark and device.type == "cuda"  # every row alike
    report = Report(args.out)
    budget = Budget(args.budget_s, report)
    _watchdog(args.budget_s + 20)
    report.note(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__};"
                f" {time.strftime('%Y-%m-%d')}")
    preflight(device, cache_dir)  # raises: nothing long runs on a broken kernel, capture or compile
    stages: list[tuple[str, Callable[[], None]]] = []
    copy_gbps = copy_bandwidth_gbps(device)
    report.note(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
    shapes = [(1, 4, 8, 8), (2, 4, 16, 16)] if args.tiny else \
        [(1, 4, 64, 64), (8, 4, 128, 128), (64, 4, 128, 128), (256, 4, 128, 128)]
    stages.append(("re-noise kernel", lambda: bench_renoise(report, device, shapes, copy_gbps)))

    def scopes_for(name: str, extra: bool) -> list[str]:
        if args.scopes:
            return args.scopes if not extra else []
        scopes = ARCHS[name].compile_scopes
        return list(scopes[1:]) if extra else list(scopes[:1])

    for name in args.archs:
        stages.append((name, lambda n=name: bench_arch(report, n, args.batches, scopes_for(n, False), device, budget,
                                                        cache_dir, args.tiny, args.backends)))
        if name == args.archs[0] and "compile" in args.backends and scopes_for(name, False) and not args.skip_cold_start:
            def cold(n: str = name) -> None:
                budget.require(40 if not args.tiny else 30, "cold start")
                cmd = [sys.executable, "-m", "dmd2_serve.bench", "--cold-start", n, "--scope", scopes_for(n, False)[0],
                       "--cache-dir", str(cache_dir), "--launched", str(time.time())] + (["--tiny"] if args.tiny else [])
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, budget.left()), check=True)
                seconds = json.loads(out.stdout.strip().splitlines()[-1])["cold_start_s"]
                report.note(f"cold start, {n} compile {scopes_for(n, False)[0]}, warm cache: {seconds:.1f} s from"
                            " interpreter start to the first batch-1 image (random weights made on the GPU)")
            stages.append(("cold start", cold))
    for name in args.archs:
        if "compile" in args.backends and scopes_for(name, True):
            stages.append((f"{name} second scope", lambda n=name: bench_arch(
                report, n, args.batches[:1], scopes_for(n, True), device, budget, cache_dir, args.tiny, ["compile"],
                eager_rows=False)))

    for title, stage in stages:
        print(f"== {title} ({budget.left():.0f} s left)", flush=True)
        try:
            stage()
        except OutOfTime as e:
            report.note(f"{title}: {e}")
        except Exception as e:  # a failed stage is reported; the others still run
            report.note(f"{title} failed: {type(e).__name__}: {str(e)[:300]}")
        if device.type == "cuda":  # the stage's models are gone with its frame: free their memory
            torch.cuda.empty_cache()
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    print("\n" + report.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
