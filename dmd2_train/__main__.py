"""Command line: ``python -m dmd2_train [distill|teacher] ...``.

    python -m dmd2_train --preset digits --out runs/digits         distil the bundled teacher
    python -m dmd2_train --teacher PATH --prompts FILE ...         distil an SD 1.x / 2.x / SDXL folder
    python -m dmd2_train --teacher M.safetensors --teacher-config DIR ...   or a single-file checkpoint
    python -m dmd2_train --config run.yaml ratio=5 lr_fake=1e-6    YAML plus key=value overrides
    python -m dmd2_train --out runs/digits --resume                continue from the last checkpoint
    python -m dmd2_train teacher --preset digits                   retrain the bundled teacher
    python -m dmd2_train encode-latents --teacher DIR --images SRC --out DIR   pre-encode real images
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("distill", "teacher", "eval", "table", "encode-latents")
REAL_SCALE_FLAGS = [(f"--{name.replace('_', '-')}", name) for name in (
    "reference", "inception", "clip", "num", "batch_size", "eval_resolution", "resize_filter", "patch_fid")]
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")  # a config key=value (- reads as _)


def _cfg_scale(text: str) -> float:
    """An argparse type: a classifier-free guidance scale, a finite number 0 or more."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a CFG scale: give a number 0 or more (1: no guidance)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dmd2_train",
        description="Distil a diffusion teacher into a few-step generator with DMD2.",
        epilog="Commands: distill (the default), teacher, eval, encode-latents and table; `python -m dmd2_train"
               " COMMAND --help` for each.",
    )
    sub = p.add_subparsers(dest="command")
    d = sub.add_parser(
        "distill", help="DMD2 distillation (the default command)", prog="python -m dmd2_train [distill]",
        description="Distil a diffusion teacher into a few-step generator with DMD2.",
        epilog="Other commands: teacher (retrain the bundled digits teacher), eval, encode-latents, table;"
               " `python -m dmd2_train COMMAND --help` for each.",
    )
    d.add_argument("--preset", metavar="NAME", help="digits (bundled, CPU), sd15, sd15-stage2, sd15-4step or sdxl"
                   " (README: Presets); default: from the teacher's family")
    d.add_argument("--config", type=Path, metavar="FILE", help="YAML file of config keys")
    d.add_argument("--teacher", type=Path, metavar="DIR|FILE", help="diffusers-format SD 1.x / 2.x / SDXL folder, or"
                   " a single-file .safetensors checkpoint with --teacher-config (default: the bundled digits teacher)")
    d.add_argument("--teacher-config", type=Path, metavar="DIR", help="for a single-file teacher: the model's diffusers"
                   " config folder (model_index.json, component configs, tokenizers; no weights needed)")
    d.add_argument("--out", type=Path, metavar="DIR",
                   help="run folder (checkpoints, logs, previews, generator/); default runs/dmd2")
    d.add_argument("--max-steps", type=int, metavar="N", help="total training steps")
    d.add_argument("--prompts", type=Path, metavar="FILE", help="prompt file (.txt, one a line, or .jsonl)")
    d.add_argument("--real-images", type=Path, metavar="PATH", help="real images for the GAN: an image folder,"
                   " WebDataset .tar shards (folder, file or glob) or an encode-latents folder")
    d.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. ratio=5")
    t = sub.add_parser("teacher", help="train the bundled digits teacher")
    t.add_argument("--preset", default="digits", help="digits")
    t.add_argument("--out", type=Path, help="teacher folder to write (default: the bundled one)")
    t.add_argument("--steps", type=int, help="training steps")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="any teacher config key, e.g. batch_size=64")
    e = sub.add_parser("eval", help="score a generator or a teacher: the digits protocol, or FID / CLIP"
                                     " score at real scale when --captions is given")
    e.add_argument("--generator", type=Path, help="an exported generator folder")
    e.add_argument("--teacher", type=Path, help="a teacher folder, sampled with DDIM")
    e.add_argument("--steps", type=int, help="sampling steps: a generator's first N of its schedule, 1 to its"
                   " length (default: all of them); a teacher's DDIM steps, 1 or more (default 50)")
    e.add_argument("--guidance", type=_cfg_scale, default=2.0, help="teacher CFG scale, 0 or more")
    e.add_argument("--captions", type=Path, help="real scale: caption file (.txt or .jsonl), e.g. COCO-2014 val")
    e.add_argument("--reference", type=Path, help="real scale: folder of reference images (the COCO images)")
    e.add_argument("--inception", type=Path, help="real scale: TorchScript FID Inception (inception-2015-12-05.pt)")
    e.add_argument("--clip", type=Path, help="real scale: local CLIP model folder for the CLIP score")
    e.add_argument("--num", type=int, help="real scale: first N captions (default: the paper's, 30000 SD1.5,"
                   " 10000 SDXL)")
    e.add_argument("--batch-size", type=int, help="real scale: images per sampling batch (default 8)")
    e.add_argument("--eval-resolution", type=int, help="real scale: side the centre square is resized to before"
                   " the FID network (default: the official 256 for SD1.5, 512 for SDXL)")
    e.add_argument("--resize-filter", help="real scale: PIL filter of that resize: lanczos (the official"
                   " evaluation's, default), bicubic, bilinear, hamming, box or nearest")
    e.add_argument("--patch-fid", action=argparse.BooleanOptionalAction, help="real scale: also FID of the"
                   " centre 299x299 of the full-resolution images (default: on for SDXL, off for SD1.5)")
    q = sub.add_parser("table", help="reproduce the digits quality table (trains 6 students, ~46 min on 2 cores)")
    q.add_argument("--out", type=Path, default=Path("docs/quality"), help="folder for table.md, scores.json,"
                   " curves.png and the sample grids (default docs/quality)")
    q.add_argument("--runs", type=Path, default=Path("runs/quality"), help="folder of the students' training runs,"
                   " one subfolder per row (checkpoints, logs, generator/); a rerun continues them and skips those"
                   " already exported (default runs/quality)")
    q.add_argument("--guidance", type=_cfg_scale, default=None, help="the students' CFG scale, 0 or more (default: the"
                   " digits preset's)")
    q.add_argument("--max-steps", type=int, help="cap on each student's training steps, 1 or more: shorter runs,"
                   " for a smoke test")
    q.add_argument("--workers", type=int, default=2, help="students trained side by side, one process each, 1 or"
                   " more (default 2: on 2 cores two one-thread runs beat one two-thread run)")
    about = ("pre-encode real images (centre crop, the teacher's size) into fp16 VAE latent shards: the mean and"
             " std of each latent distribution, with the captions; resumable, parallel under torchrun")
    n = sub.add_parser("encode-latents", help=about, description=about + " (README: Data formats)",
                       prog="python -m dmd2_train encode-latents")
    n.add_argument("--teacher", type=Path, required=True, help="the teacher whose VAE encodes the images")
    n.add_argument("--images", type=Path, required=True, help="an image folder or WebDataset .tar shards")
    n.add_argument("--out", type=Path, required=True, help="latent folder; pass it to training as --real-images")
    n.add_argument("--batch-size", type=int, default=16, help="images per VAE pass")
    n.add_argument("--shard-size", type=int, default=1000, help="source images per shard")
    n.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    n.add_argument("--image-size", type=int, help="image side in pixels (default: the teacher's)")
    return p


def _distill(args: argparse.Namespace) -> None:
    from .config import (
        DISTILL_PRESETS,
        ConfigError,
        DistillConfig,
        build_config,
        given,
        parse_overrides,
        read_yaml,
        resumable,
    )

    preset = args.preset
    overrides = parse_overrides(args.overrides)
    flags: dict[str, Any] = {"teacher": args.teacher, "teacher_config": args.teacher_config, "out": args.out,
                             "max_steps": args.max_steps, "prompts": args.prompts, "real_images": args.real_images}
    layers = ([read_yaml(args.config)] if args.config else []) + [given(flags), overrides]
    saved = _saved_config(layers) if args.resume else None
    if saved is not None:  # the run's own settings, under what is given now
        if preset is not None:
            raise ConfigError(f"--preset {preset} with --resume: a resumed run keeps its own settings (its"
                              " checkpoint's meta.json); give what should change as key=value")
        layers = [saved, *layers]
    if preset is None:  # from the teacher's family, wherever the teacher was given (a YAML file too)
        teacher = next((layer["teacher"] for layer in reversed(layers) if "teacher" in layer), None)  # null: bundled
        if teacher is None:
            preset = "digits"
        else:
            from dmd2_serve.model.adapters import teacher_adapter

            from .single_file import converted_copy

            teacher = converted_copy(Path(teacher), _run_folder(layers)) or Path(teacher)  # a resume's, file gone
            preset = teacher_adapter(teacher).default_preset  # a folder's or a single file's family
    cfg = build_config(DistillConfig, DISTILL_PRESETS, preset, layers)
    if saved is not None and os.environ.get("RANK", "0") == "0":
        now = resumable(cfg)  # as the checkpoint keeps it: paths absolute, the bundled teacher null
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in saved if now.get(k) != saved[k]]
        said = f"; changed now: {', '.join(changed)}" if changed else ""
        print(f"resuming with the run's own settings (its newest checkpoint's meta.json){said}")
    from .loop import distill

    distill(cfg, resume=args.resume)


def _saved_config(layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The config a run saved in its newest checkpoint (the run folder: the last ``out`` given, else the
    default), its keys this version knows, without ``init_from`` (the checkpoint holds the weights); None
    when there is no checkpoint. ``sharding=fsdp2`` is kept for a distributed launch (torchrun sets
    ``WORLD_SIZE``) and left out of a plain one, which cannot shard: a checkpoint resumes on any number
    of processes."""
    from .checkpoint import META, checkpoint_dir, latest, read_meta
    from .config import DistillConfig
    from .run import RunError

    out = _run_folder(layers)
    found = latest(out)
    if found is None:
        if (near := _run_named_like(out)) is not None and os.environ.get("RANK", "0") == "0":
            print(f"warning: --resume, but {out} holds no checkpoint, so this run starts from the teacher; {near}"
                  f" holds checkpoints: did you mean --out {shlex.quote(str(near))}?", file=sys.stderr)
        return None
    try:
        saved = read_meta(found[1]).get("config")
    except (OSError, ValueError) as e:
        raise RunError(f"the checkpoint {found[1]} cannot be read ({type(e).__name__}: {str(e)[:200]}): its {META}"
                       f" is damaged; move it out of {checkpoint_dir(out)} and --resume again to continue from the"
                       " one before") from None
    if not isinstance(saved, dict):
        return None  # a checkpoint of a version that kept no config: the layers as given
    saved = {k: v for k, v in saved.items() if k in DistillConfig.model_fields and k != "init_from"}
    if saved.get("sharding") == "fsdp2" and "WORLD_SIZE" not in os.environ:
        print("the run was sharded (sharding=fsdp2) over the processes of a distributed launch; this plain one"
              " resumes it unsharded")
        del saved["sharding"]
    return saved


def _run_folder(layers: list[dict[str, Any]]) -> Path:
    """The run folder the config layers name: the last ``out`` given, else the default."""
    from .config import DistillConfig

    return Path(next((layer["out"] for layer in reversed(layers) if layer.get("out") is not None),
                     DistillConfig.model_fields["out"].default))


def _run_named_like(out: Path) -> Path | None:
    """A run folder beside ``out`` whose name is close to it and that holds checkpoints (a mistyped
    ``--out`` with ``--resume`` would otherwise start a new run after minutes of loading the teacher)."""
    from dmd2_serve.model.errors import close_names

    from .checkpoint import latest

    parent = out.absolute().parent
    try:
        names = [p.name for p in parent.iterdir() if p.name != out.name and p.is_dir()]
    except OSError:
        return None
    return next((out.parent / name for name in close_names(out.name, names, n=3) if latest(out.parent / name)), None)


def _teacher(args: argparse.Namespace) -> None:
    from .config import TEACHER_PRESETS, TeacherConfig, build_config, given, parse_overrides
    from .teacher import train_teacher

    cfg = build_config(TeacherConfig, TEACHER_PRESETS, args.preset,
                       [given({"out": args.out, "steps": args.steps}), parse_overrides(args.overrides)])
    print(f"teacher written to {train_teacher(cfg)}")


def _eval(args: argparse.Namespace) -> None:
    import json

    import torch

    from dmd2_serve.model.adapters import adapter, read_card

    from .evaluate import generator_sampler, score_digits, teacher_sampler
    from .loop import RunError

    folder = args.generator or args.teacher
    if folder is None or (args.generator and args.teacher):
        raise RunError("give exactly one of --generator DIR or --teacher DIR")
    real_scale = args.captions is not None
    card = read_card(folder)
    if args.teacher and card.is_generator:  # DDIM with CFG on a few-step generator scores nonsense
        raise RunError(f"'{folder}' is a distilled generator, not a teacher: score it with --generator {folder}")
    if not real_scale and not adapter(card.family).bundled_data:
        raise RunError("an SD-family model is scored at real scale: give --captions FILE --reference DIR"
                       " --inception FILE (and --clip DIR for the CLIP score)")
    if not real_scale and (unused := [flag for flag, name in REAL_SCALE_FLAGS if getattr(args, name) is not None]):
        raise RunError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the real-scale evaluation, which"
                       " runs with --captions FILE; the digits protocol has fixed settings: leave"
                       f" {'it' if len(unused) == 1 else 'them'} out, or give --captions")
    if args.batch_size is not None and args.batch_size < 1:
        raise RunError(f"--batch-size {args.batch_size}: give 1 or more images per sampling batch")
    if real_scale:  # settings checked before the model loads
        from .realscale import FidProtocol, score_real_scale

        if args.reference is None or args.inception is None:
            raise RunError("real-scale evaluation needs --reference DIR (real images) and --inception FILE"
                           " (the TorchScript FID Inception, inception-2015-12-05.pt)")
        protocol = FidProtocol.for_family(read_card(folder).family, args.eval_resolution, args.resize_filter,
                                          args.patch_fid, args.num)
    device = "cuda" if real_scale and torch.cuda.is_available() else "cpu"
    sample = (generator_sampler(folder, args.steps, device) if args.generator
              else teacher_sampler(folder, 50 if args.steps is None else args.steps, args.guidance, device))
    if not real_scale:
        print(json.dumps(score_digits(sample).as_dict(), indent=2))
        return
    scores = score_real_scale(sample, args.captions, args.reference, args.inception, args.clip, protocol,
                              args.batch_size or 8, device)
    print(json.dumps(scores.as_dict(), indent=2))


def _table(args: argparse.Namespace) -> None:
    from .config import DISTILL_PRESETS
    from .quality import build_table

    guidance = args.guidance if args.guidance is not None else DISTILL_PRESETS["digits"]["guidance_scale"]
    print(build_table(args.out, args.runs, guidance, max_steps=args.max_steps, workers=args.workers))


def _encode_latents(args: argparse.Namespace) -> None:
    from .latents import encode_latents, process_split

    report = encode_latents(args.teacher, args.images, args.out, args.batch_size, args.shard_size, args.workers,
                            args.image_size)
    rank, world, _ = process_split()
    print(report.line(rank, world))


def _saved(args: argparse.Namespace) -> str:
    """What an interrupted command leaves to continue from."""
    if args.command == "encode-latents":
        return "the shards written so far are kept; the same command goes on from there"
    if args.command != "distill":
        return "stopped"
    if args.out is None:  # the run folder came from --config
        return "the last checkpoint, if one was written, is saved; continue with --resume"
    from .checkpoint import list_checkpoints

    found = list_checkpoints(args.out)
    return (f"the checkpoint at step {found[-1][0]} is saved ({found[-1][1]}); continue with: python -m dmd2_train"
            f" --out {shlex.quote(str(args.out))} --resume" if found
            else "before the first checkpoint, so the run starts over next time")


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # distill is the default command, --help included
        argv.insert(0, "distill")
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides may sit between the flags (argparse takes only those given together)
    loose = [a for a in rest if OVERRIDE.match(a)] if hasattr(args, "overrides") else []
    if unknown := [a for a in rest if a not in loose]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see python -m dmd2_train {args.command} --help)")
    if loose:
        args.overrides = [*args.overrides, *loose]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing on the default path downloads
    # Growable allocator segments: far less fragmentation between the two networks' very different
    # passes (reserved memory stays near allocated). Set before CUDA starts; a user's value wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.getLogger("accelerate").setLevel(logging.WARNING)

    from dmd2_serve.model.adapters import ModelFolderError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .memory import MemoryOptionError
    from .realscale import EvalError
    from .run import RunError, storage_failure

    try:
        {"distill": _distill, "teacher": _teacher, "eval": _eval, "table": _table,
         "encode-latents": _encode_latents}[args.command](args)
    except (ConfigError, ModelFolderError, DataError, RunError, EvalError, CheckpointError, MemoryOptionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_saved(args)}", file=sys.stderr)
        return 130
    except BaseException as e:  # a full disk: an OSError, or DCP's CheckpointException (a BaseException) around one
        if (why := storage_failure(e)) is None:
            raise
        print(f"error: {why}. Free space (or use a folder on other storage); {_saved(args)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
