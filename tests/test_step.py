"""One DMD2 iteration on tiny SD-shaped teachers: gradients under bf16 autocast and gradient
checkpointing, the GAN pass with checkpointing, and gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_run_overrides

from dmd2_train.config import DistillConfig
from dmd2_train.loop import prepare_run
from dmd2_train.step import micro_batch
from dmd2_train.trainer import Trainer, step_generators


def accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # each test picks its own precision
    return Accelerator(mixed_precision=precision, cpu=True)


def trainer_for(teacher: Path, data: tuple[Path, Path], out: Path, precision: str = "no", **extra) -> Trainer:
    prompts, images = data
    cfg = DistillConfig(teacher=teacher, out=out, prompts=prompts, real_images=images, image_size=16,
                        free_grads=False, **tiny_run_overrides(**extra))
    return prepare_run(cfg, accelerator(precision)).trainer


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_steps_give_every_trained_parameter_a_gradient(family, checkpointing, request, sd_data, tmp_path):
    teacher = request.getfixturevalue(f"{family}_teacher")
    trainer = trainer_for(teacher, sd_data, tmp_path / "run", "bf16", gradient_checkpointing=checkpointing)
    assert trainer.gen_module.is_gradient_checkpointing == checkpointing
    real = trainer.nets.real
    host, device_g, shared = step_generators(0, 0, 0, trainer.device)

    trainer._generator_step(host, device_g, shared)  # DM + GAN generator term through the fake net
    for name, g in grads(trainer.gen_module).items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"generator {name}: {g}"
    assert all(g is None for g in grads(trainer.fake_module).values()), "the GAN pass must not train the fake net"
    assert all(not p.requires_grad and p.grad is None for p in real.parameters())
    generator_grads = {n: g.clone() for n, g in grads(trainer.gen_module).items()}

    trainer._fake_step(host, device_g, shared)  # denoising + discriminator in one pass
    for name, g in grads(trainer.fake_module).items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"fake {name}: {g}"
    assert all(torch.equal(g, generator_grads[n]) for n, g in grads(trainer.gen_module).items())
    assert all(p.grad is None for p in real.parameters())
    assert trainer.updates == {"generator": 1, "fake": 1}


def test_accumulated_micro_batches_equal_one_large_batch(sd15_teacher, sd_data, tmp_path):
    common = dict(lr_generator=1e-12, lr_fake=1e-12)  # steps too small to matter: compare gradients
    big = trainer_for(sd15_teacher, sd_data, tmp_path / "big", batch_size=4, **common)
    small = trainer_for(sd15_teacher, sd_data, tmp_path / "small", batch_size=2, gradient_accumulation_steps=2,
                        **common)
    logs = []
    for trainer in (big, small):
        host, device_g, shared = step_generators(3, 0, 0, trainer.device)
        logs.append(trainer._generator_step(host, device_g, shared) | trainer._fake_step(host, device_g, shared))
    for module in ("gen_module", "fake_module"):
        a, b = grads(getattr(big, module)), grads(getattr(small, module))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-6, msg=f"{module} {name}")
    for key in logs[0]:
        torch.testing.assert_close(logs[1][key], logs[0][key], rtol=1e-3, atol=1e-6, msg=key)
    assert {"loss/dm", "loss/gan_generator", "loss/denoise", "loss/gan_discriminator"} <= set(logs[0])


def test_micro_batch_splits_every_tensor_and_keeps_the_rest():
    from dmd2_serve.model.adapters import Conditioning
    from dmd2_train.step import StudentDraws

    draws = StudentDraws(2, [torch.arange(4.0), torch.arange(4.0) + 10], None)
    part = micro_batch(draws, 1, 2)
    assert part.k == 2 and part.real_x0 is None
    assert [t.tolist() for t in part.noise] == [[2.0, 3.0], [12.0, 13.0]]
    cond = Conditioning(torch.arange(4.0).reshape(4, 1), {"time_ids": torch.arange(8.0).reshape(4, 2)})
    assert micro_batch(cond, 0, 2).added["time_ids"].tolist() == [[0.0, 1.0], [2.0, 3.0]]


def test_eight_bit_adamw_steps_and_its_state_is_eight_bit(digits_teacher, tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    # torchao compiles its step per parameter shape: 100 s of Inductor on these CPUs for the wiring
    # this test checks; run eagerly, it is the same step on the same states
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    cfg = DistillConfig(teacher=digits_teacher, out=tmp_path / "run", optimizer="adamw8bit",
                        **tiny_run_overrides(preview_every=100))
    trainer = prepare_run(cfg, accelerator("no")).trainer
    before = [p.detach().clone() for p in trainer.gen_params]
    trainer.train_step(0)
    kinds = {type(s["exp_avg"]).__name__ for s in trainer.opt_g.optimizer.state.values()}
    assert "OptimState8bit" in kinds  # (torchao keeps tiny tensors in full precision)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.gen_params))


def test_gan_term_reaches_the_generator_as_the_plain_loss_would(sd15_teacher, sd_data, tmp_path):
    """The surrogate (input gradient through the frozen fake net) equals autograd through the
    whole loss with the fake network's parameters frozen."""
    from dmd2_serve.model.sampling import add_noise
    from dmd2_train.losses import gan_generator_loss
    from dmd2_train.step import draw_generator, draw_student, generator_loss, student_x0

    trainer = trainer_for(sd15_teacher, sd_data, tmp_path / "run", gan_weight_generator=0.5)
    cfg, nets, gen = trainer.cfg, trainer.nets, trainer.gen_module
    host, device_g, _ = step_generators(0, 0, 0, trainer.device)
    cond = trainer.batches.prompts(2, host)
    draws = draw_generator(draw_student(1, 2, trainer.shape, device_g), cfg, trainer.schedule.num_train_timesteps, device_g)
    uncond = trainer.uncond_one.index([0, 0])

    def generator_grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        gen.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in gen.named_parameters()}

    loss, logs = generator_loss(nets, cfg, cond, uncond, draws)
    ours = generator_grads(loss)
    dm_only = generator_grads(generator_loss(nets, cfg.model_copy(update={"gan": False}), cond, uncond, draws)[0])
    trainer.fake_module.requires_grad_(False)  # the reference: plain autograd, fake net frozen
    x = student_x0(nets, cfg, cond, draws.student)
    reference_gan = gan_generator_loss(trainer.fake_module.logits(add_noise(x, draws.eps_gan, draws.t_gan, trainer.schedule.alphas_cumprod),
                                                                 draws.t_gan, cond))
    gan_only = generator_grads(cfg.gan_weight_generator * reference_gan)
    assert all(p.grad is None for p in trainer.fake_module.parameters())
    torch.testing.assert_close(logs["loss/gan_generator"], reference_gan.detach())
    torch.testing.assert_close(loss.detach(), logs["loss/dm"] + cfg.gan_weight_generator * reference_gan.detach())
    for name, g in ours.items():
        torch.testing.assert_close(g, dm_only[name] + gan_only[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(gan_only[n].abs().sum() > 0 for n in gan_only)


def test_bundled_digits_run_encodes_its_prompts_once_not_every_step(digits_teacher, tmp_path, monkeypatch):
    """The digits data has 14,470 captions but 100 distinct texts: all cached up front, so the text
    encoder (half of a step's time when it ran per batch) never runs inside the loop."""
    cfg = DistillConfig(teacher=digits_teacher, out=tmp_path / "run", **tiny_run_overrides(preview_every=100))
    run = prepare_run(cfg, accelerator("no"))
    texts = set(run.batches.data.texts()) | set(cfg.preview_prompts)
    assert len(run.batches.data.texts()) > 8192 and set(run.batches.encode.cache) == texts
    calls = []
    monkeypatch.setattr(run.backbone, "encode_prompts", lambda prompts: calls.append(prompts))
    for step in range(3):  # generator and fake-score steps, GAN real batches included
        run.trainer.train_step(step)
    assert calls == []


def test_prompt_cache_past_its_limit_encodes_each_batch(digits_teacher):
    from dmd2_serve.model.adapters import load_backbone, read_card
    from dmd2_train.run import PromptEncoder

    backbone = load_backbone(digits_teacher, read_card(digits_teacher))
    known = ["a 1", "a 2", "a 3"] * 10
    assert set(PromptEncoder(backbone, known, limit=3).cache) == {"a 1", "a 2", "a 3"}
    over = PromptEncoder(backbone, known, limit=2)
    assert over.cache == {}
    assert torch.equal(over(["a 1"]).hidden, backbone.encode_prompts(["a 1"]).hidden)


def test_gan_t_max_limits_the_gan_levels_and_judges_fakes_at_them(sd15_teacher, sd_data, tmp_path):
    """gan_t_max < 1: every GAN noise level (G's term, the reals, G's samples for the discriminator)
    lies in [0, gan_t_max T) while denoising keeps [0, T); the discriminator's fake logits are
    those of G's samples at their own GAN levels, not of the denoising pass. gan_t_max = 1
    draws exactly what it always drew."""
    from dmd2_serve.model.sampling import add_noise
    from dmd2_train.losses import gan_discriminator_loss
    from dmd2_train.step import draw_fake, draw_generator, draw_student, fake_score_loss, student_x0

    trainer = trainer_for(sd15_teacher, sd_data, tmp_path / "run", batch_size=64, gan_t_max=0.25)
    cfg, nets, T = trainer.cfg, trainer.nets, trainer.schedule.num_train_timesteps
    host, device_g, _ = step_generators(0, 0, 0, trainer.device)
    student = draw_student(1, 64, trainer.shape, device_g)
    fake, gen = draw_fake(student, cfg, T, device_g), draw_generator(student, cfg, T, device_g)
    for levels in (fake.t_real, fake.t_fake_gan, gen.t_gan):
        assert int(levels.max()) < 250
    assert int(fake.t.max()) >= 500  # 64 uniform draws on [0, 1000)
    full = cfg.model_copy(update={"gan_t_max": 1.0})
    assert draw_fake(student, full, T, torch.Generator().manual_seed(3)).t_fake_gan is None
    old = draw_fake(student, full, T, torch.Generator().manual_seed(3))  # the same 4 draws as before the option
    g = torch.Generator().manual_seed(3)
    assert torch.equal(old.t, torch.randint(0, T, (64,), generator=g))
    torch.randn((64, *trainer.shape), generator=g)
    assert torch.equal(old.t_real, torch.randint(0, T, (64,), generator=g))

    small = draw_fake(draw_student(1, 2, trainer.shape, device_g), cfg, T, device_g)
    cond, real = trainer.batches.prompts(2, host), trainer.batches.real(2, host, device_g)
    _, logs = fake_score_loss(nets, cfg, cond, small, real)
    with torch.no_grad():
        abar = trainer.schedule.alphas_cumprod
        x = student_x0(nets, cfg, cond, small.student)
        logits_fake = trainer.fake_module.logits(add_noise(x, small.eps_fake_gan, small.t_fake_gan, abar),
                                                 small.t_fake_gan, cond)
        logits_real = trainer.fake_module.logits(add_noise(real.x0, small.eps_real, small.t_real, abar),
                                                 small.t_real, real.cond)
    torch.testing.assert_close(logs["loss/gan_discriminator"], gan_discriminator_loss(logits_real, logits_fake),
                               rtol=1e-4, atol=1e-5)


def test_an_unused_real_image_folder_is_said_once_and_not_opened(sd15_teacher, sd_data, tmp_path, capsys):
    """The stage-one recipe (no GAN, backward simulation) reads prompts only: the warning that real_images
    goes unused was printed twice (before the teacher loaded and again when the data was made)."""
    trainer = trainer_for(sd15_teacher, sd_data, tmp_path / "run", gan=False, backward_simulation=True)
    assert capsys.readouterr().err.count("is not used by this run") == 1
    assert trainer.batches.data.real is None
