"""The digits quality table: teacher vs DMD2 student vs ablations, reproduced by one CPU command.

    python -m dmd2_train table --out docs/quality

Rows: real digits (sanity), the teacher with 50 and 4 DDIM steps (with guidance), the 4-step
student before training (the teacher's weights through the few-step sampler: what distillation
starts from), the DMD2 student at 4 steps (1,000 preset steps and 3,000) and 1 step, and the
student without the GAN, without the two time-scale rule (ratio 1) and without backward
simulation (each 1,000 steps, against the 1,000-step student). Writes ``table.md``,
``scores.json``, ``curves.png`` (losses, and the Frechet distance of the weights each checkpoint
would export, the EMA when on, over the training of ``CURVES_ROW``, the 3,000-step student) and
one sample grid per row; the shipped generator is ``RUNS/student-4-3k/generator``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import BUNDLED_DIGITS_TEACHER, DISTILL_PRESETS, DistillConfig
from .evaluate import (
    DigitsScores,
    Sampler,
    generator_sampler,
    protocol_prompts,
    real_sampler,
    score_digits,
    teacher_sampler,
)
from .previews import save_grid


@dataclass
class Row:
    name: str
    key: str
    distill: dict[str, Any] | None = None  # overrides of the digits preset; None: not a student


STUDENT_ROWS = [
    Row("DMD2 student, 4 steps", "student-4", {}),
    Row("DMD2 student, 4 steps, 3,000 steps (the shipped generator)", "student-4-3k", {"max_steps": 3000}),
    Row("DMD2 student, 1 step", "student-1", {"timesteps": [999]}),
    Row("ablation: no GAN", "no-gan", {"gan": False}),
    Row("ablation: no two time-scale rule (ratio 1)", "ratio-1", {"ratio": 1}),
    Row("ablation: no backward simulation", "no-backsim", {"backward_simulation": False}),
]
CURVES_ROW = "student-4-3k"  # the run whose losses and FD over training make curves.png


def curve_points(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Loss scalars from the run's TensorBoard logs and the FD of every kept checkpoint's exported weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run / "logs").rglob("events.out.tfevents*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("loss/"):
                series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    from dmd2_serve.model.pipeline import FewStepPipeline

    from . import checkpoint as ckpt

    pipe = FewStepPipeline.from_folder(run / "generator")
    fd = []
    for step, path in ckpt.list_checkpoints(run):
        state = ckpt.read_checkpoint(path)
        pipe.unet.load_state_dict(state.get("generator_ema", state["generator"]))  # the weights it exports
        fd.append((step, score_digits(lambda p, s: pipe(p, s) * 2 - 1).frechet_distance))
    series["frechet_distance"] = fd
    return series


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [k for k in series if k.startswith("loss/")]
    fig, axes = plt.subplots(1, len(losses) + 1, figsize=(4 * (len(losses) + 1), 3.2))
    for ax, key in zip(axes, [*losses, "frechet_distance"]):
        steps, values = zip(*sorted(series[key])) if series[key] else ((), ())
        ax.plot(steps, values, marker="o" if key == "frechet_distance" else None, lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(rows: list[tuple[str, DigitsScores]]) -> str:
    lines = ["| row | prompt accuracy | Frechet distance | diversity (real = 1.00) | ms / image |",
             "|---|---|---|---|---|"]
    for name, s in rows:
        lines.append(f"| {name} | {s.prompt_accuracy:.1%} | {s.frechet_distance:.2f} | {s.diversity:.2f} | {s.ms_per_image:.2f} |")
    return "\n".join(lines)


def sample_grid(sample: Sampler, path: Path) -> None:
    """4 samples of each digit, a row per digit."""
    prompts, seeds, _, labels = protocol_prompts()
    order = [i for d in range(10) for i in torch.nonzero(labels == d).flatten()[:4].tolist()]
    order = sorted(order, key=lambda i: (int(labels[i]), i))
    images = sample([prompts[i] for i in order], [seeds[i] for i in order])
    save_grid((images.float().clamp(-1, 1) + 1) / 2, path, columns=4)


def untrained_student_sampler(teacher: Path, timesteps: list[int]) -> Sampler:
    """Step 0 of distillation: the teacher's own weights run through the few-step sampler."""
    from dmd2_serve.model.adapters import load_backbone, load_unet
    from dmd2_serve.model.pipeline import FewStepPipeline

    unet = load_unet(teacher).eval().requires_grad_(False)
    pipe = FewStepPipeline(unet, load_backbone(teacher), timesteps, name="step0")
    return lambda prompts, seeds: pipe(prompts, seeds) * 2 - 1


def build_table(out: Path, runs: Path, guidance: float, teacher_guidances: tuple[float, ...] = (1.0, 2.0),
                max_steps: int | None = None) -> str:
    """Train the students, score every row, write the table and figures; returns the Markdown.

    ``guidance`` is the students' CFG scale on the real score; the teacher rows are sampled at
    each of ``teacher_guidances``.
    """
    from .loop import distill

    out.mkdir(parents=True, exist_ok=True)
    teacher = BUNDLED_DIGITS_TEACHER
    samplers: list[tuple[str, str, Sampler]] = [("real digits (train split)", "real", real_sampler())]
    for steps in (50, 4):
        for g in teacher_guidances:
            samplers.append((f"teacher, {steps} DDIM steps, guidance {g:g}", f"teacher-{steps}-g{g:g}",
                             teacher_sampler(teacher, steps, g)))
    samplers.append(("DMD2 student before training (teacher weights, the 4-step sampler)", "student-4-step0",
                     untrained_student_sampler(teacher, DISTILL_PRESETS["digits"]["timesteps"])))
    for row in STUDENT_ROWS:  # students distilled with guidance ``guidance``
        values = {**DISTILL_PRESETS["digits"], "out": runs / row.key, "checkpoint_every": 100,
                  "keep_checkpoints": 1000, "guidance_scale": guidance, **(row.distill or {})}
        if max_steps is not None:
            values["max_steps"] = max_steps
        cfg = DistillConfig(**values)
        if not (cfg.out / "generator" / "dmd2.json").is_file():
            distill(cfg)
        samplers.append((row.name, row.key, generator_sampler(cfg.out / "generator")))
    scored = []
    for name, key, sample in samplers:
        scored.append((name, score_digits(sample)))
        sample_grid(sample, out / f"samples-{key}.png")
    text = markdown(scored)
    (out / "table.md").write_text(text + "\n")
    (out / "scores.json").write_text(json.dumps({k: s.as_dict() for (_, k, _), (_, s) in zip(samplers, scored)}, indent=2))
    plot_curves(curve_points(runs / CURVES_ROW), out / "curves.png")
    return text
