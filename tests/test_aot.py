"""``--backend aoti``: AOTInductor packages built once, loaded by a restart without tracing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_backends import CPU_TOLERANCE, PROMPTS, SEEDS, pipeline
from torch import nn

from dmd2_serve.model.aot import AOTCompiled, aot_compile_in_place
from dmd2_serve.model.backends import BackendError, FastPath, check_fast_path

# A second process: the same architecture with other weights (a fine-tune), the packages of the
# first process in its cache, building forbidden. Prints the largest difference from its own eager
# images at batch 3 and batch 1, and what it built.
RESTART = r"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_backends import PROMPTS, SEEDS, pipeline
import dmd2_serve.model.aot as aot
from dmd2_serve.model.backends import FastPath

def refuse(*a, **k):
    raise AssertionError("the restart compiled a package")

aot._package = refuse
torch.manual_seed(1)
eager, fast = pipeline(Path(sys.argv[1])), pipeline(Path(sys.argv[1]))
for a, b in zip([*eager.unet.parameters(), *eager.backbone.vae.parameters()],
                [*fast.unet.parameters(), *fast.backbone.vae.parameters()]):
    a.add_(0.05 * torch.randn_like(a))
    b.copy_(a)
fast.accelerate(FastPath(backend="aoti", cache_dir=Path(sys.argv[2])))
diff = [(fast(PROMPTS[:n], SEEDS[:n]) - eager(PROMPTS[:n], SEEDS[:n])).abs().max().item() for n in (3, 1)]
moved = (eager(PROMPTS, SEEDS) - pipeline(Path(sys.argv[1]))(PROMPTS, SEEDS)).abs().max().item()
print(json.dumps({"diff": diff, "moved": moved, "built": len(fast.unet._compiled_call_impl.built)}))
"""


def test_aoti_gives_the_eager_images_and_a_restart_loads_its_packages(sd15_teacher: Path, tmp_path: Path) -> None:
    eager, fast = pipeline(sd15_teacher), pipeline(sd15_teacher)
    fast.accelerate(FastPath(backend="aoti", cache_dir=tmp_path))
    want, got = eager(PROMPTS, SEEDS), fast(PROMPTS, SEEDS)
    assert got.shape == want.shape == (3, 3, 16, 16)
    assert (got - want).abs().max() < CPU_TOLERANCE
    # Batch 2 runs the package of batch 3 (the batch is symbolic in it); batch 1 gets its own.
    torch.testing.assert_close(fast(PROMPTS[:2], SEEDS[:2]), want[:2], atol=CPU_TOLERANCE, rtol=0)
    torch.testing.assert_close(fast(PROMPTS[:1], SEEDS[:1]), want[:1], atol=CPU_TOLERANCE, rtol=0)
    runners = [fast.unet._compiled_call_impl, fast.backbone.vae.decoder._compiled_call_impl]
    assert all(isinstance(r, AOTCompiled) for r in runners)
    assert [[p.name.split("-")[1] for p in r.built] for r in runners] == [["bN", "b1"], ["bN", "b1"]]
    packages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "aoti").glob("*.pt2"))
    assert packages == ["Decoder-b1", "Decoder-bN", "UNet2DConditionModel-b1", "UNet2DConditionModel-bN"]
    described = json.loads(next((tmp_path / "aoti").glob("UNet2DConditionModel-bN-*.json")).read_text())
    assert described["dynamic_batch"] and described["inputs"][1][0][0] == "B"
    # The weights are not in the packages: a restart with other weights of the architecture loads
    # them, compiles nothing, and gives its own eager images.
    out = subprocess.run([sys.executable, "-c", RESTART, str(sd15_teacher), str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    restart = json.loads(out.stdout.strip().splitlines()[-1])
    assert restart["built"] == 0 and restart["moved"] > 0.05
    assert max(restart["diff"]) < CPU_TOLERANCE
    assert out.stderr.count("aoti: loaded") == 4 and "aoti: compiled" not in out.stderr


class BranchesOnTheBatch(nn.Module):
    """A module whose code depends on the batch size, so no export can make the batch symbolic."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 2 if x.shape[0] == 2 else y


def test_a_module_export_cannot_make_batch_symbolic_gets_a_package_per_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BranchesOnTheBatch().eval()
    x = torch.randn(3, 4)
    want = {n: module(x[:n]) for n in (2, 3)}
    lines: list[str] = []
    runner = aot_compile_in_place(module, tmp_path, say=lines.append)
    with pytest.warns(UserWarning, match="compiling it once per batch size instead"):
        got = module(x[:2])
    torch.testing.assert_close(got, want[2])
    torch.testing.assert_close(module(x), want[3])
    assert [p.name.split("-")[1] for p in runner.built] == ["b2", "b3"]
    assert sum(line.startswith("aoti: compiled") for line in lines) == 2
    # A damaged package is named, with the fix, instead of crashing the start.
    runner.built[0].write_bytes(b"not a package")
    aot_compile_in_place(module, tmp_path, say=lines.append)
    with pytest.raises(BackendError, match="delete it and start again to rebuild it"):
        module(x[:2])


def test_aoti_refuses_what_it_cannot_run() -> None:
    with pytest.raises(BackendError, match="--backend aoti exports whole modules: use --compile-scope full"):
        check_fast_path(FastPath(backend="aoti", compile_scope="regional"))
    with pytest.raises(BackendError, match="which aoti does not take; use it with --backend compile"):
        check_fast_path(FastPath(backend="aoti", precision="fp8"))
    check_fast_path(FastPath(backend="aoti", text_encoder=True, text_in_graph=True))
