"""Options a user can get wrong are one line ``error: ...`` and exit 2, before any long work starts.

Run in-process through ``main`` (what ``python -m dmd2_train`` exits with), the long work replaced by
stand-ins that fail the test if they are reached: a refusal that comes too late fails fast.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_user_error

from dmd2_serve import BUNDLED_DIGITS_GENERATOR
from dmd2_train.config import BUNDLED_DIGITS_TEACHER


def run_main(capsys: pytest.CaptureFixture, *args: object) -> subprocess.CompletedProcess:
    """``main(args)`` as a finished process: its exit status and what it printed."""
    from dmd2_train.__main__ import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def never(what: str):
    def reached(*args, **kwargs):
        raise AssertionError(f"{what} started: the options should have been refused before it")

    return reached


@pytest.mark.parametrize("args, needle", [
    (["--max-steps", "0"], "--max-steps 0"),  # these three used to end in a pydantic traceback
    (["--max-steps", "-1"], "--max-steps -1"),
    (["--workers", "-1"], "--workers -1"),  # these two used to train one student at a time
    (["--workers", "0"], "--workers 0"),
    (["--out", "{file}"], "--out '{file}' is a file"),  # used to end in a FileExistsError traceback
    (["--runs", "{file}"], "--runs '{file}' is a file"),
    (["--runs", "{file}/runs"], "cannot write to the output folder '{file}/runs' (Not a directory); pass --runs DIR"),
])
def test_table_refuses_bad_options_before_training(args: list[str], needle: str, tmp_path: Path, capsys,
                                                    monkeypatch):
    monkeypatch.setattr("dmd2_train.quality.train_students", never("training"))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    folders = ["--out", tmp_path / "table", "--runs", tmp_path / "runs", "--max-steps", "1"]
    result = run_main(capsys, "table", *folders, *(a.format(file=a_file) for a in args))  # the last flag wins
    assert_user_error(result, needle.format(file=a_file))
    if "{file}" not in " ".join(args):
        assert not (tmp_path / "table").exists() and not (tmp_path / "runs").exists()  # refused before writing


def test_a_guidance_that_is_no_cfg_scale_is_refused_by_table_and_eval(capsys, tmp_path: Path, monkeypatch):
    """nan ended in a pydantic traceback after minutes (table) or in sklearn's (eval); eval took -1."""
    from dmd2_train.__main__ import main

    monkeypatch.setattr("dmd2_train.quality.train_students", never("training"))
    table = ["table", "--out", str(tmp_path / "table"), "--runs", str(tmp_path / "runs"), "--max-steps", "1"]
    for command in (table, ["eval", "--teacher", str(tmp_path)]):
        for value in ("-1", "nan", "inf"):
            with pytest.raises(SystemExit) as stop:
                main([*command, "--guidance", value])
            said = capsys.readouterr().err
            assert stop.value.code == 2 and f"argument --guidance: {value} is not a CFG scale" in said
    assert not (tmp_path / "table").exists()


def test_table_help_says_what_runs_is(capsys):
    from dmd2_train.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["table", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--runs RUNS folder of the students' training runs" in text


def test_lora_targets_that_do_not_fit_are_a_user_error(sd15_teacher: Path, tmp_path: Path, capsys):
    """Used to exit 1 with a ValueError traceback (the message itself was good)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    result = run_main(capsys, "--teacher", sd15_teacher, "--prompts", prompts, "--out", tmp_path / "run",
                      "--max-steps", "1", "batch_size=2", "ratio=2", "warmup_steps=1", "preview_every=1000",
                      "gan=false", "lora_rank=4", "lora_targets=[nonexistent_mod]")
    assert_user_error(result, "lora_targets ['nonexistent_mod'] do not fit this UNet")
    assert "use module names such as to_q" in result.stderr


def test_eval_steps_outside_the_schedule_are_refused_before_scoring(capsys, monkeypatch):
    """--steps 0 used to sample all 4 steps, -3 the first 1 (a slice), 9 all 4; a teacher's 0 ran 50."""
    monkeypatch.setattr("dmd2_train.evaluate.score_digits", never("scoring"))
    for steps in ("0", "-3", "5", "9"):
        assert_user_error(run_main(capsys, "eval", "--generator", BUNDLED_DIGITS_GENERATOR, "--steps", steps),
                          f"--steps {steps} is outside 1..4")
    for steps in ("0", "-2"):
        assert_user_error(run_main(capsys, "eval", "--teacher", BUNDLED_DIGITS_TEACHER, "--steps", steps),
                          f"--steps {steps}: a teacher samples with at least 1 DDIM step")


def test_eval_steps_inside_the_schedule_reach_the_pipeline(capsys, monkeypatch):
    """The bounds themselves (1 and the schedule's length) and no --steps (all of it) still run."""
    import torch

    from dmd2_serve.model.pipeline import FewStepPipeline
    from dmd2_train.evaluate import DigitsScores

    seen = []

    def pipe(self, prompts, seeds, steps=None):
        seen.append(steps)
        return torch.zeros(len(prompts), 1, 8, 8)

    def score(sample):
        sample(["a handwritten 7"], [0])
        return DigitsScores(1.0, 0.0, 1.0, 0.0)

    monkeypatch.setattr(FewStepPipeline, "__call__", pipe)
    monkeypatch.setattr("dmd2_train.evaluate.score_digits", score)
    for steps in (["--steps", "1"], ["--steps", "4"], []):
        assert run_main(capsys, "eval", "--generator", BUNDLED_DIGITS_GENERATOR, *steps).returncode == 0
    assert seen == [1, 4, None]


def test_eval_refuses_what_it_would_ignore_or_misread(capsys, monkeypatch):
    """The digits protocol used to drop real-scale flags silently, and --teacher on a generator folder
    scored the generator sampled with 50 DDIM steps and CFG (nonsense numbers)."""
    monkeypatch.setattr("dmd2_train.evaluate.score_digits", never("scoring"))
    for flags, needle in [(["--resize-filter", "bicubic"], "--resize-filter sets the real-scale evaluation"),
                          (["--num", "10", "--patch-fid"], "--num, --patch-fid set the real-scale evaluation"),
                          (["--captions", "c.txt", "--batch-size", "0"], "--batch-size 0: give 1 or more")]:
        assert_user_error(run_main(capsys, "eval", "--generator", BUNDLED_DIGITS_GENERATOR, *flags), needle)
    assert_user_error(run_main(capsys, "eval", "--teacher", BUNDLED_DIGITS_GENERATOR),
                      f"is a distilled generator, not a teacher: score it with --generator {BUNDLED_DIGITS_GENERATOR}")


@pytest.mark.parametrize("args, files, needle", [
    (["--teacher", BUNDLED_DIGITS_GENERATOR], {}, "is a distilled generator, not a teacher"),  # it trained on it
    (["--teacher-config", BUNDLED_DIGITS_TEACHER], {}, "--teacher-config is for a single-file teacher"),  # ignored
    (["preview_prompts=[the #1 digit, a 2]"], {}, "is not a valid YAML value"),  # these were PyYAML tracebacks
    (["real_images=*.tar"], {}, "is not a valid YAML value"),
    (["preview_prompts=[]"], {}, "preview_prompts"),  # an IndexError at the first preview, after a checkpoint
    (["--prompts", "{p.jsonl}", "gan=false"], {"p.jsonl": "5\n"}, "p.jsonl:1 has no 'text'"),  # TypeErrors
    (["--prompts", "{p.JSONL}", "gan=false"], {"p.JSONL": '"a text"\n'}, "p.JSONL:1 has no 'text'"),
    # from a QA pass: these named no file, offered no key, or quoted the OS ("File exists")
    (["--prompts", "{e.txt}", "gan=false"], {"e.txt": ""}, "prompt file '{e.txt}' is empty"),
    (["--prompts", "{b.txt}", "gan=false"], {"b.txt": "\n  \n"}, "prompt file '{b.txt}' holds no prompts"),
    (["lr_generatr=1e-4"], {}, "unknown config key 'lr_generatr' (did you mean lr_generator?)"),
    (["--out", "{f.txt}"], {"f.txt": "x"}, "--out '{f.txt}' is a file, not a folder"),
])
def test_distill_refuses_before_training(args: list[str], files: dict[str, str], needle: str, tmp_path: Path,
                                          capsys, monkeypatch):
    monkeypatch.setattr("dmd2_train.trainer.Trainer.__init__", never("the trainer"))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for name in files:
        args = [str(a).replace(f"{{{name}}}", str(tmp_path / name)) for a in args]
        needle = needle.replace(f"{{{name}}}", str(tmp_path / name))
    assert_user_error(run_main(capsys, "--out", tmp_path / "run", "--max-steps", "1", *args), needle)
    assert not (tmp_path / "run").exists()


def test_prompt_files_json_lines_by_suffix_in_any_case_and_without_a_bom(tmp_path: Path):
    from dmd2_train.data import read_prompts

    (tmp_path / "p.json").write_text('{"text": "a handwritten 3"}\n')  # trained on the raw JSON as the prompt
    (tmp_path / "p.txt").write_text("\ufeffa red cube\na blue ball\n", encoding="utf-8")
    assert read_prompts(tmp_path / "p.json") == ["a handwritten 3"]
    assert read_prompts(tmp_path / "p.txt") == ["a red cube", "a blue ball"]


def test_resume_takes_the_runs_own_settings(tmp_path: Path, capsys):
    """`--out DIR --resume` rebuilt the config from the preset: a finished one-step run went on toward
    the preset's 1000 steps at its batch size, or re-exported its generator with the 4-step schedule."""
    import json

    out = tmp_path / "run"
    common = ["--out", out, "preview_every=100", "checkpoint_every=100"]
    assert run_main(capsys, *common, "--max-steps", "2", "batch_size=2", "ratio=2", "timesteps=[999]").returncode == 0
    again = run_main(capsys, "--out", out, "--resume")
    assert again.returncode == 0 and "resuming with the run's own settings" in again.stdout
    assert "already at step 2 >= max_steps 2" in again.stdout
    assert json.loads((out / "generator" / "dmd2.json").read_text())["timesteps"] == [999]
    more = run_main(capsys, "--out", out, "--resume", "--max-steps", "3")
    assert more.returncode == 0 and "changed now: max_steps 2 -> 3" in more.stdout, more.stdout
    meta_path = out / "checkpoints" / "step_0000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["config"]["batch_size"] == 2 and meta["config"]["ratio"] == 2
    assert meta["config"]["teacher"] is None and Path(meta["config"]["out"]).is_absolute()  # a moved venv, another cwd
    assert_user_error(run_main(capsys, "--out", out, "--resume", "--preset", "digits"), "--preset digits with --resume")
    meta_path.write_text("{")  # it fell back to the preset, and the checkpoint then did not fit
    assert_user_error(run_main(capsys, "--out", out, "--resume"), "its meta.json is damaged; move it out")


def test_encode_latents_refuses_a_side_below_1_and_a_run_folder(tmp_path: Path, capsys):
    """--image-size 0 encoded at the teacher's size, -4 blamed the images; --out a run folder filled it."""
    common = ["encode-latents", "--teacher", BUNDLED_DIGITS_TEACHER, "--images", tmp_path]
    for size in ("0", "-4"):
        assert_user_error(run_main(capsys, *common, "--out", tmp_path / "lat", "--image-size", size),
                          f"--image-size {size}: give a side in pixels")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert_user_error(run_main(capsys, *common, "--out", tmp_path / "run"), "is a training run or a model folder")


def test_fp16_on_the_cpu_is_said_to_do_nothing(tmp_path: Path, capsys):
    """accelerate trains fp32 on the CPU whatever mixed_precision says: fp16 was a silent no-op there."""
    from accelerate.state import AcceleratorState

    from dmd2_train.config import DistillConfig
    from dmd2_train.run import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's precision holds otherwise
    try:
        make_accelerator(DistillConfig(out=tmp_path / "run", mixed_precision="fp16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # nor does this one's hold for later tests
    assert "mixed_precision=fp16 does nothing on the CPU" in capsys.readouterr().err


def a_checkpoint_in(out: Path) -> None:
    """What the CLI's messages look for: a complete-named checkpoint folder with its meta file."""
    from dmd2_train import checkpoint as ckpt

    step = ckpt.checkpoint_dir(out) / "step_0000004"
    step.mkdir(parents=True)
    (step / ckpt.META).write_text("{}")


def test_the_command_an_interrupt_offers_pastes_with_a_space_in_the_path(tmp_path: Path):
    import argparse
    import shlex

    from dmd2_train.__main__ import _saved

    out = tmp_path / "my runs" / "a"
    a_checkpoint_in(out)
    said = _saved(argparse.Namespace(command="distill", out=out))
    assert shlex.split(said.split("continue with: ")[1]) == ["python", "-m", "dmd2_train", "--out", str(out), "--resume"]


def test_resume_with_a_mistyped_out_names_the_run_it_looks_like(tmp_path: Path, capsys, monkeypatch):
    """--resume on a folder with no checkpoint starts a new run (requeue scripts rely on it): with a
    run of a close name beside it, that is said before the teacher loads."""
    from dmd2_train import loop
    from dmd2_train.__main__ import main

    monkeypatch.setattr(loop, "distill", lambda cfg, resume=False: None)
    a_checkpoint_in(tmp_path / "digits")
    (tmp_path / "other").mkdir()
    assert main(["--out", str(tmp_path / "digts"), "--resume"]) == 0
    assert f"did you mean --out {tmp_path / 'digits'}?" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "brand-new"), "--resume"]) == 0  # nothing like it: nothing said
    assert "did you mean" not in capsys.readouterr().err


def test_a_failed_export_leaves_no_half_written_folder_and_the_old_one_whole(tmp_path: Path):
    """A full disk during an export left .generator.tmp-<pid>/ (gigabytes, a name no later run reuses)."""
    from dmd2_train.export import folder_written_atomically

    out = tmp_path / "generator"
    out.mkdir()
    (out / "dmd2.json").write_text("the finished run's")
    with pytest.raises(OSError, match="No space left"), folder_written_atomically(out) as tmp:
        (tmp / "unet").mkdir()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert [p.name for p in tmp_path.iterdir()] == ["generator"]
    assert (out / "dmd2.json").read_text() == "the finished run's"


def test_storage_errors_are_known_in_each_library_s_words():
    from safetensors import SafetensorError

    from dmd2_train.run import storage_failure

    said = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own, on ENOSPC
    assert storage_failure(SafetensorError(said)) == "No space left on device"
    assert storage_failure(OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/a/x.png")) == (
        "Disk quota exceeded (writing /runs/a/x.png)")
    assert storage_failure(OSError(errno.ENOENT, "No such file or directory")) is None  # not the storage's refusal
    assert storage_failure(SafetensorError("Error while deserializing header: (os error 2)")) is None
    assert storage_failure(RuntimeError("No space left on device (os error 28)")) is None  # only the known kinds
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save's
    assert storage_failure(short) == "a write stopped short (the disk full, a quota or a file size limit)"
