"""The GPU benchmark script runs end to end on the CPU at toy size (its GPU numbers come from a real card)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_runs_at_toy_size_and_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    temp = tmp_path / "temp"  # no --cache-dir: the folder the bench makes for its cache goes with it
    temp.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": "1", "TMPDIR": str(temp)}
    run = subprocess.run(
        [sys.executable, "-m", "dmd2_serve.bench", "--tiny", "--archs", "sd15", "--batches", "1,2",
         "--backends", "eager,tensorrt", "--budget-s", "300", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not list(temp.glob("dmd2-bench-cache-*"))
    assert "preflight ok" in run.stdout
    result = json.loads(out.read_text())
    e2e = {(r["batch"], r["backend"]) for r in result["rows"] if "arch" in r}
    assert e2e == {(1, "plain"), (1, "eager"), (2, "plain"), (2, "eager")}
    assert all(r["ms"] > 0 and r["check"] == "finite" for r in result["rows"] if "arch" in r)
    kernel = [r for r in result["rows"] if r.get("kind") == "renoise"]
    assert {r["mode"] for r in kernel} == {"x0", "from eps"} and all(r["max_err"] < 1e-2 for r in kernel)
    assert any("tensorrt not measured" in n and "dmd2-fast[tensorrt]" in n for n in result["notes"])
    assert "| sd15 | 2 | eager |" in run.stdout  # the printed table


def test_training_bench_runs_at_toy_size(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    run = subprocess.run([sys.executable, "-m", "dmd2_train.bench", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"tiny-sd15", "tiny-sd15-fsdp2", "tiny-sdxl-ckpt"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["iteration_s"] > r["fake_step_s"] > 0 and r["tflop_per_iteration"] > 0 and 0 < r["mfu"] and r["finite"]
    # the same architecture and batch count (nearly) the same FLOPs whether sharded or not
    assert rows["tiny-sd15-fsdp2"]["tflop_per_iteration"] == pytest.approx(rows["tiny-sd15"]["tflop_per_iteration"], rel=0.05)
    assert result["bf16_matmul_tflops"] > 0 and "| tiny-sdxl-ckpt |" in run.stdout


def test_every_variant_names_fast_path_options() -> None:
    """The levers the toy-size run leaves out parse and build a fast path as those it runs."""
    from dmd2_serve.bench.pipelines import VARIANTS, Variant
    from dmd2_serve.model.backends import FastPath

    for name, options in VARIANTS.items():
        variant = Variant.parse(f"{name}:16+1")
        assert (variant.name, variant.options, variant.batches) == (name, options, (16, 1))
        fast = FastPath(**{"backend": "compile", "compile_scope": "full", **options})
        assert all(getattr(fast, key) == value for key, value in options.items())
    assert Variant.parse("freeze").batches is None
    with pytest.raises(ValueError, match="unknown variant 'fast'; choose from default, static"):
        Variant.parse("fast")


def test_bench_compile_variants_at_toy_size(tmp_path: Path) -> None:
    """The compile levers run one at a time; batch 1's breakdown is reported; fp8 fails alone, with its reason;
    a second process starts from the warm cache and says where its seconds went, for compile and for aoti.
    (sliced stands for every option lever: each is an entry of VARIANTS on the same path, labelled
    "compile full, NAME", and its images are checked against eager in test_backends; sliced is the one whose
    graphs the default's left in the cache (an option that changes the graphs costs 30 s or more of Inductor
    here); aoti is a backend of its own.)"""
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "dmd2_serve.bench", "--tiny", "--archs", "sd15", "--batches", "2,1", "--backends",
         "compile", "--scopes", "full", "--variants", "default,fp8:2,aoti:1,sliced:1",
         "--no-preflight", "--no-kernel", "--no-eager-rows",
         "--budget-s", "400", "--out", str(out), "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"}, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["batch"], r["backend"]): r for r in result["rows"] if r.get("kind") != "profile"}
    compiled = [(2, "compile full"), (1, "aoti full"), (1, "compile full, sliced")]
    assert {(1, "compile full"), *compiled} <= set(rows)
    assert not {"plain", "eager"} & {backend for _, backend in rows}  # --no-eager-rows: only their images, as reference
    assert all(rows[k]["psnr_db"] > 60 for k in compiled)
    parts = [r for r in result["rows"] if r.get("kind") == "part"]
    assert {r["backend"] for r in parts} == {f"{b}: {p}" for b in ("compile full", "aoti full")
                                             for p in ("one UNet evaluation", "VAE decode")}
    # each part's time by class of op (on the CPU: ATen ops; the UNet's convolutions and matmuls)
    profile = [r for r in result["rows"] if r.get("kind") == "profile"]
    assert {r["part"] for r in profile} == {r["backend"] for r in parts}
    for part in {r["part"] for r in profile}:
        shares = [r["share"] for r in profile if r["part"] == part]
        assert sum(shares) == pytest.approx(1.0) and all(r["ms"] > 0 and r["largest"] for r in profile if r["part"] == part)
    eager_unet = {r["class"] for r in profile if r["part"] == "compile full: one UNet evaluation"}
    assert eager_unet  # with Inductor's CPU kernels folded into "other"; the classes themselves: test_profile
    assert "| sd15 | compile full: VAE decode |" in run.stdout
    assert any("fp8 failed" in n and "compute capability 8.9" in n for n in result["notes"])
    assert "Traceback" in run.stderr  # a failed lever's whole error is in the log, not only the note's start
    for backend in ("compile", "aoti"):
        cold = next(n for n in result["notes"] if n.startswith(f"cold start, sd15 {backend} full, warm cache"))
        seconds = dict(re.findall(r"(imports|models|first image) ([\d.]+) s", cold))
        assert set(seconds) == {"imports", "models", "first image"} and all(float(v) > 0 for v in seconds.values())
