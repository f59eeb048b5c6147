"""``python -m dmd2_train encode-latents``: real images -> fp16 VAE latent shards, encoded once.

What is stored, and why: the mean and the std of each image's latent distribution (the VAE
encoder's diagonal Gaussian) in UNet space (times the VAE's scaling factor), float16, not one
sample of it. Training draws a fresh sample ``mean + std * z`` at every use, as encoding the
image again would; a stored sample (what DMD2's own pre-encoding keeps) would freeze one draw
for the whole run. The price is twice the space of a sample: 64 KiB an image at 512 px (SD1.5),
256 KiB at 1024 px (SDXL).

Layout of ``--out``:
    latents.json                 format, the teacher's facts (family, latent shape, image size,
                                 the latents of a fixed test image: its VAE's fingerprint), the
                                 source, the sample and shard counts
    latents-000000.safetensors   ``mean``, ``std``: (m, C, h, w) float16; metadata ``captions``
                                 (a JSON list, "" where an image had none) and ``keys`` (where
                                 each sample came from)
Shard s holds the readable samples among source samples [s S, (s + 1) S) in the source's sorted
order (unreadable ones are skipped and counted). Each shard is written to a ``.partial`` file,
synced and renamed, so a killed run leaves whole shards only and the same command run again
encodes just the missing ones. Under ``torchrun`` / ``accelerate launch`` process r of W takes
shards r, r + W, ... (``RANK`` / ``WORLD_SIZE``; its GPU from ``LOCAL_RANK``).
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DataError
from .datasets import (
    LATENT_FORMAT,
    LATENT_MANIFEST,
    Sample,
    Source,
    check_latent_facts,
    first_readable,
    image_source,
    latent_facts,
    latent_shard_problem,
    print_warning,
    try_read,
)
from .export import permissions_by_umask

SETTINGS = ("format", "sample_shape", "image_size", "samples", "shard_size", "shards")  # must match on a rerun


@dataclass
class EncodeReport:
    """What one process did: shards written and found done, samples encoded, skipped, uncaptioned."""

    written: int = 0
    kept: int = 0
    samples: int = 0
    skipped: int = 0
    uncaptioned: int = 0

    def line(self, rank: int, world: int) -> str:
        who = f"process {rank} of {world}: " if world > 1 else ""
        return (f"{who}{self.written} shards written ({self.samples} samples), {self.kept} already done;"
                f" {self.skipped} unreadable samples skipped, {self.uncaptioned} without a caption")


def process_split() -> tuple[int, int, int]:
    """(rank, world size, local rank) as ``torchrun`` / ``accelerate launch`` set them; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def shards_of(rank: int, world: int, count: int) -> range:
    """The shards process ``rank`` of ``world`` encodes: every world-th, from its rank."""
    return range(rank, count, world)


def shard_name(s: int) -> str:
    return f"latents-{s:06d}.safetensors"


class SourceSpan(Dataset):
    """Source samples [start, stop) in the source's own order, decoded in DataLoader workers, as
    (name, sample, ""); an unreadable one as (name, None, "name: why")."""

    def __init__(self, source: Source, start: int, stop: int) -> None:
        self.source, self.start, self.stop = source, start, stop
        self.ends = list(accumulate(source.unit_sizes))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[str, Sample | None, str]:
        index = self.start + i
        unit = bisect_right(self.ends, index)
        k = index - (self.ends[unit] - self.source.unit_sizes[unit])
        return (self.source.name_of(unit, k), *try_read(self.source, unit, k))


def _write_atomic(path: Path, write: Any, tag: str = "") -> None:
    """``write(tmp)``, fsync, rename to ``path``: readers see the whole file or none."""
    tmp = path.with_name(f".{path.name}{tag}.partial")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    permissions_by_umask(tmp)
    os.replace(tmp, path)


def prepare_folder(out: Path, manifest: dict[str, Any], backbone: Any) -> None:
    """Create ``out`` with its manifest, or check that an existing one was made the same way."""
    path = out / LATENT_MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"'{path}' cannot be read ({type(e).__name__}: {e}): it is damaged; move it out of"
                            f" '{out}' (the shards beside it are encoded again), or use a new --out") from None
        for key in SETTINGS:
            if old.get(key) != manifest[key]:
                raise DataError(f"'{out}' holds latents made with other settings ({key}: {old.get(key)} there,"
                                f" {manifest[key]} now); rerun with the same --teacher, --images and --shard-size,"
                                " or use a new --out")
        check_latent_facts(out, old, backbone)
        return
    text = json.dumps(manifest, indent=1)
    try:  # every process writes the same manifest; each through its own temporary name
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda tmp: tmp.write_text(text), tag=f".{os.getpid()}")
    except OSError as e:
        raise DataError(f"cannot write to '{out}' ({e.strerror}); pass --out DIR with a writable folder") from None


@torch.no_grad()
def encode_shard(backbone: Any, span: SourceSpan, path: Path, batch_size: int, workers: int,
                 report: EncodeReport) -> None:
    """Encode one shard's samples in batches of ``batch_size`` and write it atomically."""
    from safetensors.torch import save_file

    means, stds, captions, keys = [], [], [], []
    loader = DataLoader(span, batch_size=batch_size, num_workers=workers, collate_fn=list)
    for items in loader:
        good = [(name, sample) for name, sample, _ in items if sample is not None]
        for _, _, why in items:
            if why:
                report.skipped += 1
                print_warning(f"skipped {why}")
        if not good:
            continue
        mean, std = backbone.encode_distribution(torch.stack([s.pixels for _, s in good]))
        means.append(mean.half().cpu().contiguous())  # the VAE's mean and std are views of one tensor
        stds.append(std.half().cpu().contiguous())
        captions += [s.caption for _, s in good]
        keys += [name for name, _ in good]
    report.uncaptioned += sum(not c for c in captions)
    report.samples += len(captions)
    empty = torch.zeros((0, *backbone.sample_shape), dtype=torch.float16)
    tensors = {"mean": torch.cat(means) if means else empty, "std": torch.cat(stds) if stds else empty}
    meta = {"format": LATENT_FORMAT, "captions": json.dumps(captions), "keys": json.dumps(keys)}
    _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def encode_latents(teacher: Path, images: Path, out: Path, batch_size: int = 16, shard_size: int = 1000,
                   workers: int = 2, image_size: int | None = None, rank: int | None = None,
                   world: int | None = None) -> EncodeReport:
    """Encode the images at ``images`` (a folder or WebDataset shards) for ``teacher`` into ``out``.

    ``rank`` / ``world`` default to the launcher's environment; see the module docstring.
    """
    from tqdm.auto import tqdm

    from dmd2_serve.model.adapters import load_backbone

    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise DataError("--batch-size and --shard-size must be at least 1, --workers at least 0")
    if image_size is not None and image_size < 1:  # 0 read as not given; -4 blamed the images
        raise DataError(f"--image-size {image_size}: give a side in pixels, 1 or more, or leave it out for the teacher's")
    if (Path(out) / "checkpoints").is_dir() or (Path(out) / "dmd2.json").is_file():
        raise DataError(f"--out '{out}' is a training run or a model folder: give the latent shards a folder of their"
                        " own")
    env_rank, env_world, local = process_split()
    rank, world = env_rank if rank is None else rank, env_world if world is None else world
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(Path(teacher), image_size=image_size).to(device)
    source = image_source(Path(images), backbone.image_size, backbone.image_channels)
    first_readable(source)  # nothing readable: one line, before any file is written
    total = sum(source.unit_sizes)
    count = -(-total // shard_size)
    manifest = {"format": LATENT_FORMAT, **latent_facts(backbone), "source": str(images), "samples": total,
                "shard_size": shard_size, "shards": count}
    out = Path(out)
    prepare_folder(out, manifest, backbone)
    report = EncodeReport()
    mine = shards_of(rank, world, count)
    for s in tqdm(mine, desc=f"encode-latents {rank}/{world}" if world > 1 else "encode-latents", unit="shard"):
        path = out / shard_name(s)
        if path.is_file() and (problem := latent_shard_problem(path)):
            print_warning(f"{path} is damaged ({problem}): encoding it again")
        elif path.is_file():
            report.kept += 1
            continue
        span = SourceSpan(source, s * shard_size, min((s + 1) * shard_size, total))
        encode_shard(backbone, span, path, batch_size, workers, report)
        report.written += 1
    return report
