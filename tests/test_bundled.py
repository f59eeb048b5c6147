"""The shipped digits teacher and generator load offline and follow their prompts."""

import torch
from sklearn.svm import SVC

from dmd2_serve import BUNDLED_DIGITS_GENERATOR
from dmd2_serve.model.adapters import load_unet, read_card
from dmd2_serve.model.pipeline import FewStepPipeline
from dmd2_train.config import BUNDLED_DIGITS_TEACHER, DISTILL_PRESETS
from dmd2_train.data import digit_caption, load_digits


def test_bundled_generator_draws_the_digit_it_is_asked_for():
    images, labels = load_digits("train")
    classifier = SVC(gamma="scale").fit(images.flatten(1).numpy(), labels.numpy())
    pipe = FewStepPipeline.from_folder(BUNDLED_DIGITS_GENERATOR)
    assert pipe.timesteps == tuple(DISTILL_PRESETS["digits"]["timesteps"])
    wanted = torch.arange(10).repeat(3)
    prompts = [digit_caption(int(d), i) for i, d in enumerate(wanted)]  # numerals and words
    samples = pipe(prompts, seeds=list(range(100, 130))) * 2 - 1
    accuracy = (classifier.predict(samples.flatten(1).numpy()) == wanted.numpy()).mean()
    assert accuracy >= 0.9, f"prompt accuracy {accuracy:.2f}"
    # the same seed gives the same image alone or in a batch (to float rounding: CPU GEMMs of
    # different batch sizes round differently; bit-identity is the serving issue's job)
    alone = pipe([prompts[4]], seeds=[104])
    torch.testing.assert_close(alone[0], pipe(prompts[:6], seeds=list(range(100, 106)))[4], atol=1e-4, rtol=0)


def test_bundled_teacher_folder():
    assert read_card(BUNDLED_DIGITS_TEACHER).family == "digits"
    assert sum(p.numel() for p in load_unet(BUNDLED_DIGITS_TEACHER).parameters()) < 2_000_000


def test_teacher_command_trains_with_the_chosen_betas(tmp_path):
    """``python -m dmd2_train teacher beta_schedule=linear`` writes a folder whose schedule every
    later command reads: DDPM's linear betas, sqrt(abar) 0.006 at t=999 (the bundled teacher's are
    Stable Diffusion's scaled-linear ones: 0.068)."""
    from dmd2_serve.model.adapters import load_backbone
    from dmd2_train.config import TeacherConfig
    from dmd2_train.teacher import train_teacher

    out = train_teacher(TeacherConfig(out=tmp_path / "teacher", steps=2, batch_size=4, beta_schedule="linear"))
    abar = load_backbone(out, read_card(out)).schedule.alphas_cumprod
    assert abs(float(abar[999].sqrt()) - 0.0064) < 1e-3 and abs(float(abar[0]) - (1 - 1e-4)) < 1e-6
    bundled = load_backbone(BUNDLED_DIGITS_TEACHER, read_card(BUNDLED_DIGITS_TEACHER)).schedule.alphas_cumprod
    assert abs(float(bundled[999].sqrt()) - 0.0683) < 1e-3 and abs(float(bundled[0]) - (1 - 0.00085)) < 1e-6
    assert TeacherConfig().beta_schedule == "scaled_linear"  # the default command rebuilds the bundled teacher
