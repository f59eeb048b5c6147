"""The few-step pipelines benchmarked: random-weight models of each family's real architecture,
the plain diffusers-style baseline, each backend's rows, the warm-cache cold start."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..model.adapters import ADAPTERS, ReferenceArch
from .report import Budget, Report, timed

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

    from ..model.adapters import unet_prediction

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    device = cond.hidden.device

    def run() -> Tensor:
        scheduler.set_timesteps(timesteps=list(TIMESTEPS), device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((len(cond), *latent), generator=g, device=device, dtype=cond.hidden.dtype)
        denoised = x
        for t in scheduler.timesteps:
            eps = unet_prediction(unet, x, t, cond)
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
