"""The digits evaluation protocol and its metrics."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from dmd2_train.evaluate import (
    frechet_distance,
    judge,
    protocol_prompts,
    real_sampler,
    score_digits,
    within_class_spread,
)


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    shifted = a + np.array([2.0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)  # |mu_a - mu_b|^2, same covariance
    scaled = a * 2  # covariance 4I vs I: Tr(I + 4I - 2 * 2I) = 1 per dimension
    assert frechet_distance(a, scaled) == pytest.approx(3.0, rel=0.1)


def test_a_dead_feature_gives_the_distance_without_a_warning():
    """The judge's ReLU has units that never fire: their covariance rows are zero, the product singular."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 3)), rng.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    dead = np.zeros((4000, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's LinAlgWarning printed on every eval
        with_dead = frechet_distance(np.hstack([a, dead]), np.hstack([b, dead]))
    assert np.isfinite(with_dead) and with_dead == pytest.approx(frechet_distance(a, b), abs=1e-3)


def test_spread_by_hand():
    images = torch.tensor([[0.0], [3.0], [10.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert within_class_spread(images, labels) == pytest.approx(1.5)  # (3 + 0) / 2


def test_real_digits_score_as_real():
    scores = score_digits(real_sampler())
    assert scores.prompt_accuracy > 0.95 and 0.8 < scores.diversity < 1.2
    # a collapsed sampler (one image per digit) has no diversity and a large Frechet distance
    _, _, reference, labels = protocol_prompts()
    first = {d: reference[labels == d][0] for d in range(10)}
    collapsed = score_digits(lambda prompts, seeds: torch.stack([first[int(d)] for d in labels]))
    assert collapsed.diversity == 0 and collapsed.frechet_distance > 10 * scores.frechet_distance
    # a subset of the prompts (a sample grid's) gets one real image of each prompt's digit
    prompts, seeds, _, _ = protocol_prompts()
    picked = real_sampler()(prompts[:12:3], seeds[:12:3])
    assert picked.shape[0] == 4 and (judge().predict(picked) == labels[:12:3].numpy()).all()


def test_eval_command_on_a_tiny_generator(digits_teacher, tmp_path):
    from conftest import tiny_run_overrides

    from dmd2_train.config import DistillConfig
    from dmd2_train.loop import distill

    folder = distill(DistillConfig(teacher=digits_teacher, out=tmp_path / "run", **tiny_run_overrides(max_steps=2)))
    r = subprocess.run([sys.executable, "-m", "dmd2_train", "eval", "--generator", str(folder)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    scores = json.loads(r.stdout)
    assert set(scores) == {"prompt_accuracy", "frechet_distance", "diversity", "ms_per_image"}
    # the shipped (trained) generator is far above chance (10%) and far closer to the data than
    # a 2-step distillation of a random tiny UNet
    from dmd2_serve import BUNDLED_DIGITS_GENERATOR

    r = subprocess.run([sys.executable, "-m", "dmd2_train", "eval", "--generator", str(BUNDLED_DIGITS_GENERATOR)],
                       capture_output=True, text=True, timeout=300)
    shipped = json.loads(r.stdout)
    assert shipped["prompt_accuracy"] > 0.9 and scores["prompt_accuracy"] < 0.5
    assert shipped["frechet_distance"] < 5 < scores["frechet_distance"]
    r = subprocess.run([sys.executable, "-m", "dmd2_train", "eval", "--teacher", str(digits_teacher), "--steps", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "frechet_distance" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "dmd2_train", "eval"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_training_curves_score_the_exported_weights(digits_teacher, tmp_path):
    """curves.png's FD points are the checkpoints' exported weights: the EMA when it is on."""
    from conftest import tiny_run_overrides

    from dmd2_serve.model.pipeline import FewStepPipeline
    from dmd2_train.config import DistillConfig
    from dmd2_train.evaluate import generator_sampler
    from dmd2_train.loop import distill
    from dmd2_train.quality import curve_points, plot_curves

    run = tmp_path / "run"
    folder = distill(DistillConfig(teacher=digits_teacher, out=run, **tiny_run_overrides(ema_decay=0.5)))
    series = curve_points(run)
    assert [s for s, _ in series["frechet_distance"]] == [2, 4]  # one point per kept checkpoint
    assert {"loss/dm", "loss/denoise", "loss/gan_generator", "loss/gan_discriminator"} <= set(series)
    exported = score_digits(generator_sampler(folder)).frechet_distance
    assert series["frechet_distance"][-1][1] == pytest.approx(exported, rel=1e-6)
    raw = FewStepPipeline.from_folder(folder)
    from dmd2_train import checkpoint as ckpt

    raw.unet.load_state_dict(ckpt.read_checkpoint(ckpt.latest(run)[1])["generator"])
    assert score_digits(lambda p, s: raw(p, s) * 2 - 1).frechet_distance != pytest.approx(exported, rel=1e-6)
    assert plot_curves(series, tmp_path / "curves.png").stat().st_size > 0


def test_quality_targets_compare_with_the_best_training_free_sampler():
    """The table's target lines pick the best training-free 4-step row as the bar and say met/missed."""
    from dmd2_train.evaluate import DigitsScores
    from dmd2_train.quality import SHIPPED_ROW, targets

    def s(fd, acc=1.0, div=0.9):
        return DigitsScores(prompt_accuracy=acc, frechet_distance=fd, diversity=div, ms_per_image=1.0)

    scores = {"teacher-50-g1": s(1.7), "teacher-4-g1": s(4.3), "student-4-step0": s(2.2),
              SHIPPED_ROW: s(2.0, acc=0.99, div=0.85), "student-1": s(3.0)}
    got = {t.what.split(" (")[0]: t for t in targets(scores, ["teacher-4-g1", "student-4-step0"])}
    bar = got["4-step student FD vs 0.9x the best training-free 4-step sampler"]
    assert "student-4-step0" in next(t.what for t in targets(scores, ["teacher-4-g1", "student-4-step0"]))
    assert bar.bound == pytest.approx(0.9 * 2.2) and not bar.met and "missed" in bar.line()
    assert got["4-step student FD vs 1.3x the 50-step teacher"].met
    assert got["4-step student prompt accuracy"].met and got["4-step student diversity"].met
    assert got["1-step student FD vs 2x the 50-step teacher"].met  # 3.0 <= 3.4
    scores[SHIPPED_ROW] = s(1.9, acc=0.96, div=0.7)
    got = {t.what.split(" (")[0]: t for t in targets(scores, ["teacher-4-g1", "student-4-step0"])}
    assert got["4-step student FD vs 0.9x the best training-free 4-step sampler"].met
    assert not got["4-step student prompt accuracy"].met and not got["4-step student diversity"].met


def test_table_rows_say_how_long_their_generator_trained(tmp_path):
    """--max-steps 5 trained the 8,000-step row for 5 steps and the table still said 8,000 (and a later
    full table reusing those runs would have said it too)."""
    from dmd2_train.quality import SHIPPED_ROW, SHIPPED_STEPS, row_name, student_runs

    full = {row.key: (row, cfg) for row, cfg in student_runs(tmp_path, 2.0)}
    assert full[SHIPPED_ROW][1].max_steps == SHIPPED_STEPS and f"{SHIPPED_STEPS:,} steps" in full[SHIPPED_ROW][0].name
    cut = student_runs(tmp_path, 2.0, max_steps=5)
    assert all(cfg.max_steps == 5 and cfg.out == tmp_path / row.key and cfg.guidance_scale == 2.0 for row, cfg in cut)
    row, _ = full[SHIPPED_ROW]
    generator = tmp_path / "generator"
    generator.mkdir()
    for trained, name in ((SHIPPED_STEPS, row.name), (5, f"{row.name}, trained 5 of its {SHIPPED_STEPS:,} steps")):
        (generator / "dmd2.json").write_text(json.dumps({"steps_trained": trained}))
        assert row_name(row, generator) == name


def test_table_trains_its_students_side_by_side(digits_teacher, tmp_path):
    """train_students runs the unexported runs in worker processes (each to its exported
    generator, step counts as configured) and leaves exported ones alone."""
    from conftest import tiny_run_overrides

    from dmd2_train.config import DistillConfig
    from dmd2_train.quality import train_students

    cfgs = [DistillConfig(teacher=digits_teacher, out=tmp_path / name, **tiny_run_overrides(max_steps=steps))
            for name, steps in (("a", 4), ("b", 2))]
    train_students(cfgs, workers=2)
    for cfg in cfgs:
        card = json.loads((cfg.out / "generator" / "dmd2.json").read_text())
        assert card["steps_trained"] == cfg.max_steps
    stamp = (cfgs[0].out / "generator" / "dmd2.json").stat().st_mtime_ns
    train_students(cfgs, workers=2)  # nothing left to train
    assert (cfgs[0].out / "generator" / "dmd2.json").stat().st_mtime_ns == stamp
    broken = DistillConfig(teacher=tmp_path / "no-teacher", out=tmp_path / "c", **tiny_run_overrides())
    with pytest.raises(Exception, match="no-teacher"):  # a worker's error reaches the caller
        train_students([broken, cfgs[1]], workers=2)
