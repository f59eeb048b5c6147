"""Checkpoints written atomically and read back for an exact resume.

A checkpoint is one file ``checkpoints/step_XXXXXXX.pt`` holding the generator, the fake score
with its GAN head, both optimisers, the step and the RNG states. It is written to a temporary
name, flushed to disk, then renamed: a run killed at any moment leaves either the old set of
checkpoints or the old set plus one complete new one, never a torn file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"^step_(\d{7})\.pt$")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return sorted(found)


def save_checkpoint(out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
    path = checkpoint_dir(out) / f"step_{step:07d}.pt"
    save_atomic(state, path)
    for _, old in list_checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    for stale in checkpoint_dir(out).glob(".step_*.tmp-*"):  # left by a killed writer
        if stale.stat().st_mtime < path.stat().st_mtime:
            stale.unlink(missing_ok=True)
    return path


def load_latest(out: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads, or None. A file that fails to load is skipped."""
    for _, path in reversed(list_checkpoints(out)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged file must not stop the resume
            continue
    return None


def rng_state() -> dict[str, Any]:
    """torch's global CPU (and CUDA) RNG states."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
