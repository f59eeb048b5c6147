"""The command line as a user meets it: errors, kill -9 and resume, two-process data parallelism."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dmd2_train import checkpoint as ckpt

FAST = ["batch_size=2", "ratio=2", "warmup_steps=1", "preview_every=1000", "log_every=1", "preview_prompts=[a 1]"]


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmd2_train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_user_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.stderr[-2000:]


def test_help():
    result = cli("--help")
    assert result.returncode == 0 and "--teacher" in result.stdout and "--resume" in result.stdout


def test_missing_teacher(tmp_path: Path):
    assert_user_error(cli("--teacher", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist")


def test_malformed_teachers(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    assert_user_error(cli("--teacher", bad, "--out", tmp_path / "o"), "model_index.json")
    (bad / "model_index.json").write_text("{not json")
    assert_user_error(cli("--teacher", bad, "--out", tmp_path / "o"), "not valid JSON")
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert_user_error(cli("--teacher", bad, "--out", tmp_path / "o"), "missing the 'unet/'")


def test_unknown_key_and_bad_value(digits_teacher: Path, tmp_path: Path):
    assert_user_error(cli("--teacher", digits_teacher, "--out", tmp_path / "o", "no_such_key=3"),
                      "unknown config key 'no_such_key'")
    assert_user_error(cli("--teacher", digits_teacher, "--max-steps", "0"), "config key 'max_steps'")


def test_missing_data_is_named_at_once_before_the_teacher_loads(sd15_teacher: Path, tmp_path: Path, monkeypatch):
    """An SD teacher with neither a prompt set nor real images: one message naming both, before minutes
    of loading (it named the prompts after loading, then the real images after loading again)."""
    import pytest
    from conftest import tiny_run_overrides

    from dmd2_train import loop
    from dmd2_train.config import DISTILL_PRESETS, DistillConfig

    monkeypatch.setattr(loop, "load_backbone", lambda *a, **k: pytest.fail("the teacher loaded before the check"))
    base = DISTILL_PRESETS["sd15-stage2"] | tiny_run_overrides() | {"teacher": sd15_teacher, "init_from": None}
    with pytest.raises(loop.RunError, match="needs a prompt set.*; and real images for the GAN.*gan=false"):
        loop.distill(DistillConfig(**base, out=tmp_path / "a" / "b" / "c"))
    assert not (tmp_path / "a").exists()  # the refused start made the folders and took them away again
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    with pytest.raises(loop.RunError, match="needs real images .*backward_simulation=true$"):
        loop.distill(DistillConfig(**base | {"gan": False, "backward_simulation": False, "prompts": prompts},
                                   out=tmp_path / "b"))


def test_real_images_a_run_would_not_read_are_said(tmp_path: Path, capsys):
    """The sd15 preset (no GAN, backward simulation) ignored --real-images, a path that did not exist too;
    the digits teacher given real_images without prompts said only 'needs a prompt set' (and prompts
    without real_images only 'needs real images')."""
    import pytest

    from dmd2_train.config import DISTILL_PRESETS, DistillConfig
    from dmd2_train.run import RunError, check_data_given

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    stage_one = DISTILL_PRESETS["sd15"] | {"prompts": prompts}
    with pytest.raises(RunError, match="real_images '.*nothere' does not exist .and this run would not use it"):
        check_data_given(DistillConfig(**stage_one, real_images=tmp_path / "nothere"), bundled_data=False)
    check_data_given(DistillConfig(**stage_one, real_images=tmp_path), bundled_data=False)
    assert "is not used by this run: gan=false with backward_simulation=true" in capsys.readouterr().err
    with pytest.raises(RunError, match="real_images replaces the bundled images and their captions"):
        check_data_given(DistillConfig(real_images=tmp_path), bundled_data=True)
    with pytest.raises(RunError, match="real images for the GAN.*prompts replaces the bundled images"):
        check_data_given(DistillConfig(prompts=prompts), bundled_data=True)  # it said only 'needs real images'


def test_the_preset_comes_from_the_teacher_with_a_config_file_too(sd15_teacher: Path, tmp_path: Path, monkeypatch):
    """--config used to drop the teacher's preset (an SD run silently got the model's defaults)."""
    from dmd2_train import loop
    from dmd2_train.__main__ import main
    from dmd2_train.config import BUNDLED_DIGITS_TEACHER, DISTILL_PRESETS

    seen = []
    monkeypatch.setattr(loop, "distill", lambda cfg, resume=False: seen.append(cfg))
    config = tmp_path / "run.yaml"
    config.write_text("ratio: 7\n")
    assert main(["--config", str(config), "--teacher", str(sd15_teacher), "--out", str(tmp_path / "a")]) == 0
    config.write_text(f"ratio: 7\nteacher: {sd15_teacher}\n")  # the teacher in the file
    assert main(["--config", str(config), "--out", str(tmp_path / "b")]) == 0
    for cfg in seen:
        assert (cfg.timesteps, cfg.lr_generator, cfg.gan, cfg.ratio) == (
            DISTILL_PRESETS["sd15"]["timesteps"], DISTILL_PRESETS["sd15"]["lr_generator"], False, 7)
    seen.clear()  # teacher=null clears the file's teacher: the bundled one, with its preset
    assert main(["--config", str(config), "--out", str(tmp_path / "c"), "teacher=null"]) == 0
    assert seen[0].teacher == BUNDLED_DIGITS_TEACHER and seen[0].timesteps == DISTILL_PRESETS["digits"]["timesteps"]


def test_unreadable_inputs_and_misplaced_options_are_one_line(digits_teacher: Path, tmp_path: Path):
    binary = tmp_path / "random.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    out = ["--teacher", digits_teacher, "--out", tmp_path / "o", "--max-steps", "1"]
    assert_user_error(cli(*out, "gan=false", "--prompts", binary, "log-every=1"), "is not UTF-8 text")  # (- as _)
    assert_user_error(cli(*out, "--config", binary), "is not UTF-8 text")
    assert_user_error(cli(*out, "ratio="), "override 'ratio=' has no value")
    assert_user_error(cli(*out, "sharding=fsdp2"), "start it with torchrun")
    assert_user_error(cli(*out, "image_size=16"), "the digits model draws 8x8 images only")
    bad = cli(*out, "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
    photos = tmp_path / "photos"  # a teacher written there would replace the folder whole
    photos.mkdir()
    (photos / "holiday.png").write_bytes(b"not really")
    assert_user_error(cli("teacher", "--out", photos, "--steps", "1"), "holds files that are not a model folder")
    assert_user_error(cli("teacher", "--out", binary, "--steps", "1"), "is a file")
    assert (photos / "holiday.png").read_bytes() == b"not really" and binary.stat().st_size == 2048
    from dmd2_serve import BUNDLED_DIGITS_GENERATOR
    from dmd2_train.run import RunError, check_replaceable_model_folder

    generator = shutil.copytree(BUNDLED_DIGITS_GENERATOR, tmp_path / "generator")  # a finished run's export
    with pytest.raises(RunError, match="holds a distilled generator"):  # was replaced by a teacher, silently
        check_replaceable_model_folder(generator)
    check_replaceable_model_folder(digits_teacher)  # a teacher's folder may be trained again


def test_unwritable_output(digits_teacher: Path, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_user_error(cli("--teacher", digits_teacher, "--out", blocker / "run", "--max-steps", "1"),
                      "cannot write to the output folder")


def test_sigkill_keeps_last_checkpoint_and_resume_finishes(digits_teacher: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dmd2_train", "--teacher", str(digits_teacher), "--out", str(out),
            "--max-steps", "12", "checkpoint_every=1", *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(ckpt.list_checkpoints(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0, 0.4))  # somewhere inside a later step or a write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = ckpt.list_checkpoints(out)
    assert found, "no checkpoint survived"
    for _, path in found:  # every complete-named folder is a whole checkpoint
        ckpt.read_checkpoint(path)
    killed_at = found[-1][0]
    assert killed_at < 12
    # the run is not started over by mistake (its checkpoints would be mixed with a new run's)
    assert_user_error(cli("--teacher", digits_teacher, "--out", out, "--max-steps", "12", *FAST),
                      f"already holds a run (a checkpoint at step {killed_at}): continue it with --resume")
    # key=value overrides may sit between the flags
    result = cli("--teacher", digits_teacher, "checkpoint_every=1", "--out", out, "--max-steps", "12", "--resume", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {killed_at}" in result.stdout + result.stderr
    # off a terminal, progress is whole lines (tqdm's redraws made one line of a log file that grew for ever)
    assert "\r" not in result.stderr and "dmd2: 12/12 (100%)" in result.stderr, result.stderr[-3000:]
    assert ckpt.read_meta(ckpt.latest(out)[1])["step"] == 12 and (out / "generator" / "dmd2.json").is_file()
    # the weights are readable by others as the umask allows (safetensors writes 0600), e.g. a server's own user
    mask = os.umask(0)
    os.umask(mask)
    weights = out / "generator" / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    # a damaged newest checkpoint is named, with the way back to the one before it
    newest = ckpt.latest(out)[1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert_user_error(cli("--teacher", digits_teacher, "--out", out, "--max-steps", "13", "--resume", *FAST),
                      f"the checkpoint {newest} cannot be read")
    # its checkpoints deleted to save space: --resume trained from the teacher and replaced the export
    shutil.rmtree(ckpt.checkpoint_dir(out))
    exported = (out / "generator" / "dmd2.json").read_bytes()
    assert_user_error(cli("--teacher", digits_teacher, "--out", out, "--max-steps", "13", "--resume", *FAST),
                      f"--out '{out}' holds an exported generator/ but no checkpoint to resume from")
    assert (out / "generator" / "dmd2.json").read_bytes() == exported


def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(digits_teacher: Path, tmp_path: Path):
    """A checkpoint that did not fit ended in DCP's CheckpointException traceback (a BaseException), and its
    partial folder stayed, holding the space."""
    def small_files() -> None:  # every file this process writes stops at 1 MB: EFBIG, as a full disk's ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dmd2_train", "--teacher", str(digits_teacher), "--out", str(out),
                             "--max-steps", "2", "checkpoint_every=2", *FAST], capture_output=True, text=True,
                            timeout=300, preexec_fn=small_files, check=False)
    assert_user_error(result, f"checkpoint step 2 could not be written to {ckpt.checkpoint_dir(out) / 'step_0000002'}:")
    assert "is removed; free space (or use a folder on other storage); no checkpoint was written before it" in result.stderr
    assert not any(ckpt.checkpoint_dir(out).iterdir()) and not (out / "generator").exists()


def test_two_process_data_parallel_on_cpu(digits_teacher: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dmd2_train", "--teacher", str(digits_teacher), "--out", str(out), "--max-steps", "3", *FAST]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "generator" / "dmd2.json").read_text())
    assert meta["world_size"] == 2 and meta["updates"] == {"generator": 2, "fake": 3}


def torchrun(nproc: int, port: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "dmd2_train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def exported_unet(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "generator" / "unet" / "diffusion_pytorch_model.safetensors")


def test_sharded_checkpoints_resume_on_another_number_of_processes(digits_teacher: Path, tmp_path: Path):
    """FSDP2 on 2 gloo processes writes a sharded checkpoint; 1 process resumes it exactly, trains on,
    and 2 sharded processes resume that one in turn."""
    out = tmp_path / "run"
    def common(steps: int, *extra: str) -> list:  # options first, then key=value overrides
        return ["--teacher", digits_teacher, "--out", out, "--max-steps", str(steps), *extra, *FAST,
                "checkpoint_every=2", "ema_decay=0.5"]

    two = torchrun(2, 29541, *common(2), "sharding=fsdp2")
    assert two.returncode == 0, two.stderr[-3000:]
    state = ckpt.read_checkpoint(ckpt.latest(out)[1])
    assert state["meta"]["world_size"] == 2 and len(list(ckpt.latest(out)[1].glob("*.distcp"))) == 2
    written_by_two = exported_unet(out)
    assert all(torch.equal(v, written_by_two[k]) for k, v in state["generator_ema"].items())

    # Sharded training is the same training: DDP on 2 processes makes the same updates (to float
    # rounding; a stale gathered copy or a lost gradient would differ by the whole update).
    ddp = torchrun(2, 29544, *common(2)[:3], tmp_path / "ddp", *common(2)[4:])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    reference = ckpt.read_checkpoint(ckpt.latest(tmp_path / "ddp")[1])
    from dmd2_serve.model.adapters import load_unet

    start = load_unet(digits_teacher).state_dict()
    for net, prefix in (("generator", ""), ("fake", "unet.")):
        moved = sum((reference[net][prefix + k] - v).abs().sum() for k, v in start.items())
        apart = sum((reference[net][prefix + k] - state[net][prefix + k]).abs().sum() for k in start)
        assert moved > 0 and apart < 0.01 * moved, f"{net}: fsdp2 vs ddp differ by {apart / moved:.2%} of the update"

    # 2 -> 1: nothing left to train, so the export is the checkpoint as one process loaded it
    one = cli(*common(2, "--resume"))  # the run's own settings, without the sharding a plain launch cannot do
    assert one.returncode == 0 and "already at step 2" in one.stdout + one.stderr, one.stderr[-3000:]
    assert "this plain one resumes it unsharded" in one.stdout
    assert all(torch.equal(v, exported_unet(out)[k]) for k, v in written_by_two.items())
    one = cli(*common(3, "--resume"))  # and the optimiser states load: it trains on
    assert one.returncode == 0 and "resumed from step 2" in one.stdout + one.stderr, one.stderr[-3000:]
    written_by_one = exported_unet(out)
    assert ckpt.read_meta(ckpt.latest(out)[1])["world_size"] == 1

    # 1 -> 2, sharded (the export of a checkpoint loaded without training is checked 2 -> 1 above; a launch
    # of 2 processes costs the suite ~20 s)
    assert written_by_one.keys() == written_by_two.keys()
    two = torchrun(2, 29543, *common(4, "--resume"), "sharding=fsdp2")
    assert two.returncode == 0 and "resumed from step 3" in two.stdout + two.stderr, two.stderr[-3000:]
    assert ckpt.read_meta(ckpt.latest(out)[1])["updates"] == {"generator": 2, "fake": 4}
    two = torchrun(2, 29545, *common(5, "--resume"))  # a distributed resume keeps the run's sharding
    assert two.returncode == 0 and "resumed from step 4" in two.stdout + two.stderr, two.stderr[-3000:]
    step, newest = ckpt.latest(out)
    assert step == 5 and ckpt.read_meta(newest)["config"]["sharding"] == "fsdp2"


def test_tiny_sdxl_trains_in_bf16_with_gradient_checkpointing(sdxl_teacher: Path, sd_data, tmp_path: Path):
    prompts, images = sd_data
    result = cli("--teacher", sdxl_teacher, "--prompts", prompts, "--real-images", images, "--out", tmp_path / "run",
                 "--max-steps", "2", *FAST, "gradient_checkpointing=true", "mixed_precision=bf16", "image_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ckpt.read_meta(ckpt.latest(tmp_path / "run")[1])["config"]["mixed_precision"] == "bf16"


def test_a_signal_to_one_process_stops_all_at_one_checkpoint(digits_teacher: Path, tmp_path: Path):
    """An evicted node's processes get SIGTERM, the others nothing: all must agree to stop (the final
    checkpoint is collective), at the same step, and the run resumes from it."""
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "dmd2_train", "--teacher", str(digits_teacher), "--out", str(out), "--max-steps", "500",
           *FAST[:-2], "log_every=4", "checkpoint_every=1000", "preview_prompts=[a 1]"]
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not list((out / "logs").rglob("events.out.tfevents*")) and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a few logged windows in
        workers = [p for p in psutil.Process(run.pid).children() if "dmd2_train" in " ".join(p.cmdline())]
        rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGTERM)  # rank 0 gets nothing
        _, stderr = run.communicate(timeout=300)
    finally:
        run.kill()
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1, (found, stderr[-3000:])
    step, folder = found[0]
    meta = ckpt.read_meta(folder)
    assert step % 4 == 0 and 0 < step < 500 and meta["world_size"] == 2
    assert (f"interrupted: the checkpoint at step {step} is saved ({folder}); continue with: python -m dmd2_train"
            f" --out {out} --resume") in stderr, stderr[-3000:]
    resumed = torchrun(2, 29548, "--teacher", digits_teacher, "--out", out, "--max-steps", step + 2, "--resume", *FAST)
    assert resumed.returncode == 0 and f"resumed from step {step}" in resumed.stdout + resumed.stderr, \
        resumed.stderr[-3000:]
