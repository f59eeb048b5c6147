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
  the eager path's (max difference and PSNR). ``--variants`` adds the levers one at a time
  (static batch, max-autotune for the decoder or everything, fp8, aoti, freezing, sub-pixel
  upsampling, sliced decode), each run largest batch first so the dynamic-batch graph of the
  first serves the rest; batch 1
  of ``default``, ``decoder``, ``fp8``, ``aoti``, ``freeze`` and ``subpixel`` is broken down into
  one UNet evaluation and the decode, each in its own graph, with their device time by class of
  kernel;
* ``--attention-rows``: the eager + graph loop with each SDPA backend forced;
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
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from dmd2_kernels.renoise_bench import GPU_SHAPES, TINY_SHAPES, renoise_rows
from dmd2_kernels.timing import copy_bandwidth_gbps

from .pipelines import ARCHS, Variant, bench_arch, cold_start, preflight
from .report import Budget, OutOfTime, Report, _watchdog


def _list(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def _archs(text: str) -> list[str]:
    """An argparse type: architectures of :data:`ARCHS`, comma-separated."""
    archs = _list(text)
    if unknown := [a for a in archs if a not in ARCHS]:
        raise argparse.ArgumentTypeError(f"unknown architecture {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    if not archs:
        raise argparse.ArgumentTypeError(f"name an architecture: {', '.join(ARCHS)}")
    return archs


def _batches(text: str) -> list[int]:
    """An argparse type: batch sizes, comma-separated."""
    try:
        batches = [int(b) for b in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is no list of batch sizes: e.g. 16,4,1") from None
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': give batch sizes of 1 or more, e.g. 16,4,1")
    return batches


def _variants(text: str) -> list[Variant]:
    """An argparse type: ``NAME[:B+B],...`` of :data:`VARIANTS` (argparse shows no ValueError's words)."""
    try:
        return [Variant.parse(v) for v in _list(text)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cold_start_note(report: Report, budget: Budget, name: str, backend: str, scope: str, cache_dir: Path,
                    tiny: bool) -> None:
    """Time a second process's start to its first batch-1 image with the warm ``cache_dir``; note it."""
    budget.require(40 if not tiny else 30, f"cold start, {backend}")
    cmd = [sys.executable, "-m", "dmd2_serve.bench", "--cold-start", name, "--cold-backend", backend, "--scope", scope,
           "--cache-dir", str(cache_dir), "--launched", str(time.time())] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, budget.left()), check=True)
    phases = json.loads(out.stdout.strip().splitlines()[-1])["cold_start_s"]
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "total")
    report.note(f"cold start, {name} {backend} {scope}, warm cache: {phases['total']:.1f} s from interpreter start to"
                f" the first batch-1 image (random weights made on the GPU): {parts}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (argparse's one-line error and exit 2 on a bad one)."""
    p = argparse.ArgumentParser(prog="python -m dmd2_serve.bench", description=__doc__.split("\n")[0])
    p.add_argument("--archs", type=_archs, default=list(ARCHS), metavar="ARCH,...")
    p.add_argument("--batches", type=_batches, default=[1, 4, 16], metavar="B,...")
    p.add_argument("--backends", type=_list, default=["compile", "tensorrt", "xformers"])
    p.add_argument("--scopes", type=_list, default=None,
                   help="compile scopes per arch, e.g. full or full,regional (default: sd15 full,regional;"
                        " sdxl regional,full, the second only when time is left)")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new stages after this")
    p.add_argument("--cache-dir", type=Path, default=None, help="compile cache (default: a temp folder, removed at the end)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--tiny", action="store_true", help="small models (CPU tests of this script)")
    p.add_argument("--skip-cold-start", action="store_true", help="do not time a second process's start")
    p.add_argument("--no-eager-rows", dest="eager_rows", action="store_false",
                   help="time no plain / eager rows (the eager images are still made, as the compiled rows' reference):"
                        " saves a lent card's minutes once those rows are known")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="turn cuDNN's algorithm search on for every row (measured on an H100: no gain in the"
                        " graphed rows, slower eager rows)")
    p.add_argument("--variants", type=_variants,
                   default=[Variant("default", {})], metavar="NAME[:B+B],...",
                   help="compiled configurations to time, each against the first: default (dynamic batch),"
                        " static (a graph per batch size), decoder / all (max-autotune for the VAE decoder / the UNet"
                        " too), fp8 (torchao float8 attention linears), aoti (AOTInductor packages), freeze (Inductor's"
                        " freezing), subpixel (the upsamplers as transposed convolutions), sliced (the decode one"
                        " image at a time); ':16+1' limits one to those batches")
    p.add_argument("--attention-rows", action="store_true",
                   help="time the eager + graph loop with each SDPA backend forced (flash, cuDNN, efficient)")
    p.add_argument("--no-preflight", dest="preflight", action="store_false",
                   help="skip the kernel / graph / compile self-check (a second call on the same card)")
    p.add_argument("--no-kernel", dest="kernel", action="store_false", help="skip the re-noise kernel rows")
    p.add_argument("--cold-start", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scope", default="full", help=argparse.SUPPRESS)
    p.add_argument("--cold-backend", default="compile", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.attention_rows and not args.eager_rows:
        p.error("--attention-rows times eager rows: drop --no-eager-rows")
    for variant in args.variants:  # a limit outside --batches would time nothing, silently
        if outside := sorted(set(variant.batches or ()) - set(args.batches)):
            p.error(f"--variants {variant.name} is limited to batch {'+'.join(map(str, outside))}, which --batches"
                    f" {','.join(map(str, args.batches))} does not run: add it there, or change the limit")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the stages in priority order within the budget; print the tables."""
    args = parse_args(argv)
    if args.cache_dir is not None:
        return _run(args, args.cache_dir)
    # SDXL's compiled graphs and packages are gigabytes: a folder made here goes with the run, also when
    # `timeout` or a job scheduler ends it with SIGTERM
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="dmd2-bench-cache-", ignore_cleanup_errors=True) as made:
        return _run(args, Path(made))


def _run(args: argparse.Namespace, cache_dir: Path) -> int:
    """The benchmark that ``main``'s arguments ask for, with its compile cache in ``cache_dir``."""
    if args.cold_start:
        phases = cold_start(args.cold_start, args.scope, cache_dir, args.tiny, args.launched or time.time(),
                            args.cold_backend)
        print(json.dumps({"cold_start_s": phases}))
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark and device.type == "cuda"  # every row alike
    report = Report(args.out)
    budget = Budget(args.budget_s, report)
    _watchdog(args.budget_s + 20)
    report.note(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__};"
                f" {time.strftime('%Y-%m-%d')}")
    if args.preflight:
        preflight(device)  # raises: nothing long runs on a broken kernel, capture or compile
    stages: list[tuple[str, Callable[[], None]]] = []
    if args.kernel:
        copy_gbps = copy_bandwidth_gbps(device)
        report.note(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s")
        shapes = TINY_SHAPES if args.tiny else GPU_SHAPES

        def kernel_rows() -> None:  # the kernel's own benchmark's rows, in this report
            for row in renoise_rows(device, shapes, copy_gbps):
                report.add(**row)

        stages.append(("re-noise kernel", kernel_rows))

    def scopes_for(name: str, extra: bool) -> list[str]:
        if args.scopes:
            return args.scopes if not extra else []
        scopes = ARCHS[name].compile_scopes
        return list(scopes[1:]) if extra else list(scopes[:1])

    # a second process's start with the cache the rows left, for each backend they used
    colds = [b for b, used in (("compile", any(v.name != "aoti" for v in args.variants)),
                               ("aoti", any(v.name == "aoti" for v in args.variants))) if used]
    for name in args.archs:
        stages.append((name, lambda n=name: bench_arch(report, n, args.batches, scopes_for(n, False), device, budget,
                                                        cache_dir, args.tiny, args.backends, variants=args.variants,
                                                        eager_rows=args.eager_rows,
                                                        attention_rows=args.attention_rows)))
        if name == args.archs[0] and "compile" in args.backends and scopes_for(name, False) and not args.skip_cold_start:
            for backend in colds:
                stages.append((f"cold start, {backend}", lambda n=name, b=backend: cold_start_note(
                    report, budget, n, b, scopes_for(n, False)[0], cache_dir, args.tiny)))
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
        except Exception as e:  # a failed stage is reported (whole in the log); the others still run
            traceback.print_exc()
            report.note(f"{title} failed: {type(e).__name__}: {str(e)[:300]}")
        if device.type == "cuda":  # the stage's models are gone with its frame: free their memory
            torch.cuda.empty_cache()
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    print("\n" + report.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
