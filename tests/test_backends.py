"""Backends on the CPU: compile gives the eager images; tensorrt and xformers fail clearly when absent."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from dmd2_serve.model.adapters import load_backbone, load_unet
from dmd2_serve.model.backends import BackendError, FastPath, check_fast_path, compile_in_place
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_serve.model.precision import is_attention_linear, quantize_fp8
from dmd2_serve.model.upsample import SubpixelUpsample

find_spec = importlib.util.find_spec
PROMPTS, SEEDS = ["a red cube", "a small dog", "a city at night"], [3, 1, 2**32 - 1]
# Stated tolerance of the fast path on the CPU (float32): images in [0, 1] agree within 1e-3.
CPU_TOLERANCE = 1e-3


def pipeline(folder: Path) -> FewStepPipeline:
    """A few-step pipeline straight from a tiny teacher folder (random weights are enough here)."""
    unet = load_unet(folder).eval().requires_grad_(False)
    return FewStepPipeline(unet, load_backbone(folder), (999, 749, 499, 249))


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_compile_backend_gives_the_eager_images(sd15_teacher: Path, tmp_path: Path, scope: str) -> None:
    # An earlier compile of the same graphs in this process would be served from Inductor's in-memory
    # caches and leave this test's cache folder empty: start from none.
    torch._dynamo.reset()
    torch._inductor.utils.clear_caches()
    eager = pipeline(sd15_teacher)
    fast = pipeline(sd15_teacher)
    fast.accelerate(FastPath(backend="compile", cache_dir=tmp_path, compile_scope=scope))
    want = eager(PROMPTS, SEEDS)
    got = fast(PROMPTS, SEEDS)
    assert got.shape == want.shape == (3, 3, 16, 16)
    assert (got - want).abs().max() < CPU_TOLERANCE
    assert not torch.equal(got[0], got[1])
    # torch.compile really ran (modules compiled in place) and left its artefacts in the cache.
    compiled = [m for m in [fast.unet, *fast.unet.modules(), *fast.backbone.vae.decoder.modules()]
                if m._compiled_call_impl is not None]
    if scope == "full":
        assert fast.unet in compiled and fast.backbone.vae.decoder in compiled
    else:
        assert {type(m).__name__ for m in compiled} == {"BasicTransformerBlock", "ResnetBlock2D"}
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*"))
    # A seed still gives its image whatever else is in the bucket.
    alone = fast.generate_padded(PROMPTS[:1], SEEDS[:1], bucket=3)
    torch.testing.assert_close(alone[0], got[0], atol=CPU_TOLERANCE, rtol=0)
    # The batch dimension is dynamic from the start: another batch size of 2 or more reuses the
    # compiled graphs (no recompilation per bucket).
    graphs = counters["stats"]["unique_graphs"]
    two = fast(PROMPTS[:2], SEEDS[:2])
    assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(two, want[:2], atol=CPU_TOLERANCE, rtol=0)


def test_compile_options_together_give_the_eager_images(sd15_teacher: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Freezing, the sliced decode and the folded upsamplers in one compile (each is a lever of its own
    in the benchmark; together here, since every compile of the tiny pipeline costs the suite ~50 s):
    each option did its part, and the images are eager's."""
    from torch._inductor import freezing

    frozen = []  # per graph Inductor's freezing pass ran on: how many of its inputs became constants
    freeze = freezing.freeze

    def spy(dynamo_gm: nn.Module, aot_gm: nn.Module, inputs: list) -> tuple:
        out = freeze(dynamo_gm, aot_gm, inputs)
        frozen.append(len(inputs) - len(out[1]))
        return out

    monkeypatch.setattr(freezing, "freeze", spy)
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)  # Dynamo's default (a regional test may raise it)
    eager, fast = pipeline(sd15_teacher), pipeline(sd15_teacher)
    fast.accelerate(FastPath(backend="compile", cache_dir=tmp_path, freeze=True, vae_slicing=True,
                             subpixel_upsample=True))
    folded = [m for m in [*fast.unet.modules(), *fast.backbone.vae.decoder.modules()] if isinstance(m, SubpixelUpsample)]
    assert len(folded) == 2  # the tiny UNet's one upsampler and the decoder's one
    decoder = fast.backbone.vae.decoder
    compiled, seen = decoder._compiled_call_impl, []
    decoder._compiled_call_impl = lambda x, *a, **k: seen.append(x.shape[0]) or compiled(x, *a, **k)
    want = eager(PROMPTS, SEEDS)
    torch.testing.assert_close(fast(PROMPTS, SEEDS), want, atol=CPU_TOLERANCE, rtol=0)
    torch.testing.assert_close(fast(PROMPTS[:2], SEEDS[:2]), want[:2], atol=CPU_TOLERANCE, rtol=0)
    assert seen == [1] * 5  # three images, then two: the compiled decoder never saw a batch
    # The UNet at batch 3 (dynamic: batch 2 reuses it), the decoder at batch 1 only; each with its weights as
    # constants (given to Inductor only through torch.compile's options, the pass ran but found no weights).
    # (Batch 1's own UNet graph is not compiled here: ~50 s of the suite; the benchmark's test compiles it.)
    assert len(frozen) == 2 and min(frozen) > 10, frozen
    assert torch._dynamo.config.cache_size_limit >= 64  # room for a graph pair per generator (identity guards)
    fast.accelerate(FastPath(backend="eager"))  # the options go with the backend that set them
    assert not fast.backbone.vae.use_slicing
    assert not any(isinstance(m, SubpixelUpsample) for m in [*fast.unet.modules(), *fast.backbone.vae.modules()])
    torch.testing.assert_close(fast(PROMPTS, SEEDS), want, atol=CPU_TOLERANCE, rtol=0)
    with pytest.raises(BackendError, match="needs --backend compile, not aoti .aoti packages take the module's"):
        check_fast_path(FastPath(backend="aoti", freeze=True))
    with pytest.raises(BackendError, match="--compile-freeze needs --compile-scope full"):
        check_fast_path(FastPath(backend="compile", freeze=True, compile_scope="regional"))
    with pytest.raises(BackendError, match="--compile-freeze with --precision fp8 has not been tried"):
        check_fast_path(FastPath(backend="compile", freeze=True, precision="fp8"))
    with pytest.raises(BackendError, match="--vae-slicing with --backend tensorrt has not been tried"):
        check_fast_path(FastPath(backend="tensorrt", vae_slicing=True))
    with pytest.raises(BackendError, match="--subpixel-upsample with --backend tensorrt has not been tried"):
        check_fast_path(FastPath(backend="tensorrt", subpixel_upsample=True))


def test_fp8_is_refused_with_the_fix_where_it_cannot_run(sd15_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match="compute capability 8.9"):  # this machine has no GPU
        check_fast_path(FastPath(backend="compile", precision="fp8"))
    with pytest.raises(BackendError, match="use it with --backend compile"):
        check_fast_path(FastPath(backend="tensorrt", precision="fp8"))
    with pytest.raises(BackendError, match="choose one of default, fp8"):
        check_fast_path(FastPath(precision="int4"))  # type: ignore[arg-type]
    pipe = pipeline(sd15_teacher)  # on the CPU: refused when the pipeline is prepared, weights untouched
    with pytest.raises(BackendError, match="none is visible here"):
        pipe.accelerate(FastPath(precision="fp8"))
    with pytest.raises(BackendError, match="the cpu device; serve without --precision fp8"):
        quantize_fp8(pipe.unet)
    assert pipe.unet.dtype == torch.float32
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a))
    with pytest.raises(BackendError, match=r"pip install 'dmd2-fast\[fp8\]'"):
        check_fast_path(FastPath(precision="fp8"))


def test_fp8_quantises_the_attention_block_linears_only(sd15_teacher: Path) -> None:
    unet = pipeline(sd15_teacher).unet
    chosen = {name for name, m in unet.named_modules() if is_attention_linear(m, name)}
    assert chosen and all(".transformer_blocks." in f".{n}" for n in chosen)
    assert any(n.endswith("attn1.to_q") for n in chosen) and any(n.endswith("ff.net.2") for n in chosen)
    assert not any("time_embedding" in n or "conv" in n for n in chosen)


def test_tensorrt_without_torch_tensorrt_names_the_extra() -> None:
    with pytest.raises(BackendError, match=r"pip install 'dmd2-fast\[tensorrt\]'"):
        check_fast_path(FastPath(backend="tensorrt"))
    with pytest.raises(BackendError, match=r"dmd2-fast\[xformers\]"):
        check_fast_path(FastPath(attention="xformers"))
    with pytest.raises(BackendError, match="choose one of eager, compile, aoti, tensorrt"):
        check_fast_path(FastPath(backend="onnx"))  # type: ignore[arg-type]


@pytest.mark.parametrize("flags, says", [
    (["--backend", "tensorrt"], "error: --backend tensorrt needs torch-tensorrt"),
    (["--precision", "fp8"], "error: --precision fp8 needs a CUDA GPU with float8 tensor cores"),
    (["--compile-text-encoder"], "error: compiling the text encoder needs --backend compile or aoti, not eager"),
    (["--backend", "aoti", "--compile-scope", "regional"], "error: --backend aoti exports whole modules"),
    (["--graph-text-encoder", "--no-cuda-graphs"], "error: the text encoder in the CUDA graph needs the loop's"),
    (["--compile-freeze"], "error: --compile-freeze needs --backend compile, not eager"),
    (["--vae-slicing", "--backend", "tensorrt"], "error: --vae-slicing with --backend tensorrt has not been tried"),
    (["--backend", "compile", "--compile-cache", "/dev/null/cache"],  # was a worker's traceback, the weights loaded
     "error: --compile-cache '/dev/null/cache' cannot be written (Not a directory): give a folder this user may"),
])
def test_cli_refuses_what_cannot_run_at_start_with_one_line(flags: list[str], says: str) -> None:
    out = subprocess.run([sys.executable, "-m", "dmd2_serve", *flags, "--port", "1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith(says)
    assert "Traceback" not in out.stderr


class FakeTorchTensorRT(types.ModuleType):
    """Stands in for torch_tensorrt: records what it was asked to build and returns the module."""

    def __init__(self) -> None:
        super().__init__("torch_tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_tensorrt", None)  # found by find_spec
        self.calls: list[dict] = []

        class Input:  # noqa: D401 - a record of one input's shape profile
            def __init__(self, min_shape, opt_shape, max_shape, dtype) -> None:
                self.min_shape, self.opt_shape, self.max_shape, self.dtype = min_shape, opt_shape, max_shape, dtype

        self.Input = Input

    def compile(self, module, inputs, **settings):  # noqa: A003 - the real API's name
        self.calls.append({"module": module, "inputs": inputs, **settings})
        return module


def test_tensorrt_backend_builds_profiles_for_the_buckets_and_caches_engines(
        sdxl_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTorchTensorRT()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    eager = pipeline(sdxl_teacher)
    fast = pipeline(sdxl_teacher)
    fast.accelerate(FastPath(backend="tensorrt", cache_dir=tmp_path), buckets=(1, 4, 8))
    unet_call, vae_call = fake.calls
    assert unet_call["ir"] == "dynamo" and unet_call["cache_built_engines"] and unet_call["reuse_cached_engines"]
    assert unet_call["engine_cache_dir"] == str(tmp_path / "tensorrt")
    sample, timestep, hidden, text_embeds, time_ids = unet_call["inputs"]
    assert sample.min_shape == (1, 4, 8, 8) and sample.max_shape == (8, 4, 8, 8)
    assert timestep.max_shape == (8,) and hidden.min_shape[0] == 1 and time_ids.max_shape == (8, 6)
    assert vae_call["inputs"][0].max_shape == (8, 4, 8, 8)
    # The positional wrapper the engine is built from computes the same images as the UNet.
    torch.testing.assert_close(fast(PROMPTS, SEEDS), eager(PROMPTS, SEEDS), atol=1e-5, rtol=0)


@torch.library.custom_op("dmd2_tests::twice_plus_one", mutates_args=())
def _twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@_twice_plus_one.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x.shape[0], int):  # fails Dynamo's fake-tensor pass, as the real failure did
        raise RuntimeError("no fake kernel for a symbolic batch")
    return torch.empty_like(x)


class _StaticBatchOnly(nn.Module):
    """Traces with a concrete batch only: a stand-in for the SDXL VAE decoder, which Dynamo could
    not run through its fake-tensor pass with a symbolic batch on an H200."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _twice_plus_one(x)


def test_a_module_dynamo_cannot_trace_with_a_dynamic_batch_falls_back_to_a_graph_per_size() -> None:
    module = _StaticBatchOnly()
    compile_in_place(module)
    x = torch.randn(4, 3)
    # The warning names the op's own error, not Dynamo's first line ("RuntimeError when making fake tensor call").
    with pytest.warns(UserWarning, match="could not trace _StaticBatchOnly with a dynamic batch .*no fake kernel for"
                                         " a symbolic batch"):
        torch.testing.assert_close(module(x), x * 2 + 1)
    assert 0 not in x._dynamo_weak_dynamic_indices  # the mark is gone from the reused input
    graphs = counters["stats"]["unique_graphs"]
    for batch in (2, 4, 1):  # every size compiles once, statically; none fails
        y = torch.randn(batch, 3)
        torch.testing.assert_close(module(y), y * 2 + 1)
    assert counters["stats"]["unique_graphs"] == graphs + 2  # 2 and 1 are new; 4 was compiled in the fallback


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_compiled_text_encoders_give_the_eager_conditioning(family: str, sd15_teacher: Path, sdxl_teacher: Path,
                                                            tmp_path: Path) -> None:
    """--compile-text-encoder: every prompt encoder of the family is compiled (dynamic batch), the
    conditioning and the images are the eager ones; without the compile backend it is refused."""
    folder = {"sd15": sd15_teacher, "sdxl": sdxl_teacher}[family]
    eager, fast = pipeline(folder), pipeline(folder)
    fast.accelerate(FastPath(backend="compile", cache_dir=tmp_path, text_encoder=True))
    encoders = fast.backbone.text_encoders()
    assert len(encoders) == {"sd15": 1, "sdxl": 2}[family]
    assert all(m._compiled_call_impl is not None for m in encoders)
    graphs = None
    for prompts in (PROMPTS, PROMPTS[:2]):  # the second batch size reuses the first's graphs
        want, got = eager.backbone.encode_prompts(prompts), fast.backbone.encode_prompts(prompts)
        torch.testing.assert_close(got.hidden, want.hidden, atol=1e-4, rtol=0)
        for key in want.added:
            torch.testing.assert_close(got.added[key], want.added[key], atol=1e-4, rtol=0)
        if graphs is not None:
            assert counters["stats"]["unique_graphs"] == graphs
        graphs = counters["stats"]["unique_graphs"]
    if family == "sdxl":  # the images too: nothing else compiles SDXL's UNet (its added conditioning); SD1.5's
        # compiled UNet is test_compile_backend_gives_the_eager_images' (its compile costs the suite ~50 s)
        assert (fast(PROMPTS, SEEDS) - eager(PROMPTS, SEEDS)).abs().max() < CPU_TOLERANCE
    with pytest.raises(BackendError, match="needs --backend compile"):
        check_fast_path(FastPath(backend="eager", text_encoder=True))
