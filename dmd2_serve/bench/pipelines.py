"""The few-step pipelines benchmarked: random-weight models of each family's real architecture,
the plain diffusers-style baseline, each backend's rows, the warm-cache cold start."""

from __future__ import annotations

import math
import re
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dmd2_kernels.timing import graph_us, timed
from torch import Tensor, nn

from ..model.adapters import ADAPTERS, ReferenceArch
from ..model.errors import first_line
from .profile import device_time_by_class
from .report import Budget, OutOfTime, Report

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


@dataclass(frozen=True)
class Variant:
    """One compiled configuration to time: a name, the fast-path options beyond the backend and
    scope, and the batches it runs (None: all of the run's batches)."""

    name: str
    options: dict[str, Any]
    batches: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``name[:b+b...]``, name one of :data:`VARIANTS`; e.g. ``fp8:16+1``."""
        name, _, sizes = text.partition(":")
        if name not in VARIANTS:
            raise ValueError(f"unknown variant '{name}'; choose from {', '.join(VARIANTS)}")
        if sizes and not re.fullmatch(r"[1-9][0-9]*(\+[1-9][0-9]*)*", sizes):
            raise ValueError(f"'{text}': after the ':' come batch sizes joined by '+', e.g. {name}:16+1")
        return cls(name, VARIANTS[name], tuple(int(b) for b in sizes.split("+")) if sizes else None)


# The compile levers, one at a time against ``default`` (dynamic batch, default Inductor settings).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "static": {"dynamic_batch": False},  # one graph per batch size (the earlier behaviour)
    "decoder": {"tuning": "decoder"},  # max-autotune for the VAE decoder
    "all": {"tuning": "all"},  # max-autotune for the UNet too
    "fp8": {"precision": "fp8"},  # float8 attention-block linears (torchao), bfloat16 elsewhere
    "aoti": {"backend": "aoti"},  # the same Inductor code compiled ahead of time (AOTInductor packages)
    "freeze": {"freeze": True},  # Inductor's freezing: the weights compiled in as constants
    "subpixel": {"subpixel_upsample": True},  # the upsamplers as transposed convolutions (4/9 the work)
    "sliced": {"vae_slicing": True},  # the decode one image at a time: the batch-1 decoder graph for every batch
}
# SDPA backends compared on the eager + graph path (the compiled graphs call the same kernels).
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio of two image batches in [0, 1], dB."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def bench_arch(report: Report, name: str, batches: list[int], scopes: list[str], device: torch.device,
               budget: Budget, cache_dir: Path, tiny: bool, backends: list[str], eager_rows: bool = True,
               variants: Sequence[Variant] = (Variant("default", {}),), attention_rows: bool = False) -> None:
    """All rows of one architecture (``eager_rows`` False: only the compile rows, for a second scope).

    Compiled variants run their batches largest first: with the dynamic batch, the first compile
    serves every later batch of 2 or more (its ``prepare s`` is then the CUDA graph capture alone).
    """
    from ..model.backends import FastPath, check_fast_path

    arch = ARCHS[name]
    pipe = build(arch, device, tiny, name)
    unet, vae = pipe.unet, pipe.backbone.vae
    latent = pipe.backbone.sample_shape
    resolution = pipe.backbone.image_size
    reference: dict[int, Tensor] = {}

    def row(backend: str, batch: int, run: Callable[[], Tensor], prepare_s: float | None = None,
            compare: bool = False, **extra: Any) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms, out = timed(run, device)
        check = "finite" if torch.isfinite(out).all() else "NON-FINITE"
        if compare and batch in reference:
            extra["psnr_db"] = psnr(out, reference[batch])
            check = f"max |diff| vs eager {(out.float() - reference[batch]).abs().max().item():.1e}," \
                    f" PSNR {extra['psnr_db']:.1f} dB"
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        extra.setdefault("precision", "fp16 UNet, bf16 VAE" if device.type == "cuda" else "fp32")
        report.add(arch=name, resolution=resolution, batch=batch, backend=backend, ms=ms, prepare_s=prepare_s,
                   peak_gib=peak, check=check, images_per_s=1000 * batch / ms, **extra)

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
            if attention_rows and batch == min(batches):
                attention_backend_rows(report, pipe, cond, seeds, batch, row)
        else:
            reference[batch] = pipe.images(cond, seeds, TIMESTEPS).float()

    if "compile" in backends:
        for scope in scopes:
            for variant in variants:
                try:
                    pipe = compiled_rows(report, pipe, name, scope, variant, batches, device, budget, cache_dir, tiny,
                                         row)
                except OutOfTime:
                    raise
                except Exception as e:  # one lever failing (fp8 on an older card, say) leaves the others
                    traceback.print_exc()  # the whole of it in the log; the note keeps its start
                    report.note(f"{name} compile {scope} {variant.name} failed: {type(e).__name__}: {str(e)[:300]}")
                    pipe = build(arch, device, tiny, name)
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


def attention_backend_rows(report: Report, pipe: Any, cond: Any, seeds: Tensor, batch: int,
                           row: Callable[..., None]) -> None:
    """The eager + graph loop with each SDPA backend forced in the UNet (the VAE's one attention
    layer, head dim 512, has only the efficient and math kernels, so it keeps the default)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    denoise = pipe.denoise
    for backend in SDPA_BACKENDS:
        def forced(x_t: Tensor, t: Tensor, c: Any, kind: Any = getattr(SDPBackend, backend)) -> Tensor:
            with sdpa_kernel(kind):
                return denoise(x_t, t, c)

        pipe.denoise = forced
        try:
            t0 = time.perf_counter()
            pipe.images(cond, seeds, TIMESTEPS)
            row(f"eager + graph, {backend.lower().replace('_attention', '')} SDPA in the UNet", batch,
                lambda: pipe.images(cond, seeds, TIMESTEPS), time.perf_counter() - t0, compare=True)
        except RuntimeError as e:  # no kernel of that kind for these shapes or this card
            report.note(f"{backend} SDPA not measured: {first_line(e)[:160]}")
        finally:
            pipe.denoise = denoise
            release(pipe)


def compiled_rows(report: Report, pipe: Any, name: str, scope: str, variant: Variant, batches: list[int],
                  device: torch.device, budget: Budget, cache_dir: Path, tiny: bool,
                  row: Callable[..., None]) -> Any:
    """One compiled variant's rows (largest batch first), then, for ``default``, where batch 1's
    time goes: one UNet evaluation and the decode, each replayed from its own CUDA graph. Returns
    the pipeline to go on with (a fresh one after a variant that changes the weights' precision)."""
    from ..model.backends import FastPath

    arch = ARCHS[name]
    sizes = sorted(variant.batches or batches, reverse=True)
    budget.require(60 if tiny else 90, f"{name} compile {scope} {variant.name}")
    if pipe.fast.precision != "default":  # the previous variant quantised the UNet in place
        pipe = build(arch, device, tiny, name)
    uncompile(pipe.unet)
    uncompile(pipe.backbone.vae)
    torch._dynamo.reset()
    fast = FastPath(**{"backend": "compile", "compile_scope": scope, "cache_dir": cache_dir, **variant.options})
    pipe.accelerate(fast)
    label = f"{fast.backend} {scope}" + ("" if variant.name in ("default", fast.backend) else f", {variant.name}")
    for batch in sizes:
        budget.require(5 if tiny else 30, f"{label} b{batch}")
        cond = conditioning(arch, batch, device, pipe.dtype)
        seeds = torch.arange(batch, device=device, dtype=torch.int64)
        t0 = time.perf_counter()
        pipe.images(cond, seeds, TIMESTEPS)
        prepare = time.perf_counter() - t0
        row(label + (" + graph" if pipe.graphed else ""), batch, lambda: pipe.images(cond, seeds, TIMESTEPS), prepare,
            compare=True, variant=variant.name,
            **({"precision": "fp8 attention linears, bf16 UNet, bf16 VAE"} if variant.name == "fp8" else {}))
        if batch == 1 and variant.name in ("default", "decoder", "fp8", "aoti", "freeze", "subpixel"):
            breakdown(report, pipe, name, device, label)
        release(pipe)
    return pipe


def breakdown(report: Report, pipe: Any, name: str, device: torch.device, label: str) -> None:
    """Batch 1's parts, each in its own CUDA graph: one UNet evaluation and the VAE decode; then
    what each part's device time goes to, by class of kernel (:mod:`.profile`)."""
    cond = conditioning(ARCHS[name], 1, device, pipe.dtype)
    x = torch.randn(1, *pipe.backbone.sample_shape, device=device, dtype=pipe.dtype)
    t = torch.full((1,), 999, device=device, dtype=torch.long)
    parts = {"one UNet evaluation": (lambda: pipe.denoise(x, t, cond), 4),
             "VAE decode": (lambda: pipe.backbone.decode(x), 2)}
    with torch.no_grad():
        for part, (fn, calls) in parts.items():
            report.add(arch=name, batch=1, backend=f"{label}: {part}", ms=graph_us(fn, device, calls=calls) / 1000,
                       kind="part")
        for part, (fn, _) in parts.items():
            try:
                classes = device_time_by_class(fn, device)
            except Exception as e:  # the profiler (CUPTI) is an extra: its failure must not cost the rows after it
                report.note(f"{label}: {part}: not profiled: {type(e).__name__}: {str(e)[:200]}")
                continue
            for cls, entry in classes.items():
                report.add(kind="profile", arch=name, part=f"{label}: {part}", **{"class": cls}, **entry)


def cold_start(name: str, scope: str, cache_dir: Path, tiny: bool, launched: float,
               backend: str = "compile") -> dict[str, float]:
    """Child process: seconds from its launch (``launched``, the parent's clock) to the first
    batch-1 image of ``backend`` (compile or aoti; ``total``), and where they went: interpreter
    start and imports, building the models, the first call (compiled graphs loaded from the cache,
    traced with ``compile``; packages loaded with ``aoti``; CUDA graph captured) and the image."""
    from ..model.backends import FastPath

    phases = {"imports": time.time() - launched}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = ARCHS[name]
    t0 = time.time()
    pipe = build(arch, device, tiny)
    pipe.accelerate(FastPath(backend=backend, compile_scope=scope, cache_dir=cache_dir))
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases["models"] = time.time() - t0
    t0 = time.time()
    pipe.images(conditioning(arch, 1, device, pipe.dtype), torch.zeros(1, dtype=torch.int64, device=device), TIMESTEPS)
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases["first image"] = time.time() - t0
    return {"total": time.time() - launched, **phases}


def preflight(device: torch.device) -> None:
    """Fail in seconds, not minutes: the kernel and the graphed loop must be right here. (Compiling
    a toy model here cost about a minute on an H100; each compiled row is compared with eager.)"""
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
    print("preflight ok: kernel = reference, graph = eager (every compiled row is checked against eager)",
          flush=True)
