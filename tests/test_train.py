"""Full DMD2 iterations on tiny models: the loop, the update ratio, exact resume, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_step_matches_stock_diffusers, tiny_run_overrides

from dmd2_serve.model.adapters import load_unet
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_train import checkpoint as ckpt
from dmd2_train.config import DistillConfig
from dmd2_train.loop import distill


def run(teacher: Path, out: Path, resume: bool = False, on_step=None, **extra) -> Path:
    cfg = DistillConfig(teacher=teacher, out=out, **tiny_run_overrides(**extra))
    return distill(cfg, resume=resume, on_step=on_step)


def last_checkpoint(out: Path) -> dict:
    """The newest checkpoint of a run, read whole in this process."""
    return ckpt.read_checkpoint(ckpt.list_checkpoints(out)[-1][1])


def test_digits_run_writes_generator_previews_and_logs(digits_teacher: Path, tmp_path: Path):
    folder = run(digits_teacher, tmp_path / "run", max_steps=5, ratio=2)
    meta = json.loads((folder / "dmd2.json").read_text())
    assert meta["family"] == "digits" and meta["timesteps"] == [999, 749, 499, 249]
    # two time-scale rule: the generator steps at 0, 2, 4; the fake score every step
    assert meta["updates"] == {"generator": 3, "fake": 5}
    assert (tmp_path / "run" / "previews" / "step_0000004.png").is_file()
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4, 5]  # keep_checkpoints=2
    pipe = FewStepPipeline.from_folder(folder)
    images = pipe(["a handwritten 3", "the number seven"], [0, 1])
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    # the exported weights are the last checkpoint's generator, and training moved them off the teacher
    last = last_checkpoint(tmp_path / "run")["generator"]
    exported = pipe.unet.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in last.items())
    teacher = load_unet(digits_teacher).state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in exported.items())


@pytest.mark.parametrize("ratio, steps, expected", [(1, 3, 3), (3, 7, 3), (10, 4, 1)])
def test_update_counts_follow_ratio(digits_teacher: Path, tmp_path: Path, ratio, steps, expected):
    run(digits_teacher, tmp_path / "run", max_steps=steps, ratio=ratio, preview_every=100, gan=False)
    assert last_checkpoint(tmp_path / "run")["meta"]["updates"] == {"generator": expected, "fake": steps}


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_after_interruption_is_bit_exact(digits_teacher: Path, tmp_path: Path, ema_decay):
    common = dict(max_steps=6, ratio=2, checkpoint_every=2, preview_every=100, ema_decay=ema_decay)
    run(digits_teacher, tmp_path / "straight", **common)

    def interrupt(step: int) -> None:
        if step == 5:  # past the step-4 checkpoint: step 5 is lost and must be redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(digits_teacher, tmp_path / "cut", on_step=interrupt, **common)
    assert last_checkpoint(tmp_path / "cut")["meta"]["step"] == 4
    run(digits_teacher, tmp_path / "cut", resume=True, **common)
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "cut")
    assert a["meta"]["step"] == b["meta"]["step"] == 6 and a["meta"]["updates"] == b["meta"]["updates"]
    for part in ("generator", "fake", "generator_ema") if ema_decay else ("generator", "fake"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"
    for opt in ("opt_g", "opt_f"):  # AdamW moments and step counts, keyed by parameter name
        for name, moments in a[opt]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, b[opt]["state"][name][key]), f"{opt} {name}.{key} differs"
    assert a["meta"]["ema_updates"] == b["meta"]["ema_updates"] == (3 if ema_decay else None)


def test_the_loss_scale_of_fp16_resumes_with_the_run(digits_teacher: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """fp16 trains through a loss scaler whose scale grows while no step overflows; a resume restarted it
    at its first scale, so a resumed fp16 run was not the uninterrupted one. (fp16 needs a GPU; here the
    CPU's GradScaler stands in for the one accelerate makes there.)"""
    from dmd2_train import loop

    make = loop.make_accelerator

    def with_scaler(cfg: DistillConfig):
        accelerator = make(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
        return accelerator

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    common = {"max_steps": 4, "ratio": 1, "checkpoint_every": 2, "preview_every": 100, "gan": False}
    run(digits_teacher, tmp_path / "straight", **common)

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(digits_teacher, tmp_path / "cut", on_step=interrupt, **common)
    run(digits_teacher, tmp_path / "cut", resume=True, **common)
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(tmp_path / "cut")
    assert a["meta"]["loss_scaler"] == b["meta"]["loss_scaler"] and a["meta"]["loss_scaler"]["scale"] > 2.0**4
    for part in ("generator", "fake"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resume"


def test_a_closed_terminal_stops_the_run_with_a_checkpoint(digits_teacher: Path, tmp_path: Path):
    """SIGHUP (an SSH session or terminal closed) ended the run on the spot, losing every step since
    the last checkpoint; it now stops as SIGTERM and Ctrl-C do: the step finishes and is saved."""
    import os
    import signal

    def hang_up(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGHUP)

    with pytest.raises(KeyboardInterrupt):
        run(digits_teacher, tmp_path / "run", on_step=hang_up, max_steps=6, checkpoint_every=100, preview_every=100)
    assert last_checkpoint(tmp_path / "run")["meta"]["step"] == 3
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # the caller's handler is back


def test_ema_generator_is_what_gets_exported(digits_teacher: Path, tmp_path: Path):
    folder = run(digits_teacher, tmp_path / "run", max_steps=4, ratio=1, preview_every=100, ema_decay=0.5)
    state = last_checkpoint(tmp_path / "run")
    exported = FewStepPipeline.from_folder(folder).unet.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in state["generator_ema"].items())
    # 4 updates: ema = 0.5 ema + 0.5 G after the first (a copy), so it trails the raw generator
    assert state["meta"]["ema_updates"] == 4 and json.loads((folder / "dmd2.json").read_text())["ema_decay"] == 0.5
    assert any(not torch.equal(v, state["generator"][k]) for k, v in exported.items())


def test_ablations_run(digits_teacher: Path, tmp_path: Path):
    run(digits_teacher, tmp_path / "a", max_steps=2, gan=False, backward_simulation=False, preview_every=100)
    run(digits_teacher, tmp_path / "b", max_steps=2, timesteps=[999], preview_every=100)  # one-step model
    assert json.loads((tmp_path / "b" / "generator" / "dmd2.json").read_text())["timesteps"] == [999]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sd_shaped_pipelines_distil_and_export(family, request, sd_data, tmp_path: Path):
    teacher = request.getfixturevalue(f"{family}_teacher")
    prompts, images = sd_data
    folder = run(teacher, tmp_path / "run", max_steps=3, ratio=2, prompts=prompts, real_images=images, image_size=16)
    meta = json.loads((folder / "dmd2.json").read_text())
    assert meta["family"] == family and meta["updates"] == {"generator": 2, "fake": 3}
    # our loader
    pipe = FewStepPipeline.from_folder(folder)
    assert pipe(["a red cube"], [3]).shape == (1, 3, 16, 16)
    # stock diffusers, with the LCM scheduler and the recorded timesteps
    from diffusers import DiffusionPipeline, LCMScheduler

    stock = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(stock.scheduler, LCMScheduler)
    out = stock("a red cube", timesteps=meta["timesteps"], guidance_scale=0.0, height=16, width=16,
                output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 16, 16) and torch.isfinite(out.images).all()
    assert_one_step_matches_stock_diffusers(folder)  # from the same latents: the same images


def test_out_of_memory_names_the_options_and_keeps_the_last_checkpoint(digits_teacher: Path, tmp_path: Path,
                                                                       monkeypatch):
    from dmd2_train.run import RunError
    from dmd2_train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_oom(self, step: int):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", step_then_oom)
    with pytest.raises(RunError) as err:
        run(digits_teacher, tmp_path / "run", max_steps=6, checkpoint_every=2, preview_every=100)
    message = str(err.value)
    assert "out of GPU memory at step 3" in message and "step_0000002" in message and "intact" in message
    assert "gradient_checkpointing=true" in message and "optimizer=adamw8bit" in message
    assert "batch_size=1 gradient_accumulation_steps=2" in message
    assert last_checkpoint(tmp_path / "run")["meta"]["step"] == 2  # finished work kept


def test_a_diverged_run_stops_before_writing_a_broken_checkpoint(digits_teacher: Path, tmp_path: Path, monkeypatch):
    from dmd2_train.run import RunError
    from dmd2_train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_nan(self, step: int):
        logs = real_step(self, step)
        if step == 2:  # the third step leaves one generator weight NaN, as an overflow would
            with torch.no_grad():
                self.gen_params[0].view(-1)[0] = float("nan")
        return logs

    monkeypatch.setattr(Trainer, "train_step", step_then_nan)
    with pytest.raises(RunError) as err:
        run(digits_teacher, tmp_path / "run", max_steps=6, checkpoint_every=2, preview_every=100, log_every=100)
    message = str(err.value)
    assert "diverged by step 4: the weights of the generator" in message and "hold NaN or infinite" in message
    assert "step_0000002" in message and "intact" in message and "--resume" in message
    assert "lr_generator=" in message and "grad_clip=1.0" in message
    assert last_checkpoint(tmp_path / "run")["meta"]["step"] == 2  # the broken step-4 weights were not saved
    assert not (tmp_path / "run" / "generator").exists()


def test_a_loss_that_is_not_finite_stops_the_run_too(digits_teacher: Path, tmp_path: Path, monkeypatch):
    """Finite weights can give NaN outputs (too large already): the fake's loss went NaN, the run went on."""
    from dmd2_train.run import RunError
    from dmd2_train.trainer import Trainer

    real_step = Trainer.train_step

    def nan_loss(self, step: int):
        logs = real_step(self, step)
        if step == 1:
            self._totals["loss/denoise"] = torch.tensor(float("nan"))
        return logs

    monkeypatch.setattr(Trainer, "train_step", nan_loss)
    with pytest.raises(RunError, match=r"diverged by step 2: its losses are NaN or infinite \(loss/denoise\)"):
        run(digits_teacher, tmp_path / "run", max_steps=4, preview_every=100)  # log_every 1
    assert not ckpt.list_checkpoints(tmp_path / "run")
    # Starting again (as its message says) sets the broken start's logs aside instead of mixing the curves.
    monkeypatch.undo()
    earlier = {p.name for p in (tmp_path / "run" / "logs").rglob("events.*")}
    run(digits_teacher, tmp_path / "run", max_steps=1, preview_every=100)
    (aside,) = (tmp_path / "run").glob("earlier-start-*")
    assert earlier and {p.name for p in (aside / "logs").rglob("events.*")} == earlier
    assert not earlier & {p.name for p in (tmp_path / "run" / "logs").rglob("events.*")}


def test_a_run_that_diverges_again_right_after_resuming_names_the_checkpoint_before(tmp_path: Path):
    """A checkpoint can be finite and already too far gone: --resume from it broke at once, and the
    message sent the user back to it, in a loop."""
    from dmd2_train.loop import diverged_message

    for step in (1, 2):
        (ckpt.checkpoint_dir(tmp_path) / f"step_{step:07d}").mkdir(parents=True)
        (ckpt.checkpoint_dir(tmp_path) / f"step_{step:07d}" / "meta.json").write_text("{}")
    cfg = DistillConfig(out=tmp_path, log_every=10)
    again = diverged_message(cfg, ["losses"], ["loss/denoise"], 3, resumed_at=2)
    assert "diverged again by step 3, right after resuming from step_0000002" in again
    assert "its losses are NaN or infinite (loss/denoise)" in again
    assert f"move {ckpt.checkpoint_dir(tmp_path) / 'step_0000002'} out of" in again and "from step_0000001" in again
    first = diverged_message(cfg, ["generator", "fake"], [], 3)  # not resumed: the newest is the one to go back to
    assert "the weights of the generator and fake networks hold NaN" in first and "step_0000002) is intact" in first
    later = diverged_message(cfg, ["fake"], [], 40, resumed_at=2)  # broke long after the resume: the usual advice
    assert "diverged by step 40" in later and "--resume" in later


def test_logs_speed_memory_and_learning_rates(digits_teacher: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(digits_teacher, tmp_path / "run", max_steps=4, log_every=2, preview_every=100, warmup_steps=4)
    events = next((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"perf/seconds_per_step", "perf/samples_per_second", "lr/generator", "lr/fake", "loss/dm",
            "loss/denoise", "grad_norm/generator"} <= tags
    assert [e.step for e in acc.Scalars("loss/denoise")] == [2, 4]  # read once per log_every window
    assert [e.value for e in acc.Scalars("lr/fake")] == pytest.approx([1e-4 * 2 / 4, 1e-4])  # warm-up: step index 1 of 4, then full
    assert all(e.value > 0 for e in acc.Scalars("perf/samples_per_second"))


def test_wandb_without_the_package_is_a_clear_error(digits_teacher: Path, tmp_path: Path):
    import importlib.util

    from dmd2_train.run import RunError

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(RunError, match=r"pip install 'dmd2-fast\[wandb\]'"):
        run(digits_teacher, tmp_path / "run", log_with=["wandb"])


def test_old_single_file_checkpoints_are_refused_clearly(digits_teacher: Path, tmp_path: Path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_0000200.pt").write_bytes(b"an older format")
    with pytest.raises(ckpt.CheckpointError, match="single-file checkpoints"):
        run(digits_teacher, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoints" / "step_0000200.pt").read_bytes() == b"an older format"  # untouched
