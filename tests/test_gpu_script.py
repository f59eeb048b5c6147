"""scripts/gpu-bench.sh, the one call a lent card gets: every part's command line is one its benchmark takes.

A card is lent for 15 minutes now and then; an option renamed since the script was last run there would
cost a start (minutes) and the part. Here each line is parsed as the benchmark parses it, on the CPU.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dmd2_serve.bench.__main__ import parse_args as serve_bench_args
from dmd2_serve.bench.served import parse_args as served_bench_args
from dmd2_train.bench import parse_args as train_bench_args

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-bench.sh"
PARSERS: dict[str, Callable[[list[str]], object]] = {
    "dmd2_serve.bench": serve_bench_args, "dmd2_serve.bench.served": served_bench_args,
    "dmd2_train.bench": train_bench_args}


def printed(*parts: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_BENCH_PRINT": "1", "OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True, env=env, timeout=60,
                          check=False)


def test_every_part_gives_its_benchmark_a_command_line_it_takes(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    listing = printed("no-such-part", out=tmp_path)
    assert listing.returncode == 2, listing.stdout + listing.stderr
    parts = listing.stdout.split("choose from ", 1)[1].split()  # the script's PARTS
    assert {"train", "sd15", "served", "sdxl", "sdxl-levers", "aoti-sdxl"} <= set(parts)
    run = printed(*parts, out=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [shlex.split(line) for line in run.stdout.splitlines() if line.startswith("python3 -m ")]
    assert len(lines) == len(parts), run.stdout  # one benchmark per part, each printed, none run
    for line in lines:
        module, argv = line[2], line[3:]
        try:
            PARSERS[module](argv)
        except SystemExit:
            pytest.fail(f"{shlex.join(line)}\n{module} refuses it: {capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not list(tmp_path.iterdir())  # nothing was run, so nothing written
    late = printed("sd15", "sdxl-lever", out=tmp_path)  # a typo in the last part: refused before the first runs
    assert late.returncode == 2 and "python3 -m" not in late.stdout and "'sdxl-lever'" in late.stdout


@pytest.mark.parametrize("module, argv, words", [
    ("dmd2_serve.bench", ["--variants", "default,fp16"], "unknown variant 'fp16'"),
    ("dmd2_serve.bench", ["--batches", "16,1", "--variants", "default,fp8:4"], "limited to batch 4"),
    ("dmd2_serve.bench", ["--archs", "sd15,sd3"], "unknown architecture sd3"),
    ("dmd2_serve.bench", ["--variants", "fp8:x"], "after the ':' come batch sizes joined by '+', e.g. fp8:16+1"),
    ("dmd2_serve.bench.served", ["--bucket", "1,4", "--", "--compile-text-encoders"], "--compile-text-encoders"),
    ("dmd2_train.bench", ["--rows", "sd15-b8,sdxl-b4"], "unknown row(s) sdxl-b4"),
])
def test_a_bad_line_is_refused_before_anything_runs(module: str, argv: list[str], words: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """What the first test leans on: each parser refuses what its benchmark could not run (the served
    benchmark: the server's own options too, after --; the training benchmark: its row names)."""
    with pytest.raises(SystemExit) as e:
        PARSERS[module](argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
