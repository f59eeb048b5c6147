"""Typed configuration: pydantic models, the preset table, YAML files and key=value overrides."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmd2_serve.model.errors import close_names, first_line

# The bundled digits teacher, shipped inside the package.
BUNDLED_DIGITS_TEACHER = Path(__file__).parent / "assets" / "digits-teacher"
# ... and its noise schedule (dmd2_train/teacher.py: BETAS), the teacher command's default
BUNDLED_BETA_SCHEDULE = "scaled_linear"


class ConfigError(ValueError):
    """A configuration the user wrote that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf and nan refused


class DistillConfig(_Strict):
    """Everything a DMD2 distillation run needs. Defaults are the paper's SD1.5 numbers."""

    # what to distil, where to write
    teacher: Path = Field(BUNDLED_DIGITS_TEACHER, description="teacher folder (diffusers format or bundled) or a"
                          " single-file .safetensors checkpoint (converted once into <out>/teacher)")
    teacher_config: Path | None = Field(None, description="for a single-file teacher: the model's diffusers config"
                                        " folder (model_index.json, component configs, tokenizers; no weights)")
    out: Path = Field(Path("runs/dmd2"), description="run folder: checkpoints, logs, previews, generator/")
    image_size: int | None = Field(None, gt=0, description="image side in pixels (default: the teacher's)")
    init_from: Path | None = Field(None, description="start from an earlier run's weights (run, checkpoint or"
                                   " generator folder): weights only, fresh optimisers and step count")

    # data
    prompts: Path | None = Field(None, description="text file (one prompt a line) or .jsonl with 'text'")
    real_images: Path | None = Field(None, description="real images for the GAN, streamed: an image folder"
                                     " (recursive; metadata.jsonl/.csv or .txt captions), WebDataset .tar shards"
                                     " (a folder, a file or a glob) or an encode-latents folder (README: Data formats)")
    data_workers: int = Field(2, ge=0, description="DataLoader processes reading real_images (0: in the training process)")
    data_prefetch: int = Field(2, ge=1, description="batches each data worker prepares ahead")

    # generator and schedule
    timesteps: list[int] = Field([999, 749, 499, 249], min_length=1, description="the fixed few-step schedule")
    backward_simulation: bool = True

    # distribution matching
    guidance_scale: float = Field(1.75, ge=0, description="CFG scale on the real score")
    dm_t_min: float = Field(0.02, ge=0, le=1)
    dm_t_max: float = Field(0.98, ge=0, le=1)

    # GAN on the fake score's bottleneck
    gan: bool = True
    gan_weight_generator: float = Field(1e-3, ge=0)
    gan_weight_discriminator: float = Field(1e-2, ge=0)
    gan_t_max: float = Field(1.0, gt=0, le=1, description="the GAN's noise levels t in [0, gan_t_max T) (the official"
                             " code's diffusion_gan_max_timestep / T); below 1 the discriminator judges G's samples in"
                             " a pass of their own at those levels")

    # two time-scale update rule and optimisation
    ratio: int = Field(10, ge=1, description="fake-score updates per generator update")
    lr_generator: float = Field(5e-7, gt=0)
    lr_fake: float = Field(5e-7, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the generator per generator update; 0: off; exported when on")
    warmup_steps: int = Field(500, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    batch_size: int = Field(2, ge=1, description="per process")
    max_steps: int = Field(20000, ge=1)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches of batch_size per optimiser step")

    # memory and scale (README: training-memory table)
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw (fused on CUDA) or torchao's 8-bit AdamW")
    offload_optimizer: bool = Field(False, description="keep the idle network's optimiser state in pinned host memory")
    free_grads: bool = Field(True, description="free each network's gradients right after its step")
    sharding: Literal["ddp", "fsdp2"] = Field("ddp", description="ddp: replicate per GPU; fsdp2: shard both networks")

    # LoRA (dmd2_train/lora.py): the generator as a low-rank adapter on the frozen teacher
    lora_rank: int = Field(0, ge=0, description="LoRA rank of the generator; 0: train every weight")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (scale alpha/rank); default: lora_rank")
    lora_fake: bool = Field(False, description="train the fake score as a LoRA of the same rank too")
    # diffusers' LoRA training scripts' default (train_text_to_image_lora.py, dreambooth LoRA)
    lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                    description="module names that get adapters (peft target_modules)")

    # logging and checkpoints
    log_every: int = Field(10, ge=1)
    preview_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_with: list[Literal["tensorboard", "wandb"]] = Field(["tensorboard"], description="experiment trackers")
    preview_prompts: list[str] = Field(default_factory=lambda: ["a photo of a cat", "a mountain lake at dawn"],
                                       min_length=1)

    @field_validator("teacher", mode="before")
    @classmethod
    def _bundled_when_null(cls, v: object) -> object:
        return BUNDLED_DIGITS_TEACHER if v is None else v  # teacher=null clears a YAML file's teacher

    @field_validator("timesteps")
    @classmethod
    def _decreasing(cls, v: list[int]) -> list[int]:
        if any(t < 0 or t > 999 for t in v) or any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("timesteps must be strictly decreasing integers in [0, 999], e.g. [999, 749, 499, 249]")
        return v

    @model_validator(mode="after")
    def _t_range(self) -> DistillConfig:
        if self.dm_t_min >= self.dm_t_max:
            raise ValueError("dm_t_min must be below dm_t_max")
        if self.offload_optimizer and self.sharding == "fsdp2":
            raise ValueError("offload_optimizer works with sharding=ddp; with fsdp2 each GPU already holds"
                             " only its shard of the optimiser state: add offload_optimizer=false (the sdxl"
                             " preset turns it on)")
        if self.lora_fake and not self.lora_rank:
            raise ValueError("lora_fake=true needs lora_rank > 0 (the rank of both adapters), e.g. lora_rank=64")
        return self


class TeacherConfig(_Strict):
    """Plain diffusion training of the small bundled digits teacher."""

    out: Path = BUNDLED_DIGITS_TEACHER
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    caption_dropout: float = Field(0.1, ge=0, le=1, description="for classifier-free guidance")
    ema_decay: float = Field(0.999, ge=0, le=1)
    seed: int = 0
    beta_schedule: Literal["linear", "scaled_linear"] = Field(
        BUNDLED_BETA_SCHEDULE, description="scaled_linear: Stable Diffusion's 0.00085 .. 0.012 (the bundled teacher's);"
        " linear: DDPM's 1e-4 .. 0.02 (sqrt(abar) at t=999 0.006 instead of 0.068; the bundled teacher's until"
        " 2026-12-05)")


DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    # The bundled default: minutes on a 2-core CPU (README: "Quality on the digits" has the numbers).
    # Teacher on Stable Diffusion's scaled-linear betas (since 2026-12-05; sqrt(abar) 0.068 at
    # t=999) and the paper's schedule (999, 749, 499, 249). On the earlier linear-beta teacher
    # (sqrt(abar) 0.006 at 999) a first step from noise amplified the UNet's error 160-fold; the
    # best schedule there was (999, 400, 200, 100), whose untrained sampler (FD 2.21) drew its
    # variety from that noise and the student plateaued level with it (2.14-2.24 from 5,000 steps).
    # Ratio 10 (the paper's SD1.5 value). Lower ratios are faster early and then overshoot the real
    # digits' diversity: on this teacher ratio 5 scored 2.33 at 3,000 steps, 2.24 at 5,000, 2.43 at
    # 6,000 (diversity 1.02); ratio 1 2.59 at 1,000, then 2.6-2.7 (diversity 1.06). From step
    # 6,000 of a run on this teacher, 3,000 steps each (FD of the EMA at 7,500 / 8,000 / 9,000):
    # these settings 2.04 / 2.01 / 2.05; EMA 0.995 2.11 / 2.06 / 2.03; GAN weights 10x (3e-2 /
    # 1e-1) 2.06 / 2.03 / 2.07; 10x with EMA 0.995 2.12 / 2.07 / 2.05; 30x (1e-1 / 3e-1) 2.10 /
    # 2.08 / 2.03 with diversity reaching real's (1.00). All plateau at 2.0-2.05.
    # Guidance above 1 worsens the teacher itself (50 DDIM steps: FD 1.75 at 1, 1.91 at 1.25).
    # EMA 0.99: the raw generator's FD swings by up to 1.4 between checkpoints 100 steps apart; the
    # EMA's by about 0.1.
    "digits": dict(
        teacher=BUNDLED_DIGITS_TEACHER, timesteps=[999, 749, 499, 249], guidance_scale=1.0, ratio=10,
        lr_generator=2e-5, lr_fake=2e-4, ema_decay=0.99,
        warmup_steps=50, batch_size=32, max_steps=1000, gan_weight_generator=3e-3,
        gan_weight_discriminator=1e-2, log_every=10, preview_every=200, checkpoint_every=200,
        preview_prompts=[f"a handwritten {d}" for d in range(10)],
    ),
    # The paper's recipes (DMD2, Yin et al. 2024, and the authors' configs): pass --teacher with the model
    # folder. The image size is the teacher's own (512 for SD1.5, 768 for SD2 768-v, 1024 for SDXL).
    # SD1.5, one step, two stages. Stage 1: no GAN, lr 1e-5, about 39k iterations (paper FID 9.28).
    "sd15": dict(timesteps=[999], gan=False, guidance_scale=1.75, ratio=10, lr_generator=1e-5, lr_fake=1e-5,
                 max_steps=40000),
    # Stage 2: from stage 1 (init_from=RUN), GAN on at 1e-3 / 1e-2, lr 5e-7, about 2k iterations (FID 8.35).
    "sd15-stage2": dict(timesteps=[999], gan=True, guidance_scale=1.75, ratio=10, lr_generator=5e-7,
                        lr_fake=5e-7, gan_weight_generator=1e-3, gan_weight_discriminator=1e-2, max_steps=2000),
    # SD1.5 with the 4-step schedule, in one stage the way the paper trains SDXL (GAN on from the
    # start, lr 5e-7), with SD1.5's guidance, ratio and GAN weights.
    "sd15-4step": dict(timesteps=[999, 749, 499, 249], gan=True, guidance_scale=1.75, ratio=10,
                       lr_generator=5e-7, lr_fake=5e-7, gan_weight_generator=1e-3, gan_weight_discriminator=1e-2),
    # SDXL, four steps, one stage (paper FID 19.32 on COCO-10k).
    "sdxl": dict(timesteps=[999, 749, 499, 249], guidance_scale=8.0, ratio=5, lr_generator=5e-7, lr_fake=5e-7,
                 gan_weight_generator=5e-3, gan_weight_discriminator=1e-2,
                 # one 80 GB GPU: see the README's training-memory table
                 gradient_checkpointing=True, offload_optimizer=True),
}

TEACHER_PRESETS: dict[str, dict[str, Any]] = {"digits": {}}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["ratio=5", "timesteps=[999,499]"]`` -> dict, values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}' is not key=value (for example ratio=5)")
        if not value.strip():
            raise ConfigError(f"override '{pair}' has no value: write {key}=VALUE, or leave the key out for its"
                              " default")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            hint = f"""{key}='"a #1"' or {key}='["a #1", "b"]'"""
            raise ConfigError(f"override '{pair}' is not a valid YAML value ({first_line(e)}): quote it (# starts a"
                              f" comment, * an alias, [ a list), e.g. {hint}") from None
    return out


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line, where (1-based, as an editor counts) and what, without its echo of the
    text: ``line 3, column 4: expected ',' or ']', but got ':' (while parsing a flow sequence that started
    at line 2, column 10)``."""
    if isinstance(e, yaml.reader.ReaderError):  # a control character, e.g. NUL: where, as a 1-based offset
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return f"character {e.position + 1}: unacceptable character {what} ({e.reason})"
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return str(e)
    mark = e.problem_mark
    said = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    if e.context and e.context_mark is not None and e.context_mark.line != mark.line:
        said += f" ({e.context} that started at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
    return said


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a dict, with a clear error for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' is a folder: give the YAML file itself" if path.is_dir()
                          else f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}): give a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_problem(e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of key: value, not {type(data).__name__}")
    return data


def given(flags: dict[str, Any]) -> dict[str, Any]:
    """The CLI flags that were given (argparse's None means the flag was left out)."""
    return {k: v for k, v in flags.items() if v is not None}


RUN_PATHS = ("teacher", "teacher_config", "out", "init_from", "prompts", "real_images")


def resumable(cfg: DistillConfig) -> dict[str, Any]:
    """The config as a checkpoint keeps it (``--resume`` starts from it): JSON, its paths absolute (a
    resume may start in another folder), the bundled teacher as null (the installed package's, wherever
    that is by then)."""
    data = cfg.model_dump(mode="json")
    for key in RUN_PATHS:
        if data.get(key) is not None:
            data[key] = str(Path(data[key]).absolute())
    if cfg.teacher.resolve() == BUNDLED_DIGITS_TEACHER.resolve():
        data["teacher"] = None
    return data


def build_config(model: type[_Strict], presets: dict[str, dict[str, Any]], preset: str | None,
                 layers: list[dict[str, Any]]) -> Any:
    """Preset, then each layer (file, CLI flags, overrides) on top; validate once at the end. A layer's
    None is a value (``init_from=null`` clears a YAML file's); pass CLI flags through :func:`given`."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown preset '{preset}'; choose one of: {', '.join(presets)}")
        values.update(presets[preset])
    for layer in layers:
        values.update(layer)
    try:
        return model(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, known=model.model_fields)) from None


def format_validation_error(e: ValidationError, known: Collection[str] = ()) -> str:
    """One line per bad key: 'unknown key foo' (with the ``known`` key it most looks like, if one does) or
    'key bar: <why>'."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if not key:  # a check across keys: its message names them (the input would be the whole config)
            lines.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            close = close_names(key, known)
            lines.append(f"unknown config key '{key}'" + (f" (did you mean {close[0]}?)" if close else ""))
        else:
            lines.append(f"config key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
