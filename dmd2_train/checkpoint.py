"""Distributed checkpoints: written by every process in parallel, atomic, reshardable.

A checkpoint is a folder ``checkpoints/step_XXXXXXX/`` in ``torch.distributed.checkpoint`` (DCP)
format: the generator, the fake score with its GAN head, both optimiser states and the EMA, each
process writing its own shard (replicated tensors once), plus ``meta.json`` (step, update
counts, world size, the run's config). Keys are the modules' own parameter names (no DDP or
FSDP prefixes), so a checkpoint written by N processes loads into M, sharded or not.

Atomicity: every process writes into ``.step_XXXXXXX.partial/``; only when all have finished
(DCP's own barrier) does the main process add ``meta.json``, fsync and rename the folder to its
final name. A run killed at any moment leaves the previous complete checkpoints untouched and,
at worst, a ``.partial`` folder that the next save removes. No RNG state is stored: every draw
of step s comes from generators seeded by (seed, s, rank).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PATTERN = re.compile(r"^step_(\d{7})$")
LEGACY = re.compile(r"^step_(\d{7})\.pt$")
META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used; the message says what to do."""


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, folder)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name)) and (p / META).is_file()]
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def training_state(models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """The DCP state dict: ``{name: model state}``, ``{name: optimiser state}`` (keyed by parameter
    name, so independent of wrapping and world size) and ``extra`` tensors (e.g. the EMA)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {name: get_model_state_dict(m) for name, m in models.items()}
    for name, (model, opt) in optimizers.items():
        state[name] = get_optimizer_state_dict(model, getattr(opt, "optimizer", opt))
    return state | extra


def save_checkpoint(out: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` from every process (collective), then keep the newest ``keep``."""
    import torch.distributed.checkpoint as dcp

    folder = checkpoint_dir(out)
    final = folder / f"step_{step:07d}"
    partial = folder / f".step_{step:07d}.partial"
    if _is_main():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed save
    _barrier()
    try:
        with warnings.catch_warnings():  # one process without a process group is a normal case here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save(state, checkpoint_id=str(partial))
        if _is_main():
            (partial / META).write_text(json.dumps({"step": step, **meta}, indent=1))
            with open(partial / META) as f:
                os.fsync(f.fileno())
            _fsync_dir(partial)
    except BaseException as e:  # a full disk (DCP wraps the OSError in its CheckpointException): free what it took
        if _is_main():
            shutil.rmtree(partial, ignore_errors=True)
        from .run import storage_failure

        if (why := storage_failure(e)) is None:
            raise
        earlier = list_checkpoints(out)
        kept = (f"the checkpoint at step {earlier[-1][0]} ({earlier[-1][1]}) is intact: continue from it with --resume"
                if earlier else "no checkpoint was written before it")
        raise CheckpointError(f"checkpoint step {step} could not be written to {final}: {why}; what it had written"
                              f" is removed; free space (or use a folder on other storage); {kept}") from None
    if _is_main():
        if final.exists():  # the same step saved again (a resumed run stopped at once)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(folder)
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(".step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def latest(out: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None; refuses an old single-file checkpoint clearly."""
    found = list_checkpoints(out)
    if found:
        return found[-1]
    folder = checkpoint_dir(out)
    if folder.is_dir() and any(LEGACY.match(p.name) for p in folder.iterdir()):
        raise CheckpointError(
            f"{folder} holds single-file checkpoints (step_XXXXXXX.pt) of an older dmd2_train; this version"
            " writes distributed checkpoints (step_XXXXXXX/) and cannot resume those: start a new --out, or"
            " export the old run's generator with the version that wrote it")
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def load_into(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` (a template from :func:`training_state`) in place from ``path`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except CheckpointException as e:  # a BaseException wrapping each rank's error: raise the first one's
            failure = next((f[0] if isinstance(f, tuple) else f for f in e.failures.values()), None)
            if isinstance(failure, Exception):
                raise failure from None
            raise


def apply_training_state(models: dict[str, nn.Module], optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
                         state: dict[str, Any]) -> None:
    """Copy a loaded state into the models and optimisers."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name, m in models.items():
        set_model_state_dict(m, state[name])
    for name, (model, opt) in optimizers.items():
        set_optimizer_state_dict(model, getattr(opt, "optimizer", opt), state[name])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A whole checkpoint as plain nested dicts of full tensors, in one process (tests, tools)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        state = _load_state_dict_from_keys(checkpoint_id=str(path))
    return state | {"meta": read_meta(path)}
