"""--graph-text-encoder: prompt encoding split into the host's tokenizer and the device's encoders,
the encoders run inside the loop (inside its CUDA graph on a GPU; eagerly, the same code, here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_backends import CPU_TOLERANCE, PROMPTS, SEEDS, pipeline
from torch.utils._python_dispatch import TorchDispatchMode

from dmd2_serve.model import pipeline as pipeline_module
from dmd2_serve.model.adapters import load_backbone
from dmd2_serve.model.backends import BackendError, FastPath, check_fast_path
from dmd2_serve.model.pipeline import FewStepPipeline

# aten ops that make the host wait for the device (a value read back, or a shape that depends on
# values), or that bring host data in (a tensor made from Python numbers): any of them in the encoders
# would make a CUDA graph capture fail or bake a stale value in.
HOST_WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero", "equal",
              "lift_fresh", "lift_fresh_copy"}


class HostWaits(TorchDispatchMode):
    """Records every op that would make the host wait for the device or copy host data in. (A move
    between devices cannot show on a CPU-only machine: the GPU's capture is the check for that.)"""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_WAITS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def folder_of(family: str, sd15_teacher: Path, sdxl_teacher: Path) -> Path:
    return {"sd15": sd15_teacher, "sdxl": sdxl_teacher}[family]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_encoders_take_the_tokenizer_s_tensors_and_never_wait_for_the_device(
        family: str, sd15_teacher: Path, sdxl_teacher: Path) -> None:
    backbone = load_backbone(folder_of(family, sd15_teacher, sdxl_teacher))
    tokens = backbone.tokenize(PROMPTS)
    assert len(tokens) == {"sd15": 1, "sdxl": 3}[family]  # SDXL: both tokenizers' ids and the time ids
    assert all(t.shape[0] == len(PROMPTS) for t in tokens) and tokens[0].dtype == torch.int64
    with HostWaits() as spy:
        cond = backbone.encode_tokens(*tokens)
    assert spy.seen == []
    want = backbone.encode_prompts(PROMPTS)
    assert torch.equal(cond.hidden, want.hidden) and cond.added.keys() == want.added.keys()
    for host_trip in (lambda: torch.ones(2).sum().item(), lambda: torch.tensor([1.0, 2.0])):
        with HostWaits() as spy:  # the spy does see each kind
            host_trip()
        assert spy.seen


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_images_with_the_encoders_in_the_loop_are_the_usual_ones(family: str, sd15_teacher: Path,
                                                                 sdxl_teacher: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = folder_of(family, sd15_teacher, sdxl_teacher)
    usual, inside = pipeline(folder), pipeline(folder)
    inside.fast = FastPath(text_in_graph=True)
    monkeypatch.setattr(inside.backbone, "encode_prompts", lambda prompts: pytest.fail("encoded outside the loop"))
    torch.testing.assert_close(inside(PROMPTS, SEEDS), usual(PROMPTS, SEEDS), atol=1e-6, rtol=0)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # image to image
    torch.testing.assert_close(inside(PROMPTS, SEEDS, image=images, strength=0.5),
                               usual(PROMPTS, SEEDS, image=images, strength=0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(inside.generate_padded(PROMPTS, SEEDS, bucket=4),
                               usual.generate_padded(PROMPTS, SEEDS, bucket=4), atol=1e-6, rtol=0)


def test_a_failed_capture_falls_back_to_encoding_before_the_graph(sd15_teacher: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph stands in (the CPU has none): capturing the loop from token ids fails, as it would
    with an encoder that reads a value back; the pipeline warns once, then graphs the loop from the
    encoded prompts, with the same images."""
    want = pipeline(sd15_teacher)(PROMPTS, SEEDS)
    pipe = pipeline(sd15_teacher)
    pipe.fast = FastPath(text_in_graph=True)
    captured: list[torch.dtype] = []

    class Capture:
        def __init__(self, fn, inputs, pool=None) -> None:
            if inputs[0].dtype == torch.int64:  # the token ids: the encoders are in this graph
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            captured.append(inputs[0].dtype)
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(FewStepPipeline, "graphed", property(lambda self: True))
    monkeypatch.setattr(pipeline_module, "GraphedLoop", Capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    with pytest.warns(UserWarning, match="could not be captured in the loop's CUDA graph"):
        got = pipe(PROMPTS, SEEDS)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert captured == [torch.float32]  # the fallback graph: from the encoded prompts
    monkeypatch.setattr(pipe, "images_from_tokens", lambda *a, **k: pytest.fail("tried the encoders in the graph again"))
    torch.testing.assert_close(pipe(PROMPTS, SEEDS), want, atol=1e-6, rtol=0)  # no second warning either

    # A full card is no reason to give the encoders up: out of memory goes to the caller as it is.
    full = pipeline(sd15_teacher)
    full.fast = FastPath(text_in_graph=True)

    def out_of_memory(fn, inputs, pool=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline_module, "GraphedLoop", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        full(PROMPTS, SEEDS)
    assert full._text_in_graph


@pytest.mark.parametrize("fast, says", [
    (FastPath(text_in_graph=True, cuda_graphs=False), "CUDA graphs are off"),
    (FastPath(backend="tensorrt", text_in_graph=True), "TensorRT runs its own engines"),
])
def test_the_encoders_in_the_graph_are_refused_without_the_loop_s_graphs(fast: FastPath, says: str) -> None:
    with pytest.raises(BackendError, match=says):
        check_fast_path(fast)


def test_with_the_compile_backend_too(sd15_teacher: Path, tmp_path: Path) -> None:
    """--backend compile --compile-text-encoder --graph-text-encoder: the images of the eager pipeline."""
    usual, fast = pipeline(sd15_teacher), pipeline(sd15_teacher)
    fast.accelerate(FastPath(backend="compile", cache_dir=tmp_path, text_encoder=True, text_in_graph=True))
    assert fast._text_in_graph
    assert (fast(PROMPTS, SEEDS) - usual(PROMPTS, SEEDS)).abs().max() < CPU_TOLERANCE
