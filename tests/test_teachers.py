"""Teachers: SD 1.x / 2.x (eps and v-prediction) / SDXL folders, fp16 variants, single-file
checkpoints, and the refusals of everything else (exit code 2, one line naming what is supported)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_one_step_matches_stock_diffusers, tiny_run_overrides, write_tiny_pipeline
from torch import Tensor, nn

from dmd2_serve.model.adapters import Conditioning, load_backbone, load_unet, read_card
from dmd2_serve.model.sampling import add_noise, x0_from_eps
from dmd2_serve.model.schedule import Schedule, eps_from_v, v_from
from dmd2_train.__main__ import main
from dmd2_train.config import DistillConfig
from dmd2_train.networks import FakeScore
from dmd2_train.step import Networks, draw_fake, draw_generator, draw_student, fake_score_loss, generator_loss


def sd_schedule(prediction_type: str, timesteps: tuple[int, ...] = ()) -> Schedule:
    from diffusers import DDPMScheduler

    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    return Schedule.from_scheduler_config({**config, "prediction_type": prediction_type}, timesteps)


# -- the schedule's conversions ------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_and_eps_are_inverse_and_x0_comes_back(prediction_type: str):
    schedule = sd_schedule(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((4, 4, 8, 8), generator=g), torch.randn((4, 4, 8, 8), generator=g)
    t = torch.tensor([0, 250, 749, 999])
    x_t = add_noise(x0, eps, t, schedule.alphas_cumprod)
    target = schedule.target(x0, eps, t)  # what the UNet learns to output
    eps_back = schedule.eps(x_t, target, t)
    torch.testing.assert_close(eps_back, eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(x0_from_eps(x_t, eps_back, t, schedule.alphas_cumprod), x0, atol=2e-4, rtol=0)
    if prediction_type == "epsilon":
        assert target is eps and schedule.eps(x_t, target, t) is target  # untouched, no conversion
    else:
        a = schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * eps - (1 - a).sqrt() * x0)  # v (Salimans & Ho)
        torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * target, x0, atol=1e-5, rtol=0)  # x0 from v


def test_v_round_trip_through_eps():
    abar = sd_schedule("v_prediction").alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn((3, 4, 4, 4), generator=g), torch.randn((3, 4, 4, 4), generator=g)
    t = torch.tensor([1, 500, 998])
    v = v_from(x0, eps, t, abar)
    torch.testing.assert_close(eps_from_v(add_noise(x0, eps, t, abar), v, t, abar), eps, atol=1e-5, rtol=0)


def test_unsupported_prediction_types_and_zero_snr_are_refused():
    from dmd2_serve.model.schedule import ScheduleError

    with pytest.raises(ScheduleError, match="'sample'; supported: epsilon, v_prediction"):
        sd_schedule("sample")
    with pytest.raises(ScheduleError, match="flow matching"):
        Schedule.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    with pytest.raises(ScheduleError, match="zero terminal SNR"):
        Schedule.from_scheduler_config({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True})


# -- the trainer's v path, with oracle networks ----------------------------------------------------
class Oracle(nn.Module):
    """A UNet stand-in for data that is the constant ``level``: outputs the exact eps or v of x_t."""

    def __init__(self, level: float, schedule: Schedule, outputs: str) -> None:
        super().__init__()
        self.level, self.schedule, self.outputs = level, schedule, outputs
        self.mid_block = nn.Identity()  # where FakeScore hooks the GAN head
        self.scale = nn.Parameter(torch.ones(()))  # a parameter: the seam reads the UNet's dtype

    def forward(self, x_t: Tensor, t: Tensor, encoder_hidden_states: Tensor, **_: object) -> SimpleNamespace:
        x0 = torch.full_like(x_t, self.level)
        a = self.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        out = self.schedule.target(x0, eps, t) if self.outputs == "v_prediction" else eps
        return SimpleNamespace(sample=self.mid_block(out) * self.scale)


def oracle_networks(schedule: Schedule, fake_outputs: str, fake_level: float = 0.5,
                    real_level: float = -0.5) -> Networks:
    fake = FakeScore(Oracle(fake_level, schedule, fake_outputs), None, schedule)
    return Networks(generator=Oracle(0.5, schedule, schedule.prediction_type), fake=fake, fake_score=fake,
                    real=Oracle(real_level, schedule, schedule.prediction_type), schedule=schedule)


def test_the_fake_score_learns_v_for_a_v_teacher():
    """Backward simulation through a v-predicting generator lands on its data (0.5); a fake score
    that outputs exactly v there has zero loss, one that outputs eps does not."""
    schedule = sd_schedule("v_prediction", (999, 499))
    cfg = DistillConfig(gan=False, timesteps=[999, 499])
    cond = Conditioning(torch.zeros((2, 4, 8)))
    g = torch.Generator().manual_seed(0)
    draws = draw_fake(draw_student(1, 2, (4, 8, 8), g), cfg, schedule.num_train_timesteps, g)
    loss, logs = fake_score_loss(oracle_networks(schedule, "v_prediction"), cfg, cond, draws, None)
    assert loss.item() < 1e-8 and logs["loss/denoise"] is not None
    wrong, _ = fake_score_loss(oracle_networks(schedule, "epsilon"), cfg, cond, draws, None)
    assert wrong.item() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_distribution_matching_sees_x0_of_v_predicting_scores(prediction_type: str):
    """Real score's data at -0.5, fake score's and generator's at 0.5: DMD's normalised gradient is
    (x0_fake - x0_real) / mean|x - x0_real| = 1 everywhere, so the loss 0.5 * mse(x, x - 1) is 0.5."""
    schedule = sd_schedule(prediction_type, (999, 749))
    cfg = DistillConfig(gan=False, timesteps=[999, 749], guidance_scale=1.75)
    cond = Conditioning(torch.zeros((2, 4, 8)))
    g = torch.Generator().manual_seed(0)
    draws = draw_generator(draw_student(1, 2, (4, 8, 8), g), cfg, schedule.num_train_timesteps, g)
    loss, _ = generator_loss(oracle_networks(schedule, prediction_type), cfg, cond, cond, draws)
    assert loss.item() == pytest.approx(0.5, abs=1e-4)


# -- folders: SD2 v-prediction end to end, fp16 variants ------------------------------------------
def test_v_prediction_teacher_distils_exports_and_matches_stock_diffusers(sd2v_teacher: Path, sd_data,
                                                                          tmp_path: Path):
    from dmd2_train.loop import distill

    assert load_backbone(sd2v_teacher).schedule.prediction_type == "v_prediction"
    prompts, images = sd_data
    cfg = DistillConfig(teacher=sd2v_teacher, out=tmp_path / "run", prompts=prompts, real_images=images,
                        **tiny_run_overrides(max_steps=3, ratio=2, preview_every=100))
    folder = distill(cfg)
    meta = json.loads((folder / "dmd2.json").read_text())
    assert meta["prediction_type"] == "v_prediction" and meta["image_size"] == 16
    assert meta["updates"] == {"generator": 2, "fake": 3}
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["prediction_type"] == "v_prediction"
    assert scheduler["clip_sample"] is False and scheduler["thresholding"] is False  # the generator never clips
    assert_one_step_matches_stock_diffusers(folder)


def test_fp16_variant_folder_loads_in_float32(tmp_path: Path):
    folder = write_tiny_pipeline(tmp_path / "fp16", "sd15", variant="fp16")
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert weights and all(".fp16." in w for w in weights), weights  # only the variant's files
    assert read_card(folder).family == "sd15"
    backbone = load_backbone(folder)
    unet = load_unet(folder)
    for module in (unet, backbone.vae, backbone.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    from safetensors.torch import load_file

    stored = load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(v.dtype == torch.float16 and torch.equal(unet.state_dict()[k], v.float()) for k, v in stored.items())
    assert backbone.encode_prompts(["a cube"]).hidden.dtype == torch.float32


# -- single-file checkpoints ------------------------------------------------------------------------
def write_single_file(teacher: Path, out: Path) -> tuple[Path, Path]:
    """(the teacher's weights as an original-layout .safetensors, its config folder without weights)."""
    from diffusers import StableDiffusionPipeline
    from ldm_layout import sd1_single_file
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd1_single_file(pipe.unet, pipe.vae, pipe.text_encoder), out / "tiny.safetensors")
    config = shutil.copytree(teacher, out / "config", ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "_tok"))
    return out / "tiny.safetensors", config


def test_single_file_checkpoint_converts_once_and_distils(sd15_teacher: Path, sd_data, tmp_path: Path, capsys):
    from dmd2_serve.model.adapters import checkpoint_adapter
    from dmd2_train.single_file import convert_teacher

    file, config = write_single_file(sd15_teacher, tmp_path / "single")
    assert checkpoint_adapter(file)[0].family == "sd15"
    prompts, images = sd_data
    out = tmp_path / "run"
    rc = main(["--teacher", str(file), "--teacher-config", str(config), "--out", str(out), "--prompts", str(prompts),
               "--real-images", str(images), "max_steps=1", "batch_size=2", "preview_every=100", "log_every=1",
               "preview_prompts=[a 1]"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert f"teacher: converting the single file {file}" in captured.out
    converted, original = load_backbone(out / "teacher"), load_backbone(sd15_teacher)
    pairs = {"unet": (load_unet(out / "teacher"), load_unet(sd15_teacher)),
             "vae": (converted.vae, original.vae), "text_encoder": (converted.text_encoder, original.text_encoder)}
    for part, (mine, theirs) in pairs.items():  # the converted weights are the pipeline's, exactly
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), part
    meta = json.loads((out / "generator" / "dmd2.json").read_text())
    assert meta["teacher"] == str(file) and meta["family"] == "sd15"
    logs: list[str] = []
    convert_teacher(file, config, out / "teacher", logs.append)  # a resumed run: no second conversion
    assert logs == [f"teacher: reusing {out / 'teacher'}, converted earlier from {file}"]
    # the file deleted to save space (or the run moved to a machine without it): a resume needs only the copy
    file.unlink()
    rc = main(["--out", str(out), "--resume", "max_steps=2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert f"teacher: {file} is gone; using {out / 'teacher'}, converted from it when the run began" in captured.out
    assert "resumed from step 1" in captured.out


# -- refusals: exit code 2 and one line ------------------------------------------------------------
def refused(args: list[str], capsys) -> str:
    """The one error line of a run the CLI refuses (exit code 2, no traceback)."""
    rc = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1, err[-2000:]
    return errors[0]


def test_a_mistyped_data_path_is_refused_before_the_teacher_is_converted(sd15_teacher: Path, sd_data, tmp_path: Path,
                                                                         capsys):
    """A single file's conversion takes minutes for SDXL; the data paths were first opened after it."""
    file, config = write_single_file(sd15_teacher, tmp_path / "single")
    prompts, images = sd_data
    out = tmp_path / "run"
    line = refused(["--teacher", str(file), "--teacher-config", str(config), "--out", str(out),
                    "--prompts", str(prompts) + ".tx", "--real-images", str(images) + "s", "gan=true"], capsys)
    assert f"prompt file '{prompts}.tx' does not exist" in line and f"real images '{images}s' do not exist" in line
    assert not out.exists()  # nothing converted, no folder left
    line = refused(["--teacher", str(file), "--teacher-config", str(config), "--out", str(out), "--prompts",
                    str(prompts), "--real-images", str(images) + "s"], capsys)  # the preset's stage 1 reads none
    assert f"real_images '{images}s' does not exist (and this run would not use it" in line and not out.exists()
    line = refused(["--teacher", str(sd15_teacher), "--out", str(out), "--prompts", str(prompts),
                    "--real-images", str(images / "nothere"), "gan=true"], capsys)  # a folder teacher: before it loads
    assert f"real images '{images / 'nothere'}' do not exist" in line and not out.exists()


def sd_folder_with(teacher: Path, folder: Path, scheduler: dict | None = None, drop: str | None = None) -> Path:
    shutil.copytree(teacher, folder)
    if scheduler is not None:
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if drop:
        shutil.rmtree(folder / drop)
    return folder


@pytest.mark.parametrize("name", ["StableDiffusion3Pipeline", "FluxPipeline"])
def test_flow_matching_folders_are_refused(name: str, tmp_path: Path, capsys):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": name, "transformer": ["diffusers", "x"],
                                                         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    line = refused(["--teacher", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert "flow matching" in line and "supported teachers:" in line and "Stable Diffusion 1.x / 2.x" in line


@pytest.mark.parametrize("scheduler, needle", [
    ({"_class_name": "DDPMScheduler", "prediction_type": "sample"}, "'sample'; supported: epsilon, v_prediction"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "flow matching"),
])
def test_unsupported_schedulers_are_refused(scheduler: dict, needle: str, sd15_teacher: Path, tmp_path: Path,
                                            capsys):
    folder = sd_folder_with(sd15_teacher, tmp_path / "teacher", scheduler=scheduler)
    line = refused(["--teacher", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert needle in line and "supported" in line


def test_missing_parts_and_paths_are_refused(sd15_teacher: Path, tmp_path: Path, capsys):
    folder = sd_folder_with(sd15_teacher, tmp_path / "teacher", drop="unet")
    assert "missing the 'unet/' sub-folder a Stable Diffusion 1.x / 2.x pipeline needs" in refused(
        ["--teacher", str(folder), "--out", str(tmp_path / "o")], capsys)
    line = refused(["--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], capsys)
    assert "does not exist" in line and "Stable Diffusion 1.x / 2.x / SDXL" in line


def test_bad_single_files_are_refused(sd15_teacher: Path, sd2v_teacher: Path, tmp_path: Path, capsys):
    from safetensors.torch import save_file

    def run(file: Path, *extra: str) -> str:
        return refused(["--teacher", str(file), "--out", str(tmp_path / "o"), *extra], capsys)

    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, lora)
    line = run(lora)
    assert "not a Stable Diffusion checkpoint" in line and "supported single files:" in line
    assert "Stable Diffusion 1.x / 2.x (v1, v2); Stable Diffusion XL (xl_base)" in line
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert "not a readable .safetensors file" in run(broken)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    assert "not a .safetensors checkpoint" in run(pickle)
    for kind, key in [("sd35_large", "model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight"),
                      ("flux-schnell", "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale")]:
        save_file({key: torch.zeros(4)}, tmp_path / f"{kind}.safetensors")  # the keys diffusers tells them by
        line = run(tmp_path / f"{kind}.safetensors")
        assert f"is a {kind} (flow matching) checkpoint, which is not supported; supported single files:" in line
    fake_sd3 = tmp_path / "sd3-like.safetensors"  # not recognised: diffusers says v1, the UNet keys say no
    save_file({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(4)}, fake_sd3)
    assert "not a Stable Diffusion checkpoint" in run(fake_sd3)
    file, _ = write_single_file(sd15_teacher, tmp_path / "single")
    line = run(file)  # no config folder: refused before anything is converted
    assert "pass teacher_config=DIR" in line and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in line
    assert "model_index.json" in run(file, "--teacher-config", str(tmp_path))
    xl = write_tiny_pipeline(tmp_path / "xl", "sdxl")  # the configs of another family
    assert "is a StableDiffusionXLPipeline folder; this checkpoint is Stable Diffusion 1.x / 2.x" in run(
        file, "--teacher-config", str(xl))
    line = run(file, "--teacher-config", str(sd2v_teacher))  # another model of the family: other shapes
    assert "could not convert" in line and "teacher_config is the folder of this very model" in line
    assert not (tmp_path / "o" / "teacher").exists()


def test_refusal_from_the_shell_is_one_line_without_traceback(tmp_path: Path):
    import os
    import subprocess
    import sys

    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    result = subprocess.run([sys.executable, "-m", "dmd2_train", "--teacher", str(folder)], capture_output=True,
                            text=True, timeout=300, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert result.stderr.startswith("error:") and "Flux (flow matching)" in result.stderr

