"""How the generator runs: ``eager``, ``compile`` (torch.compile + CUDA graphs), ``aoti`` or ``tensorrt``.

A backend prepares the two heavy modules of a pipeline, the UNet and the VAE decoder, in place;
the sampling loop and the fused re-noise kernel stay the same for all three. On CUDA the whole
loop of one batch shape (starting noise, the UNet steps, the fused re-noise steps and the
decode) is then captured in a single CUDA graph and replayed (:class:`GraphedLoop`), so a
batch-1 request costs one graph launch instead of a thousand kernel launches.

* ``compile``: channels-last, fused QKV projections (SDPA only), ``torch.compile`` of the UNet
  and of the VAE decoder, compiled artefacts kept in ``cache_dir`` so a restart skips the work.
  The batch dimension is marked dynamic for batches of 2 and more, so every bucket size shares
  one compiled graph (batch 1 gets its own, specialised: diffusers branches on a batch of one).
* ``aoti``: the same modules prepared the same way, compiled ahead of time by AOTInductor into
  packages without the weights (``aot.py``), so a restart loads them instead of tracing again.
* ``freeze`` (with ``compile``): Inductor's freezing: the weights become constants of the compiled
  graphs, folded and laid out once (on the CPU, oneDNN's packed weights); weights changed after
  the first call reach the frozen graphs only in part, so they must stay as loaded.
* ``vae_slicing``: the VAE decodes a batch one image at a time (diffusers' slicing), so one
  batch-1 decoder graph serves every bucket and the decode's activations are one image's.
* ``subpixel_upsample``: the UNet's and the decoder's upsamplers (repeat each pixel, then a 3x3
  convolution) as one stride-2 transposed convolution of the low-resolution image (``upsample.py``):
  the same sums at 4/9 of the multiply-adds.
* ``precision="fp8"``: the UNet's attention-block linear layers in float8 through torchao
  (``precision.py``), the rest in bfloat16; Hopper / Ada GPUs only.
* ``tensorrt``: engines built through ``torch_tensorrt`` (dynamo IR) for the UNet and the VAE
  decoder, one shape profile over the batch buckets, engines cached in ``cache_dir``.
* attention: PyTorch SDPA (default) or xformers' memory-efficient attention.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapters import Conditioning, unet_prediction
from .aot import aot_compile_in_place, batch_inputs
from .errors import BackendError
from .precision import Precision, check_precision

Backend = Literal["eager", "compile", "aoti", "tensorrt"]
Attention = Literal["sdpa", "xformers"]
Tuning = Literal["default", "decoder", "all"]
BACKENDS: tuple[str, ...] = ("eager", "compile", "aoti", "tensorrt")
INDUCTOR_BACKENDS = ("compile", "aoti")  # the two that compile through Inductor
ATTENTIONS: tuple[str, ...] = ("sdpa", "xformers")
TUNINGS: tuple[str, ...] = ("default", "decoder", "all")

# Blocks compiled by the regional scope (diffusers class names: UNet and VAE decoder).
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")

# (x_t, t, cond) -> eps, in the UNet's dtype.
Denoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]


@dataclass(frozen=True)
class FastPath:
    """The serving fast-path options (``--backend``, ``--attention``, ``--compile-cache``).

    Attributes:
        backend: eager | compile | aoti | tensorrt.
        attention: sdpa | xformers.
        cache_dir: where compiled artefacts and TensorRT engines are kept across restarts.
        cuda_graphs: capture the whole loop per batch shape in a CUDA graph (CUDA only).
        compile_scope: ``full`` compiles the whole UNet and decoder (fastest code, slowest
            compile); ``regional`` compiles only the repeated blocks (transformer and ResNet
            blocks), several times faster to compile; the CUDA graph removes the launch gaps
            between the blocks either way.
        tuning: ``default`` Inductor settings; ``decoder`` or ``all``: Inductor's max-autotune
            (GEMM / convolution templates benchmarked, coordinate-descent tuning of the fused
            kernels) for the VAE decoder, or for the UNet too; slower to compile.
        dynamic_batch: one compiled graph for every batch of 2 or more (and one for batch 1)
            instead of one per batch size.
        precision: ``default`` (float16 UNet on CUDA, float32 on the CPU) or ``fp8`` (float8
            matmuls in the UNet's attention blocks, the rest in bfloat16; see ``precision.py``).
        text_encoder: with the compile backend, compile the prompt encoder(s) too (their
            layers fused by Inductor; outside the loop's CUDA graph, eager prompt encoding costs
            a launch per op on every request).
        text_in_graph: run the prompt encoder(s) inside each batch shape's CUDA graph, from
            the token ids (only the tokenizer stays on the host); for adapters that split
            prompt encoding that way (SD, SDXL). Where a capture fails, that pipeline goes back
            to encoding prompts before the graph, with a warning.
        freeze: with the compile backend, Inductor's freezing (``torch._inductor.config.freezing``):
            the weights are compile-time constants, so Inductor folds and lays them out once (on
            the CPU it packs them for oneDNN: the UNet runs twice as fast there, but such graphs
            cannot be cached, so every start compiles again; AOTAutograd's cache is skipped on
            every device). Full compile scope only (frozen weights are guarded by identity).
        vae_slicing: decode a batch one image at a time (``vae.enable_slicing()``): the decoder
            only ever sees a batch of one, so compile and aoti need one decoder graph for every
            bucket (no batch-symbolic trace of it: the one that failed for SDXL's decoder), and
            the decode's peak memory is one image's. At 1024x1024 one image fills the GPU.
        subpixel_upsample: compute the UNet's and the VAE decoder's upsamplers as stride-2 transposed
            convolutions of the low-resolution image (``upsample.py``): the same sums with 16 instead
            of 36 multiply-adds per pixel and channel pair; the folded kernels are made once, from the
            weights as loaded.
    """

    backend: Backend = "eager"
    attention: Attention = "sdpa"
    cache_dir: Path | None = None
    cuda_graphs: bool = True
    compile_scope: Literal["full", "regional"] = "full"
    tuning: Tuning = "default"
    dynamic_batch: bool = True
    precision: Precision = "default"
    text_encoder: bool = False
    text_in_graph: bool = False
    freeze: bool = False
    vae_slicing: bool = False
    subpixel_upsample: bool = False

    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or default_cache_dir()).expanduser()  # '~/x' as a unit file or a pod's args write it


def default_cache_dir() -> Path:
    """``$DMD2_CACHE_DIR``, else ``$XDG_CACHE_HOME/dmd2-fast``, else ``~/.cache/dmd2-fast``."""
    if os.environ.get("DMD2_CACHE_DIR"):
        return Path(os.environ["DMD2_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmd2-fast"


def check_fast_path(fast: FastPath) -> None:
    """Fail early, with the fix in the message, when an option cannot work on this install."""
    if fast.backend not in BACKENDS:
        raise BackendError(f"unknown backend '{fast.backend}'; choose one of {', '.join(BACKENDS)}")
    if fast.compile_scope not in ("full", "regional"):
        raise BackendError(f"unknown compile scope '{fast.compile_scope}'; choose full or regional")
    if fast.attention not in ATTENTIONS:
        raise BackendError(f"unknown attention '{fast.attention}'; choose one of {', '.join(ATTENTIONS)}")
    if fast.tuning not in TUNINGS:
        raise BackendError(f"unknown compile tuning '{fast.tuning}'; choose one of {', '.join(TUNINGS)}")
    if fast.freeze and fast.backend != "compile":
        why = (" (aoti packages take the module's weights when they load; freezing would bake them in)"
               if fast.backend == "aoti" else "")
        raise BackendError(f"--compile-freeze needs --backend compile, not {fast.backend}{why}")
    if fast.freeze and fast.compile_scope != "full":
        raise BackendError("--compile-freeze needs --compile-scope full: frozen weights are guarded by identity, so"
                           " every block of the regional scope would compile a graph of its own")
    if fast.freeze and fast.precision != "default":
        raise BackendError(f"--compile-freeze with --precision {fast.precision} has not been tried (torchao's weight"
                           " tensors as frozen constants): use one of the two")
    if fast.vae_slicing and fast.backend == "tensorrt":
        raise BackendError("--vae-slicing with --backend tensorrt has not been tried (the decoder engine's shape"
                           " profile is the buckets'): use it with eager, compile or aoti")
    if fast.subpixel_upsample and fast.backend == "tensorrt":
        raise BackendError("--subpixel-upsample with --backend tensorrt has not been tried: use it with eager, compile"
                           " or aoti")
    check_precision(fast.precision, fast.backend)
    if fast.text_encoder and fast.backend not in INDUCTOR_BACKENDS:
        raise BackendError(f"compiling the text encoder needs --backend compile or aoti, not {fast.backend}")
    if fast.backend == "aoti" and fast.compile_scope != "full":
        raise BackendError("--backend aoti exports whole modules: use --compile-scope full, or --backend compile for"
                           " the regional scope")
    if fast.text_in_graph and (fast.backend == "tensorrt" or not fast.cuda_graphs):
        why = "TensorRT runs its own engines" if fast.backend == "tensorrt" else "CUDA graphs are off"
        raise BackendError(f"the text encoder in the CUDA graph needs the loop's CUDA graphs ({why}): use --backend"
                           " eager or compile with graphs on, or drop --graph-text-encoder")
    if fast.backend == "tensorrt" and importlib.util.find_spec("torch_tensorrt") is None:
        raise BackendError(
            "--backend tensorrt needs torch-tensorrt, which is not installed: pip install 'dmd2-fast[tensorrt]'"
            " (on a CUDA host whose torch matches torch-tensorrt's), or use --backend compile")
    if fast.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise BackendError(
            "--attention xformers needs xformers, which is not installed: pip install 'dmd2-fast[xformers]'"
            " (a build matching your torch), or use --attention sdpa")
    check_cache_dir(fast)


def check_cache_dir(fast: FastPath) -> None:
    """``BackendError`` when a compiling backend's cache folder cannot be written. The worker writes it
    after the weights have loaded (minutes for SDXL), and its error was a traceback there."""
    if fast.backend == "eager":
        return
    folder = fast.resolved_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        named = ("--compile-cache" if fast.cache_dir is not None else
                 "the compile cache ($DMD2_CACHE_DIR, else $XDG_CACHE_HOME/dmd2-fast or ~/.cache/dmd2-fast)")
        raise BackendError(f"{named} '{folder}' cannot be written ({e.strerror}): give a folder this user may write"
                           f" with --compile-cache DIR (compiled graphs are kept there for the next start)") from None


def adapter_conflict(fast: FastPath) -> str | None:
    """Why ``fast`` cannot run a LoRA adapter beside the UNet's weights (None: it can).

    The one answer for every place an adapter meets a fast path: the server's start check, the
    pipeline's :meth:`accelerate` with adapters loaded, and :meth:`use_lora` on an accelerated
    pipeline. The fix is the same in each: the eager backend without folded upsamplers, or the
    merged generator.
    """
    if fast.backend != "eager":
        return (f"--backend {fast.backend} bakes the UNet's modules and weights in (and fuses its attention"
                " projections), so an adapter added beside the weights would not act: serve LoRA adapters with"
                " --backend eager, or serve the merged generator")
    if fast.subpixel_upsample:
        return ("--subpixel-upsample folds the upsamplers' weights once, so a LoRA adapter (added beside the"
                " weights) would miss them: serve LoRA adapters without --subpixel-upsample, or serve the merged"
                " generator")
    return None


# --------------------------------------------------------------------------------------------
# Module preparation
# --------------------------------------------------------------------------------------------

def set_attention(module: nn.Module, attention: Attention) -> None:
    """Switch a diffusers model's attention: SDPA processors, or xformers' kernels."""
    if attention == "xformers":
        module.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
            module.set_attn_processor(AttnProcessor2_0())


def configure_compile_cache(cache_dir: Path) -> Path:
    """Keep Inductor's (and Triton's) compiled artefacts under ``cache_dir/inductor``.

    The FX-graph and AOT-autograd caches are on by default in recent PyTorch; pointing them at a
    persistent folder (instead of /tmp) is what makes the second start fast.
    """
    folder = cache_dir / "inductor"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


def fuse_qkv(unet: nn.Module, fast: FastPath) -> None:
    """One matmul for q, k and v in self-attention (compile and aoti backends with SDPA; before fp8, so
    the fused weight is the one quantised)."""
    if fast.backend in INDUCTOR_BACKENDS and fast.attention == "sdpa" and hasattr(unet, "fuse_qkv_projections"):
        unet.fuse_qkv_projections()


def compile_modules(unet: nn.Module, vae: nn.Module | None, fast: FastPath, text: Sequence[nn.Module] = ()) -> None:
    """``compile`` and ``aoti`` backends: channels-last, then ``torch.compile`` of UNet and decoder in
    place, or their AOTInductor packages (and ``torch.compile`` of the ``text`` encoders with
    ``fast.text_encoder``)."""
    configure_compile_cache(fast.resolved_cache_dir())
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if on_cuda:
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True  # 1x1 convolutions as matrix products (cuBLAS, epilogue fusion)
        unet.to(memory_format=torch.channels_last)
        if vae is not None:
            vae.to(memory_format=torch.channels_last)
    tuned = {"all": {"unet", "decoder"}, "decoder": {"decoder"}}.get(fast.tuning, set())
    targets = [("unet", unet)] + ([("decoder", vae.decoder)] if vae is not None else [])
    if fast.compile_scope == "regional" or fast.freeze:
        # Regional: the blocks of a repeated kind share one code object (a graph per input signature).
        # Freezing: weights are guarded by identity, so every generator of one architecture in this
        # process adds its own UNet graphs; past the limit Dynamo would run the rest eagerly.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if fast.compile_scope == "regional":
        targets = [(name, block) for name, module in targets for block in module.modules()
                   if type(block).__name__ in REGIONAL_BLOCKS]
    for name, module in targets:
        if fast.backend == "aoti":
            aot_compile_in_place(module, fast.resolved_cache_dir(), autotune=name in tuned and on_cuda,
                                 dynamic_batch=fast.dynamic_batch)
        else:
            compile_in_place(module, autotune=name in tuned and on_cuda, dynamic_batch=fast.dynamic_batch,
                             freeze=fast.freeze)
    for module in text if fast.text_encoder else ():
        # transformers installs its hidden-state hooks under a lock on the first call: a graph break
        compile_in_place(module, dynamic_batch=fast.dynamic_batch, fullgraph=False, freeze=fast.freeze)


def compile_in_place(module: nn.Module, autotune: bool = False, dynamic_batch: bool = True,
                     fullgraph: bool = True, freeze: bool = False) -> None:
    """``module.compile(fullgraph=fullgraph)``, and with ``dynamic_batch`` the leading dimension of its
    tensor inputs marked dynamic when it is 2 or more, so that later batch sizes reuse the graph.

    The mark has to be set on the inputs before they enter the compiled frame, so the compiled
    call is wrapped here (what ``nn.Module.compile`` installs, plus the mark). A batch of one is
    left static: diffusers specialises on it (``timesteps.expand``), and a dynamic graph would be
    recompiled for it anyway. Where Dynamo cannot trace the module with a symbolic batch (seen
    once: SDXL's VAE decoder at batch 16 on an H200), the module falls back to a graph per batch
    size, with a warning, instead of failing the start. ``freeze``: Inductor's freezing (the weights
    as constants; it applies to calls without gradients, as the pipeline's are), switched on around
    every call, since Dynamo reads it while tracing (see :func:`_frozen`).
    """
    options = {"max_autotune": True, "coordinate_descent_tuning": True} if autotune else None

    def make(**settings: Any) -> Callable[..., Any]:
        fn = torch.compile(module._call_impl, fullgraph=fullgraph, options=options, **settings)
        return _frozen(fn) if freeze else fn

    compiled = make()
    if not dynamic_batch:
        module._compiled_call_impl = compiled
        return
    static: list[Callable[..., Any]] = []  # the per-batch-size compile, once the dynamic one failed

    def call(*args: Any, **kwargs: Any) -> Any:
        if static:
            return static[0](*args, **kwargs)
        batch, sized = batch_inputs(args, kwargs)
        marked = sized if batch > 1 else []
        for x in marked:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        try:
            return compiled(*args, **kwargs)
        # Raised while tracing. With fullgraph nothing has run yet; without it (the prompt encoders)
        # an eager fragment may have, which is harmless to repeat: they have no side effects.
        except torch._dynamo.exc.TorchDynamoException as e:
            if not marked:
                raise
            for x in marked:  # the marks stay on the tensors (CUDA-graph buffers are reused)
                x._dynamo_weak_dynamic_indices.discard(0)
            per_size = make(dynamic=False)
            out = per_size(*args, **kwargs)  # fails as well: not the batch's doing, and that error is raised
            warnings.warn(f"torch.compile could not trace {type(module).__name__} with a dynamic batch"
                          f" ({type(e).__name__}: {_trace_failure(e)}); compiling it once per batch size instead",
                          stacklevel=2)
            static.append(per_size)
            return out

    module._compiled_call_impl = call


def _frozen(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """``compiled`` run with Inductor's freezing on. Dynamo reads the setting while it traces (the
    weights become graph constants, guarded by identity, instead of graph inputs), so it has to be
    on around the call that traces: in ``torch.compile``'s options it reaches Inductor only, which
    then has no weights left to freeze."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def _trace_failure(e: BaseException) -> str:
    """What made Dynamo give up, in one line: for a failed fake-tensor run, the op's own error (the
    part after "got", which a first line of "RuntimeError when making fake tensor call" leaves out),
    without the hints and debug context Dynamo appends."""
    text = " ".join(str(e).split())
    at = text.find("): got ")
    if at >= 0:
        text = text[at + len("): got "):]
    for tail in (" Hint:", " Developer debug context:"):
        text = text.split(tail)[0]
    return text[:400]


def tensorrt_modules(unet: nn.Module, vae: nn.Module | None, fast: FastPath, sample_shape: Sequence[int],
                     cond: Conditioning, buckets: Sequence[int]) -> tuple[Denoiser, nn.Module | None]:
    """``tensorrt`` backend: engines for the UNet and the VAE decoder through ``torch_tensorrt``.

    One dynamic shape profile covers every batch bucket (min = smallest, opt = largest used most
    often, max = largest); engines are cached on disk, keyed by graph, shapes and settings.

    Returns:
        the UNet as a :data:`Denoiser` of its raw prediction (the caller converts v to eps), and
        the decoder module to put in ``vae.decoder``.
    """
    try:
        import torch_tensorrt
    except ImportError as e:  # check_fast_path says the same before the model loads
        raise BackendError("--backend tensorrt needs torch-tensorrt: pip install 'dmd2-fast[tensorrt]'") from e
    dtype = next(unet.parameters()).dtype
    lo, hi = min(buckets), max(buckets)
    cache = fast.resolved_cache_dir() / "tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = dict(
        ir="dynamo", enabled_precisions={dtype}, cache_built_engines=True, reuse_cached_engines=True,
        engine_cache_dir=str(cache), engine_cache_size=32 * 2**30, min_block_size=1,
        timing_cache_path=str(cache / "timing_cache.bin"),
    )

    def profile(per_sample: Sequence[int], of: torch.dtype) -> Any:
        return torch_tensorrt.Input(min_shape=(lo, *per_sample), opt_shape=(hi, *per_sample),
                                    max_shape=(hi, *per_sample), dtype=of)

    wrapped = _UNetForTensorRT(unet, sorted(cond.added))
    inputs = [profile(sample_shape, dtype), profile((), torch.long), profile(cond.hidden.shape[1:], dtype)]
    inputs += [profile(cond.added[k].shape[1:], dtype) for k in sorted(cond.added)]
    trt_unet = torch_tensorrt.compile(wrapped, inputs=inputs, **settings)

    def denoise(x_t: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        extra = [c.added[k].to(dtype) for k in sorted(c.added)]
        return trt_unet(x_t.to(dtype), t, c.hidden.to(dtype), *extra)

    trt_decoder = None
    if vae is not None:
        vae_dtype = next(vae.parameters()).dtype
        trt_decoder = torch_tensorrt.compile(vae.decoder, inputs=[profile(sample_shape, vae_dtype)],
                                             **{**settings, "enabled_precisions": {vae_dtype}})
    return denoise, trt_decoder


class _UNetForTensorRT(nn.Module):
    """The UNet with positional tensor inputs and a tensor output (what an engine can take)."""

    def __init__(self, unet: nn.Module, added_keys: list[str]) -> None:
        super().__init__()
        self.unet, self.added_keys = unet, added_keys

    def forward(self, sample: Tensor, timestep: Tensor, hidden: Tensor, *added: Tensor) -> Tensor:
        return unet_prediction(self.unet, sample, timestep, Conditioning(hidden, dict(zip(self.added_keys, added))))


# --------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------

class GraphedLoop:
    """A function of tensors, ``fn(*inputs)``, captured once in a CUDA graph for one batch shape.

    The inputs (the conditioning or the token ids, the seeds, the encoded images of image to
    image) are copied into static buffers and the graph is replayed; the output is cloned out of
    the graph's memory. Capture runs the function twice on a side stream first, so every lazy
    initialisation and compilation happens before it. All graphs of a pipeline share one memory
    pool (they are replayed one at a time).
    """

    def __init__(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], pool: Any = None, warmup: int = 2) -> None:
        self.inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for buffer, x in zip(self.inputs, inputs, strict=True):
            buffer.copy_(x)
        self.graph.replay()
        return self.out.clone()
