"""The paper's two-stage recipe: stage 2 starts from stage 1's weights (init_from), fresh otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dmd2_train import checkpoint as ckpt
from dmd2_train.config import DISTILL_PRESETS, DistillConfig, build_config, parse_overrides
from dmd2_train.init_from import read_initial_weights
from dmd2_train.loop import distill
from dmd2_train.run import RunError


def stage(preset: str, teacher: Path, out: Path, **extra) -> Path:
    # the preset's recipe, then the tiny-run sizes (steps, batch, lr) on top
    values = DISTILL_PRESETS[preset] | tiny_run_overrides(**extra) | {"teacher": teacher, "out": out}
    return distill(DistillConfig(**values))


def test_two_stage_presets_are_the_papers():
    one = build_config(DistillConfig, DISTILL_PRESETS, "sd15", [])
    two = build_config(DistillConfig, DISTILL_PRESETS, "sd15-stage2", [parse_overrides(["init_from=runs/s1"])])
    four = build_config(DistillConfig, DISTILL_PRESETS, "sd15-4step", [])
    assert (one.timesteps, one.gan, one.lr_generator, one.guidance_scale, one.ratio) == ([999], False, 1e-5, 1.75, 10)
    assert (two.timesteps, two.gan, two.lr_generator, two.gan_weight_generator) == ([999], True, 5e-7, 1e-3)
    assert two.init_from == Path("runs/s1")
    assert four.timesteps == [999, 749, 499, 249] and four.gan


def test_stage_two_starts_from_stage_one(digits_teacher: Path, tmp_path: Path):
    # stage 1: no GAN, one step, an EMA (stage 2 must start from the weights stage 1 served)
    stage("sd15", digits_teacher, tmp_path / "s1", max_steps=3, ratio=1, timesteps=[999], lr_generator=1e-3,
          ema_decay=0.5, preview_every=100)
    weights = read_initial_weights(tmp_path / "s1")
    last = ckpt.read_checkpoint(ckpt.list_checkpoints(tmp_path / "s1")[-1][1])
    assert all(torch.equal(weights["generator"][k], v) for k, v in last["generator_ema"].items())
    assert not any(k.startswith("head.") for k in weights["fake"])  # stage 1 had no GAN head

    # stage 2: GAN on, weights from stage 1 (its run folder), fresh step count and optimisers
    seen = {}

    def first_step(step: int) -> None:
        seen.setdefault("step", step)

    cfg = DistillConfig(**DISTILL_PRESETS["sd15-stage2"] | tiny_run_overrides(max_steps=2, timesteps=[999],
                                                                              preview_every=100)
                        | {"teacher": digits_teacher, "out": tmp_path / "s2", "init_from": tmp_path / "s1"})
    from accelerate import Accelerator

    from dmd2_train.loop import prepare_run

    trainer = prepare_run(cfg, Accelerator(cpu=True)).trainer
    gen = trainer.gen_module.state_dict()
    assert all(torch.equal(gen[k], v) for k, v in weights["generator"].items())
    fake = trainer.fake_module.state_dict()
    assert all(torch.equal(fake[k], v) for k, v in weights["fake"].items())
    assert trainer.fake_module.head is not None and trainer.updates == {"generator": 0, "fake": 0}
    assert all(not state for state in trainer.opt_g.state.values())
    distill(cfg, on_step=first_step)
    assert seen["step"] == 1  # counted from zero again

    # an exported generator works too (generator only)
    only = read_initial_weights(tmp_path / "s1" / "generator")
    assert set(only) == {"generator"} and all(torch.equal(only["generator"][k], v) for k, v in weights["generator"].items())

    # a resume of stage 2 takes its own checkpoint: init_from is not read (it was, and failed once stage 1's
    # run had been moved away; it read stage 1's whole checkpoint, optimisers included, for nothing)
    (tmp_path / "s1").rename(tmp_path / "s1-archived")
    resumed: list[int] = []
    distill(cfg.model_copy(update={"max_steps": 3}), resume=True, on_step=resumed.append)
    assert resumed == [3]


def test_init_from_that_does_not_fit_is_one_clear_error(digits_teacher: Path, sd15_teacher: Path, sd_data,
                                                       tmp_path: Path):
    with pytest.raises(RunError, match="holds no checkpoint"):
        read_initial_weights(tmp_path)
    with pytest.raises(RunError, match="'.*missing' does not exist"):
        read_initial_weights(tmp_path / "missing")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RunError, match="is not a folder"):
        read_initial_weights(tmp_path / "a-file")
    stage("sd15", digits_teacher, tmp_path / "digits", max_steps=1, timesteps=[999], preview_every=100)
    with pytest.raises(RunError, match="holds a full generator but this run trains a LoRA one"):
        stage("sd15-stage2", digits_teacher, tmp_path / "lora", max_steps=1, timesteps=[999], lora_rank=2,
              init_from=tmp_path / "digits", preview_every=100)
    with pytest.raises(RunError, match=r"does not fit this teacher's UNet \(Error\(s\) in loading state_dict for"
                                       r" UNet2DConditionModel: (size mismatch|Missing|Unexpected)"):
        stage("sd15-stage2", sd15_teacher, tmp_path / "sd", max_steps=1, timesteps=[999],
              init_from=tmp_path / "digits", preview_every=100, prompts=sd_data[0], real_images=sd_data[1])
