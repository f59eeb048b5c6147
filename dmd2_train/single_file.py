"""A single-file teacher (one ``.safetensors`` in the original layout), converted once into the run.

The main process converts it with diffusers' single-file loader (the adapter registry decides
the family and refuses the rest) and writes ``<out>/teacher/``, a diffusers folder; everything
after that (the adapter, the UNet, the export's scheduler and encoders) reads that folder as it
reads any teacher. A resumed run finds it, with the record of what it was converted from, and
reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmd2_serve.model.adapters import ModelFolderError, is_single_file, load_single_file

from .export import folder_written_atomically

SOURCE_RECORD = "dmd2_source.json"  # in a converted folder: the file and configs it came from


def _source(teacher: Path, teacher_config: Path | None) -> dict[str, Any]:
    stat = teacher.stat()
    return {"file": str(teacher.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "teacher_config": str(teacher_config.resolve()) if teacher_config else None}


def convert_teacher(teacher: Path, teacher_config: Path | None, folder: Path,
                    log: Callable[[str], None] = print) -> Path:
    """``folder`` holding ``teacher`` (a single file) as a diffusers pipeline: converted now, or
    reused when an earlier start of the run converted this very file with these configs."""
    teacher, folder = Path(teacher), Path(folder)
    source = _source(teacher, Path(teacher_config) if teacher_config else None)
    record = folder / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == source:
        log(f"teacher: reusing {folder}, converted earlier from {teacher}")
        return folder
    pipe = load_single_file(teacher, teacher_config)  # refuses, in one line, what it cannot use
    log(f"teacher: converting the single file {teacher} into the diffusers folder {folder} (once; a resumed"
        " run reuses it)")
    with folder_written_atomically(folder) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(source, indent=2))
    return folder


def converted_copy(teacher: Path, out: Path) -> Path | None:
    """``<out>/teacher`` when the single file ``teacher`` is gone but this run converted it there: all a
    resume needs (the file deleted to save space, or the run folder moved to a machine without it)."""
    folder = Path(out) / "teacher"
    if Path(teacher).exists() or not (folder / SOURCE_RECORD).is_file():
        return None
    try:
        converted_from = json.loads((folder / SOURCE_RECORD).read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if Path(converted_from) == Path(teacher).resolve() else None


def teacher_folder(teacher: Path, teacher_config: Path | None, out: Path, accelerator: Any) -> Path:
    """The diffusers folder of a run's teacher: the teacher itself when it is a folder; for a
    single file, ``<out>/teacher`` (the main process converts, the others wait for it; the file may be
    gone once it is converted)."""
    if (copy := converted_copy(teacher, out)) is not None:
        accelerator.print(f"teacher: {teacher} is gone; using {copy}, converted from it when the run began")
        return copy
    if not is_single_file(teacher):
        if teacher_config is not None:
            raise ModelFolderError(f"--teacher-config is for a single-file teacher, and '{teacher}' is not one (a folder"
                                   " carries its own configs): leave --teacher-config out")
        return Path(teacher)
    folder = Path(out) / "teacher"
    if accelerator.is_main_process:
        convert_teacher(teacher, teacher_config, folder, accelerator.print)
    accelerator.wait_for_everyone()
    return folder
