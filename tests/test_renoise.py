"""The fused re-noise kernel under TRITON_INTERPRET=1 (set in conftest), against its reference."""

from __future__ import annotations

import os

import pytest
import torch
from dmd2_kernels.renoise import (
    philox4x32_reference,
    philox_normal_reference,
    renoise,
    renoise_reference,
    renoise_triton,
)
from scipy import stats

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before triton is imported"


def test_philox_matches_the_random123_known_answers() -> None:
    # Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
    t = torch.tensor
    zero = t([0])
    assert [int(w) for w in philox4x32_reference(zero, zero, zero, zero, zero)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = t([0xFFFFFFFF])
    assert [int(w) for w in philox4x32_reference(t([-1]), ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    key = t([0xA4093822 | (0x299F31D0 << 32)])
    words = philox4x32_reference(key, t([0x243F6A88]), t([0x85A308D3]), t([0x13198A2E]), t([0x03707344]))
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (4, 16, 16), (4, 40, 52)])
def test_kernel_noise_equals_the_reference(shape: tuple[int, ...]) -> None:
    # Odd sizes: fewer elements than a counter quarter, a ragged last quarter, several programs.
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**32 - 1], dtype=torch.int64)
    for stream in (0, 1, 3):
        got = renoise_triton(None, seeds, stream, 0.0, shape=shape)
        want = renoise_reference(None, seeds, stream, 0.0, shape=shape)
        assert got.shape == (4, *shape)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_modes_equal_the_reference_in_every_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 11, generator=g).to(dtype)
    eps = torch.randn(3, 4, 9, 11, generator=g).to(dtype)
    seeds = torch.tensor([5, 6, 7])
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for kwargs in ({}, {"eps": eps, "abar_t": 0.047}):
        out = renoise_triton(x, seeds, 2, 0.51, **kwargs)
        assert out.dtype == dtype and out.shape == x.shape
        want = renoise_reference(x, seeds, 2, 0.51, **kwargs)
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    # And the reference is the formula of the paper: x0 from eps, then sqrt(a) x0 + sqrt(1-a) z.
    z = renoise_reference(None, seeds, 2, 0.0, shape=x.shape[1:])
    x0 = (x.float() - (1 - 0.047) ** 0.5 * eps.float()) / 0.047 ** 0.5
    torch.testing.assert_close(renoise_reference(x, seeds, 2, 0.51, eps=eps, abar_t=0.047).float(),
                               (0.51 ** 0.5 * x0 + 0.49 ** 0.5 * z).to(dtype).float(), rtol=tol, atol=tol)


def test_every_output_element_is_written() -> None:
    x = torch.randn(2, 3, 17, 5)
    out = renoise_triton(x, torch.tensor([1, 2]), 1, 0.3)
    assert torch.isfinite(out).all()
    # Poisoned input in the masked-off tail must not leak: outputs depend only on the sample's own x.
    x2 = x.clone()
    x2[1] = float("nan")
    out2 = renoise_triton(x2, torch.tensor([1, 2]), 1, 0.3)
    assert torch.equal(out2[0], out[0]) and torch.isnan(out2[1]).all()


def test_noise_is_standard_normal_and_streams_and_seeds_are_independent() -> None:
    seeds = torch.arange(16)
    z0 = renoise_triton(None, seeds, 0, 0.0, shape=(4, 32, 32)).flatten(1)
    z1 = renoise_triton(None, seeds, 1, 0.0, shape=(4, 32, 32)).flatten(1)
    flat = z0.flatten().double()
    n = flat.numel()  # 65536 draws
    assert abs(flat.mean()) < 4 / n ** 0.5
    assert abs(flat.std() - 1) < 0.01
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    assert abs(stats.skew(flat.numpy())) < 0.05 and abs(stats.kurtosis(flat.numpy())) < 0.1
    per_sample = z0.shape[1]
    for a, b in ((z0[0], z1[0]), (z0[0], z0[1]), (z0[3], z1[4])):  # other stream, other seed
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 5 / per_sample ** 0.5
    # The four quarters of a sample come from different Philox words: not correlated either.
    q = per_sample // 4
    assert abs(torch.corrcoef(torch.stack([z0[0, :q], z0[0, q:2 * q]]))[0, 1]) < 5 / q ** 0.5


def test_a_seed_gives_the_same_noise_whatever_the_batch() -> None:
    alone = renoise_triton(None, torch.tensor([42]), 1, 0.0, shape=(4, 16, 16))
    crowd = renoise_triton(None, torch.tensor([7, 8, 42, 9, 10]), 1, 0.0, shape=(4, 16, 16))
    assert torch.equal(alone[0], crowd[2])
    assert not torch.equal(crowd[0], crowd[1])
    again = renoise_triton(None, torch.tensor([42]), 1, 0.0, shape=(4, 16, 16))
    assert torch.equal(alone, again)


class OnCuda:
    """Stands in for a CUDA tensor on a machine without one: all ``renoise`` reads to dispatch."""

    device = torch.device("cuda")

    def __init__(self) -> None:
        self.moved_to: dict = {}

    def to(self, **kwargs) -> OnCuda:
        self.moved_to = kwargs
        return self


def test_dispatch_launches_the_kernel_for_cuda_tensors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import dmd2_kernels.renoise as module

    launched: list = []
    monkeypatch.setattr(module, "renoise_triton", lambda *args: launched.append(args) or "kernel's answer")
    x, seeds = torch.randn(2, 4, 8, 8), torch.tensor([3, 4], dtype=torch.int32)
    assert torch.equal(renoise(x, seeds, 1, 0.7), renoise_reference(x, seeds, 1, 0.7)) and not launched
    assert renoise(None, seeds, 0, 0.0, shape=(4, 8, 8)).shape == (2, 4, 8, 8) and not launched
    # CUDA input: the kernel, with the seeds as int64 on the input's device; pure noise follows the seeds
    cuda_x, cuda_seeds, eps = OnCuda(), OnCuda(), OnCuda()
    assert renoise(cuda_x, cuda_seeds, 2, 0.5, eps=eps, abar_t=0.1) == "kernel's answer"
    assert launched == [(cuda_x, cuda_seeds, 2, 0.5, eps, 0.1, None, None)]
    assert cuda_seeds.moved_to == {"device": torch.device("cuda"), "dtype": torch.int64}
    assert renoise(None, OnCuda(), 0, 0.0, shape=(4, 8, 8)) == "kernel's answer" and len(launched) == 2
    # Long streams of a sample are plain reference numbers too (row b from seeds[b] only).
    assert torch.equal(philox_normal_reference(seeds, 0, 10)[1], philox_normal_reference(seeds[1:], 0, 10)[0])


def test_the_kernel_s_own_benchmark_runs_beside_it_at_toy_size(tmp_path) -> None:
    """``python -m dmd2_kernels.renoise_bench``: correctness and timing rows, their tables, its JSON;
    on a machine without CUDA it asks for --tiny instead of timing the interpreter."""
    import json
    import subprocess
    import sys

    out = tmp_path / "renoise.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "dmd2_kernels.renoise_bench", "--tiny", "--shapes", "1x4x8x8,2x4x6x6",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if r["kind"] == "renoise"]
    assert [(r["shape"], r["mode"]) for r in timed] == [("1x4x8x8", "x0"), ("1x4x8x8", "from eps"),
                                                        ("2x4x6x6", "x0"), ("2x4x6x6", "from eps")]
    assert all(r["max_err"] < 1e-2 and r["kernel_us"] > 0 and r["gbps"] > 0 for r in timed)
    variants = [r for r in rows if r["kind"] == "renoise-variant"]
    assert {r["block"] for r in variants} == {128, 256, 1024} and all(r["max_err"] < 1e-2 for r in variants)
    assert "| 2x4x6x6 from eps |" in run.stdout and "| 1x4x8x8 | 1024 | False |" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "dmd2_kernels.renoise_bench", "--shapes", "8x4x128"],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert bad.returncode == 2 and "BxCxHxW" in bad.stderr
    if not torch.cuda.is_available():
        gpu = subprocess.run([sys.executable, "-m", "dmd2_kernels.renoise_bench"], capture_output=True, text=True,
                             timeout=120, env=env, check=False)
        assert gpu.returncode == 2 and "add --tiny" in gpu.stderr
