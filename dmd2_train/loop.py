"""The DMD2 training loop: one function, top to bottom.

Per step s (DMD2 Alg. 1, with the two time-scale rule; ``Trainer.train_step``):
    if s % ratio == 0:   generator step   loss_dm + w_G * loss_gan_G
    every step:          fake-score step  loss_denoise + w_D * loss_gan_D
Built on accelerate: ``accelerate launch`` / ``torchrun`` give data parallelism (DDP) with no
change; ``sharding=fsdp2`` shards both trained networks. Every random draw of step s comes from
generators seeded by (seed, s, rank), so a resumed run replays exactly the draws an uninterrupted
one makes; checkpoints are distributed and load on any number of processes.
"""

from __future__ import annotations

import json
import math
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dmd2_serve.model.adapters import (
    Backbone,
    ModelCard,
    adapter,
    is_single_file,
    load_backbone,
    load_schedule,
    load_unet,
    read_card,
)
from dmd2_serve.model.backends import FastPath
from dmd2_serve.model.errors import first_line
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_serve.terminal import leave_hung_up_terminal

from . import checkpoint as ckpt
from .config import BUNDLED_DIGITS_TEACHER, DistillConfig, resumable
from .export import export_generator
from .init_from import read_initial_weights
from .lora import lora_changes
from .memory import out_of_memory_message
from .previews import save_grid
from .progress import progress
from .run import (
    PromptEncoder,
    RunBatches,
    RunError,
    check_data_given,
    check_new_run,
    check_output_folder,
    check_resumable,
    data_path_problems,
    make_accelerator,
    make_data,
    remove_if_empty,
    set_aside_earlier_start,
    stream_plan,
)
from .single_file import teacher_folder
from .trainer import Trainer

# Re-exported for callers of the earlier layout (they lived here before run.py).
__all__ = ["RunError", "PromptEncoder", "check_output_folder", "distill", "prepare_run"]


@dataclass
class PreparedRun:
    """What ``prepare_run`` built: the teacher's facts, its adapter (with its schedule) and the trainer.

    ``teacher`` is the teacher's diffusers folder: ``cfg.teacher``, or ``<out>/teacher`` converted
    from a single-file checkpoint.
    """

    card: ModelCard
    backbone: Backbone
    trainer: Trainer
    teacher: Path
    batches: RunBatches  # the trainer's conditioning and real data (a streamed source's position and counts)


def prepare_run(cfg: DistillConfig, accelerator: Any, initial_weights: bool = True) -> PreparedRun:
    """The teacher, its adapter, the data and the trainer, on the accelerator's device; the trainer starts
    from ``init_from``'s weights unless ``initial_weights`` is False (a resume: the checkpoint holds them)."""
    if cfg.teacher is not None and is_single_file(cfg.teacher) and (problems := data_path_problems(cfg)):
        raise RunError("; and ".join(problems))  # before the conversion's minutes (the teacher's checks are in it)
    teacher = teacher_folder(cfg.teacher, cfg.teacher_config, cfg.out, accelerator)  # a single file: converted
    card = read_card(teacher)
    if card.is_generator:  # a few-step student is no score model: DMD2 against it trains on nonsense
        raise RunError(f"--teacher '{cfg.teacher}' is a distilled generator, not a teacher: give the diffusion model"
                       f" it was distilled from; to start from this generator's weights (stage 2), add"
                       f" init_from={cfg.teacher}")
    load_schedule(teacher, card)  # the teacher's own problems first (cheap), then the inputs, then minutes of loading
    check_data_given(cfg, bool(adapter(card.family).bundled_data))
    backbone = load_backbone(teacher, card, cfg.image_size).to(accelerator.device)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cuda":
        backbone.to(torch.bfloat16)  # frozen text encoders and VAE: bf16 halves them
    data = make_data(cfg, backbone)
    # the known texts (the bundled digits: 14,470 captions, 100 distinct) encoded once, up front
    encoder = PromptEncoder(backbone, data.texts() + list(cfg.preview_prompts), limit=8192)
    batches = RunBatches(data, encoder, backbone, stream_plan(cfg, accelerator))
    init = read_initial_weights(cfg.init_from, cfg) if cfg.init_from is not None and initial_weights else None
    trainer = Trainer(cfg, accelerator, load_unet(teacher), backbone.sample_shape, backbone.schedule, batches,
                      backbone.unconditional(1), backbone.bottleneck, init)
    return PreparedRun(card, backbone, trainer, teacher, batches)


def kept(out: Path, found: list[tuple[int, Path]] | None = None) -> str:
    """What a run that stops on an error leaves: its newest checkpoint, if any (``found``: the run's
    checkpoints, when the caller has listed them already)."""
    last = ckpt.latest(out) if found is None else (found[-1] if found else None)
    return f"the last checkpoint ({last[1]}) is intact" if last else "no checkpoint was written yet"


def diverged_message(cfg: DistillConfig, broken: list[str], bad_losses: list[str], step: int,
                     resumed_at: int | None = None) -> str:
    """One message for a run that went NaN or infinite: what broke, what is kept, and what helps.
    ``resumed_at``: the step this start resumed from (a checkpoint whose weights are finite can still
    be too far gone: then the one before it is named)."""
    networks = [name for name in broken if name != "losses"]
    what = []
    if networks:
        what.append(f"the weights of the {' and '.join(networks)} network{'s' if len(networks) > 1 else ''}"
                    " hold NaN or infinite values")
    if "losses" in broken:
        what.append(f"its losses are NaN or infinite ({', '.join(bad_losses) or 'on another process'})")
    helps = [f"lower learning rates (now lr_generator={cfg.lr_generator:g} lr_fake={cfg.lr_fake:g})"]
    if cfg.mixed_precision == "fp16":
        helps.append("mixed_precision=bf16 (fp16's range overflows more easily)")
    if cfg.grad_clip > 1.0:
        helps.append(f"grad_clip=1.0 (now {cfg.grad_clip:g})")
    if cfg.gan and cfg.gan_weight_generator > 0:
        helps.append(f"a smaller gan_weight_generator (now {cfg.gan_weight_generator:g})")
    kept_now = ckpt.list_checkpoints(cfg.out)
    if resumed_at is not None and kept_now and kept_now[-1][0] == resumed_at and step - resumed_at <= cfg.log_every:
        # it broke again at once: the newest checkpoint is finite but already on its way
        earlier = [path for s, path in kept_now if s < resumed_at]
        where = (f"move {kept_now[-1][1]} out of {ckpt.checkpoint_dir(cfg.out)} and --resume from {earlier[-1].name}"
                 if earlier else "start a new run")
        return (f"training diverged again by step {step}, right after resuming from {kept_now[-1][1].name}: "
                f"{'; '.join(what)}; that checkpoint's weights are finite but already too far gone; {where}, with"
                f" {'; '.join(helps)}")
    again = "the same command with --resume and" if kept_now else "a new run with"
    return (f"training diverged by step {step}: {'; '.join(what)}, so no checkpoint was written from them;"
            f" {kept(cfg.out, kept_now)}; try {again} {'; '.join(helps)}")


def distill(cfg: DistillConfig, resume: bool = False, on_step: Callable[[int], None] | None = None) -> Path:
    """Distil ``cfg.teacher`` into a few-step generator; returns the exported folder.

    ``on_step(step)`` is called after each finished step (tests use it to interrupt a run).
    """
    # 1. Set-up: devices, precision, folders.
    accelerator = make_accelerator(cfg)
    made = next((p for p in [*reversed(cfg.out.absolute().parents), cfg.out.absolute()] if not p.exists()), None)
    if accelerator.is_main_process:
        (check_resumable if resume else check_new_run)(cfg.out)
        check_output_folder(cfg.out)
    accelerator.wait_for_everyone()
    device = accelerator.device

    # 2. The teacher, its adapter, the data and the trained state.
    found = ckpt.latest(cfg.out) if resume else None
    try:
        run = prepare_run(cfg, accelerator, initial_weights=found is None)
    except BaseException:
        if made is not None and accelerator.is_main_process:
            remove_if_empty(made)  # a refused start leaves no empty folder it made (a converted teacher stays)
        raise
    backbone, trainer = run.backbone, run.trainer

    # 3. Resume.
    start = 0
    if resume:
        if found is None:
            accelerator.print(f"no checkpoint in {ckpt.checkpoint_dir(cfg.out)}; starting from the teacher")
        else:
            try:
                meta = ckpt.read_meta(found[1])
                saved = meta.get("config")
                if isinstance(saved, dict) and (changed := lora_changes(saved, cfg.model_dump())):
                    raise RunError(
                        f"the checkpoint {found[1]} holds adapters trained with other LoRA settings"
                        f" ({', '.join(changed)}); a resume keeps them: leave those settings out, or start a new"
                        f" --out with init_from={cfg.out} (the same lora_rank, lora_fake and lora_targets; another"
                        " lora_alpha is carried over)")
                try:
                    start = trainer.load(found[1])
                except RuntimeError as e:  # torch.load of a shard cut short inside its data
                    if not any(m in str(e) for m in ("PytorchStreamReader", "zip archive", "central directory")):
                        raise
                    raise EOFError(first_line(e)) from None
            except RunError:
                raise
            except (EOFError, OSError, pickle.UnpicklingError, json.JSONDecodeError) as e:
                before = [p for step, p in ckpt.list_checkpoints(cfg.out) if step < found[0]]
                then = f"from {before[-1].name}" if before else "from the teacher (it is the only one)"
                raise RunError(
                    f"the checkpoint {found[1]} cannot be read ({type(e).__name__}{': ' if str(e) else ''}"
                    f"{str(e)[:200]}): it is damaged or"
                    f" was cut off while being written; move it out of {ckpt.checkpoint_dir(cfg.out)} and --resume"
                    f" again to continue {then}"
                ) from None
            except (RuntimeError, ValueError, KeyError) as e:
                raise RunError(
                    f"the checkpoint {found[1]} does not fit this configuration (teacher, gan, ... changed?):"
                    f" {first_line(e)}; resume without the settings changed now (a resume starts from the run's"
                    " own, kept in its meta.json under 'config'), or use a new --out"
                ) from None
            run.batches.restore_data(meta.get("data"))  # the real-data stream's position
            accelerator.print(f"resumed from step {start}" + (f" (init_from={cfg.init_from} not read: the checkpoint"
                                                               " holds the weights)" if cfg.init_from else ""))
    if start >= cfg.max_steps:
        accelerator.print(f"the run is already at step {start} >= max_steps {cfg.max_steps}")
    if start == 0 and accelerator.is_main_process and (aside := set_aside_earlier_start(cfg.out)):
        accelerator.print(f"an earlier start that wrote no checkpoint left logs or previews; moved to {aside}")

    def save(step: int) -> None:
        data = run.batches.data_state(accelerator)
        trainer.save(cfg.out, step, {"config": resumable(cfg)} | ({"data": data} if data else {}))

    def preview(step: int) -> None:
        """Every process renders its share of the prompts (sharded nets need all of them), no CUDA
        graphs; the main process writes the grid."""
        prompts, world, rank = list(cfg.preview_prompts), accelerator.num_processes, accelerator.process_index
        share = -(-len(prompts) // world)
        mine = (prompts[rank * share:(rank + 1) * share] + prompts[-1:] * share)[:share]  # padded: equal passes
        with trainer.served() as module, accelerator.autocast():
            pipe = FewStepPipeline(module, backbone, cfg.timesteps)
            pipe.fast = FastPath(cuda_graphs=False)
            images = pipe(mine, list(range(rank * share, rank * share + share))).cpu()
        gathered = accelerator.gather(images.to(device)) if world > 1 else images
        if accelerator.is_main_process:
            save_grid(gathered.cpu()[: len(prompts)], cfg.out / "previews" / f"step_{step:07d}.png")

    # 4. The loop.
    stop = {"signal": None}

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:  # a closed terminal or SSH session: the run saves without writing to it
            leave_hung_up_terminal()
        stop.update(signal=signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    accelerator.init_trackers("dmd2", config={k: str(v) for k, v in cfg.model_dump().items()})
    bar = progress(cfg.max_steps, start, "dmd2", "step", disable=not accelerator.is_main_process)
    step, since, since_step = start, time.perf_counter(), start
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes

    def stopping(step: int) -> bool:
        """Whether every process stops after ``step``. A signal may reach one process only (one
        node of several evicted), and the final checkpoint is collective: with several processes
        they agree (an all-reduce of the flag) at log boundaries, where the loop syncs anyway."""
        if accelerator.num_processes == 1:
            return stop["signal"] is not None
        if step % cfg.log_every and step != cfg.max_steps:
            return False
        flag = torch.tensor([0.0 if stop["signal"] is None else 1.0], device=device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    try:
        while step < cfg.max_steps:
            try:
                trainer.train_step(step)
            except torch.OutOfMemoryError:
                raise RunError(out_of_memory_message(cfg, backbone.title, accelerator.num_processes, step,
                                                     kept(cfg.out))) from None
            step += 1
            bar.update(1)
            logging_now = step % cfg.log_every == 0 or step == cfg.max_steps
            bad_losses: list[str] = []
            if logging_now:
                logs = trainer.flush_logs()  # the one host synchronisation of the window
                # in fp32 and bf16 a loss that is not finite is a network's output gone NaN or infinite
                # (fp16's loss scaler skips such steps and goes on)
                bad_losses = [k for k, v in logs.items() if k.startswith("loss/") and not math.isfinite(v)
                              and accelerator.mixed_precision != "fp16"]
                now = time.perf_counter()
                seconds = (now - since) / max(1, step - since_step)
                since, since_step = now, step
                logs |= {"perf/seconds_per_step": seconds, "perf/samples_per_second": samples_per_step / seconds,
                         **trainer.learning_rates(), **run.batches.data_logs(accelerator)}
                if device.type == "cuda":
                    logs |= {"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                             "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
                accelerator.log(logs, step=step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
            stop_now = stopping(step)
            saving = step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop_now
            previewing = step % cfg.preview_every == 0 or step == cfg.max_steps
            if (saving or logging_now or previewing) and (broken := trainer.diverged(bool(bad_losses))):
                raise RunError(diverged_message(cfg, broken, bad_losses, step, resumed_at=start if resume else None))
            if saving:
                save(step)
            if previewing:
                preview(step)
            if on_step is not None:
                on_step(step)
            if stop_now:
                raise KeyboardInterrupt
    finally:
        bar.close()
        run.batches.close()
        for s, h in previous.items():
            signal.signal(s, h)

    # 5. Export: every process takes part in gathering the weights; the main one writes.
    out = cfg.out / "generator"
    weights = trainer.served_state_dict()
    if accelerator.is_main_process:
        bundled = cfg.teacher.resolve() == BUNDLED_DIGITS_TEACHER.resolve()
        export_generator(weights, trainer.gen_module.config, backbone, run.teacher, out, cfg.timesteps,
                         extra={"teacher": "bundled:digits-teacher" if bundled else str(cfg.teacher),
                                "steps_trained": step, "updates": trainer.updates,
                                "world_size": accelerator.num_processes,
                                "guidance_scale": cfg.guidance_scale, "ema_decay": cfg.ema_decay},
                         lora=trainer.lora)
    accelerator.wait_for_everyone()
    accelerator.print(f"generator written to {out}")
    accelerator.end_training()  # closes the trackers and the process group: last
    return out
