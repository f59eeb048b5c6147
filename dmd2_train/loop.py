"""The DMD2 training loop: one function, top to bottom.

Per step s (DMD2 Alg. 1, with the two time-scale rule):
    if s % ratio == 0:   generator step   loss_dm + w_G * loss_gan_G
    every step:          fake-score step  loss_denoise + w_D * loss_gan_D
Built on accelerate: ``accelerate launch`` / ``torchrun`` give data parallelism with no change.
Every random draw of step s comes from a generator seeded by (seed, s, rank), so a resumed
run replays exactly the draws an uninterrupted one makes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dmd2_serve.backbones import (
    Backbone,
    Conditioning,
    load_alphas_cumprod,
    load_backbone,
    load_unet,
    read_meta,
    unet_eps,
)
from dmd2_serve.pipeline import FewStepPipeline
from dmd2_serve.sampling import add_noise, predict_x0

from . import checkpoint as ckpt
from .config import BUNDLED_DIGITS_TEACHER, DistillConfig
from .data import TrainingData, digits_data, read_image_folder, read_prompts
from .export import export_generator
from .losses import (
    classifier_free_guidance,
    denoising_loss,
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .networks import FakeScore, bottleneck_shape, build_networks
from .previews import save_grid
from .simulate import backward_simulate


class RunError(RuntimeError):
    """A run that cannot start (bad output folder, missing data); the message says why."""


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator for every draw of one step on one process."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to a constant learning rate."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


class PromptEncoder:
    """Encodes prompts with the backbone; a small known set is encoded once, up front.

    Encoding the known set in one fixed order (not lazily, batch by batch) keeps a resumed run
    bit-identical: the same text always gets the same bits.
    """

    def __init__(self, backbone: Backbone, known: list[str] | None = None, chunk: int = 256) -> None:
        self.backbone = backbone
        self.cache: dict[str, Conditioning] = {}
        texts = sorted(set(known or []))
        for i in range(0, len(texts), chunk):
            part = texts[i:i + chunk]
            enc = backbone.encode_prompts(part)
            self.cache.update({p: enc.index([j]) for j, p in enumerate(part)})

    def __call__(self, prompts: list[str]) -> Conditioning:
        if all(p in self.cache for p in prompts):
            return Conditioning.cat([self.cache[p] for p in prompts])
        return self.backbone.encode_prompts(prompts)


def check_output_folder(out: Path) -> None:
    """Fail early, with a clear message, when the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder '{out}' ({e.strerror}); pass --out DIR with a writable folder") from None


def make_data(cfg: DistillConfig, family: str, backbone: Backbone) -> TrainingData:
    """The digits data for the bundled family, otherwise the prompt file and image folder."""
    if family == "digits" and cfg.prompts is None and cfg.real_images is None:
        return digits_data()
    if cfg.prompts is None:
        raise RunError("this teacher needs a prompt set: pass prompts=FILE (a .txt or .jsonl of captions)")
    real = None
    if cfg.gan or not cfg.backward_simulation:
        if cfg.real_images is None:
            raise RunError("the GAN needs real images: pass real_images=FOLDER, or gan=false")
        size = cfg.image_size or (backbone.sample_shape[-1] if family == "digits" else backbone.image_size)
        channels = 1 if family == "digits" else 3
        real = read_image_folder(cfg.real_images, size, channels)
    return TrainingData(read_prompts(cfg.prompts), real)


def distill(cfg: DistillConfig, resume: bool = False, on_step: Callable[[int], None] | None = None) -> Path:
    """Distil ``cfg.teacher`` into a few-step generator; returns the exported folder.

    ``on_step(step)`` is called after each finished step (tests use it to interrupt a run).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    # 1. Set-up: devices, precision, folders.
    cuda = torch.cuda.is_available()
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        mixed_precision=precision, cpu=not cuda, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(cfg.out), logging_dir=str(cfg.out / "logs")),
    )
    if accelerator.is_main_process:
        check_output_folder(cfg.out)
    accelerator.wait_for_everyone()
    device, rank = accelerator.device, accelerator.process_index

    # 2. The teacher, its adapter and the three networks.
    meta = read_meta(cfg.teacher)
    backbone = load_backbone(cfg.teacher, meta, cfg.image_size).to(device)
    abar = load_alphas_cumprod(cfg.teacher).to(device)
    num_train_timesteps = len(abar)
    data = make_data(cfg, meta["family"], backbone)
    known = data.texts()
    encode = PromptEncoder(backbone, known if len(known) <= 8192 else None)

    torch.manual_seed(cfg.seed)  # the GAN head starts identical on every process
    teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    real, fake_unet, generator = build_networks(load_unet(cfg.teacher), teacher_dtype)
    real.to(device)
    if cfg.gradient_checkpointing:
        fake_unet.enable_gradient_checkpointing()
        generator.enable_gradient_checkpointing()
    uncond_one = backbone.unconditional(1)
    head_shape = bottleneck_shape(fake_unet.to(device), backbone.sample_shape, uncond_one) if cfg.gan else None
    fake = FakeScore(fake_unet, head_shape)
    adamw = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_generator, **adamw)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=cfg.lr_fake, **adamw)
    generator, fake, opt_g, opt_f = accelerator.prepare(generator, fake, opt_g, opt_f)
    gen_plain: nn.Module = accelerator.unwrap_model(generator)
    fake_plain: FakeScore = accelerator.unwrap_model(fake)
    # The weights that get served: an exponential moving average of G when ema_decay > 0.
    ema = AveragedModel(gen_plain, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)) if cfg.ema_decay > 0 else None
    served: nn.Module = ema.module if ema is not None else gen_plain

    # 3. Resume.
    start = 0
    updates = {"generator": 0, "fake": 0}
    if resume:
        state = ckpt.load_latest(cfg.out)
        if state is None:
            accelerator.print(f"no checkpoint in {ckpt.checkpoint_dir(cfg.out)}; starting from the teacher")
        else:
            try:
                gen_plain.load_state_dict(state["generator"])
                fake_plain.load_state_dict(state["fake"])
                opt_g.load_state_dict(state["opt_g"])
                opt_f.load_state_dict(state["opt_f"])
                if ema is not None:
                    ema.module.load_state_dict(state["generator_ema"])
                    ema.n_averaged.fill_(int(state["ema_updates"]))
            except (RuntimeError, ValueError, KeyError) as e:
                raise RunError(
                    f"the checkpoint in {ckpt.checkpoint_dir(cfg.out)} does not fit this configuration (teacher,"
                    f" gan, ... changed?): {str(e).splitlines()[0]}; resume with the run's own settings"
                    " (kept in the checkpoint under 'config') or use a new --out"
                ) from None
            ckpt.set_rng_state(state["rng"])
            updates = dict(state["updates"])
            start = int(state["step"])
            accelerator.print(f"resumed from step {start}")
    if start >= cfg.max_steps:
        accelerator.print(f"the run is already at step {start} >= max_steps {cfg.max_steps}")

    batch = cfg.batch_size
    shape = backbone.sample_shape
    timesteps = cfg.timesteps
    t_lo, t_hi = int(cfg.dm_t_min * num_train_timesteps), int(cfg.dm_t_max * num_train_timesteps)

    def randn(n: int, g: torch.Generator) -> Tensor:
        return torch.randn((n, *shape), generator=g).to(device)

    def randint(lo: int, hi: int, n: int, g: torch.Generator) -> Tensor:
        return torch.randint(lo, hi, (n,), generator=g).to(device)

    def eps_fn(unet: nn.Module, cond: Conditioning) -> Callable[[Tensor, Tensor], Tensor]:
        return lambda x_t, t: unet_eps(unet, x_t, t, cond)

    def student_x0(unet: nn.Module, cond: Conditioning, g: torch.Generator) -> Tensor:
        """G's x0 for a backward-simulated input at a random step k (with grad if enabled)."""
        k = int(torch.randint(len(timesteps), (1,), generator=g))
        noise = [randn(batch, g) for _ in range(k + 1)]
        if cfg.backward_simulation or k == 0:
            sim = backward_simulate(eps_fn(gen_plain, cond), timesteps, abar, k, noise)
            x_t, t = sim.x_t, sim.t
        else:  # ablation: noisy real images, the training input of earlier multi-step models
            images, _ = data.real_batch(batch, g)
            t = torch.full((batch,), timesteps[k], device=device, dtype=torch.long)
            x_t = add_noise(backbone.encode_images(images.to(device)), noise[k], t, abar)
        return predict_x0(eps_fn(unet, cond), x_t, t, abar)

    def update(name: str, model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor) -> float:
        """One optimiser step on ``loss`` with grad-norm clipping; returns the norm before clipping."""
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        updates[name] += 1
        return norm

    def generator_step(g: torch.Generator) -> dict[str, float]:
        cond = encode(data.prompts(batch, g))
        x = student_x0(generator, cond, g)  # (B, C, H, W), grad to G
        # Distribution matching (DMD Eq. 7): real score with CFG vs fake score, no grad.
        t = randint(t_lo, t_hi + 1, batch, g)
        x_t = add_noise(x.detach(), randn(batch, g), t, abar)
        with torch.no_grad():
            both = Conditioning.cat([uncond_one.index([0] * batch), cond])
            eps_u, eps_c = unet_eps(real, torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
            x0_real = predict_x0(lambda *_: classifier_free_guidance(eps_u, eps_c, cfg.guidance_scale), x_t, t, abar)
            x0_fake = predict_x0(lambda xt, tt: fake_plain(xt, tt, cond)[0], x_t, t, abar)
        loss_dm = distribution_matching_loss(x, x0_real, x0_fake)
        logs = {"loss/dm": loss_dm.item()}
        loss = loss_dm
        if cfg.gan:  # non-saturating GAN, fake network frozen for this pass
            t_gan = randint(0, num_train_timesteps, batch, g)
            fake_plain.requires_grad_(False)
            _, logits = fake_plain(add_noise(x, randn(batch, g), t_gan, abar), t_gan, cond, eps=False, logits=True)
            fake_plain.requires_grad_(True)
            loss_gan = gan_generator_loss(logits)
            loss = loss + cfg.gan_weight_generator * loss_gan
            logs["loss/gan_generator"] = loss_gan.item()
        logs["grad_norm/generator"] = update("generator", generator, opt_g, loss)
        if ema is not None:
            ema.update_parameters(gen_plain)
        return logs

    def fake_step(g: torch.Generator) -> dict[str, float]:
        prompts = data.prompts(batch, g)
        cond = encode(prompts)
        with torch.no_grad():
            x = student_x0(gen_plain, cond, g)
        t = randint(0, num_train_timesteps, batch, g)
        eps = randn(batch, g)
        inputs, times, conds = [add_noise(x, eps, t, abar)], [t], [cond]
        if cfg.gan:  # real images noised at their own t share the same fake-UNet pass
            images, captions = data.real_batch(batch, g)
            t_real = randint(0, num_train_timesteps, batch, g)
            inputs.append(add_noise(backbone.encode_images(images.to(device)), randn(batch, g), t_real, abar))
            times.append(t_real)
            conds.append(encode(captions))
        eps_pred, logits = fake(torch.cat(inputs), torch.cat(times), Conditioning.cat(conds), logits=cfg.gan)
        loss_denoise = denoising_loss(eps_pred[:batch], eps)
        logs = {"loss/denoise": loss_denoise.item()}
        loss = loss_denoise
        if cfg.gan:
            loss_gan = gan_discriminator_loss(logits_real=logits[batch:], logits_fake=logits[:batch])
            loss = loss + cfg.gan_weight_discriminator * loss_gan
            logs["loss/gan_discriminator"] = loss_gan.item()
            logs["gan/d_real"] = torch.sigmoid(logits[batch:]).mean().item()
            logs["gan/d_fake"] = torch.sigmoid(logits[:batch]).mean().item()
        logs["grad_norm/fake"] = update("fake", fake, opt_f, loss)
        return logs

    def save(step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                "step": step, "generator": gen_plain.state_dict(), "fake": fake_plain.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_f": opt_f.state_dict(), "rng": ckpt.rng_state(),
                "updates": dict(updates), "world_size": accelerator.num_processes,
                "config": cfg.model_dump(mode="json"),
            }
            if ema is not None:
                state |= {"generator_ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged)}
            ckpt.save_checkpoint(cfg.out, step, state, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    def preview(step: int) -> None:
        if not accelerator.is_main_process:
            return
        pipe = FewStepPipeline(served, backbone, abar, timesteps)
        with accelerator.autocast():
            images = pipe(cfg.preview_prompts, list(range(len(cfg.preview_prompts))))
        save_grid(images, cfg.out / "previews" / f"step_{step:07d}.png")

    # 4. The loop.
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda n, f: stop.update(signal=n)) for s in (signal.SIGINT, signal.SIGTERM)}
    accelerator.init_trackers("dmd2", config={k: str(v) for k, v in cfg.model_dump().items()})
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not accelerator.is_main_process, desc="dmd2", unit="step")
    step = start
    latest: dict[str, float] = {}  # the newest value of every metric (the generator's come every ratio steps)
    try:
        while step < cfg.max_steps:
            g = step_generator(cfg.seed, step, rank)
            lr_scale = warmup_factor(step, cfg.warmup_steps)
            for opt, lr in ((opt_g, cfg.lr_generator), (opt_f, cfg.lr_fake)):
                for group in opt.param_groups:
                    group["lr"] = lr * lr_scale
            with accelerator.autocast():
                logs = generator_step(g) if step % cfg.ratio == 0 else {}
                logs |= fake_step(g)
            step += 1
            bar.update(1)
            latest.update(logs)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                accelerator.log(latest, step=step)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in latest.items() if k.startswith("loss")})
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop["signal"]:
                save(step)
            if step % cfg.preview_every == 0 or step == cfg.max_steps:
                preview(step)
            if on_step is not None:
                on_step(step)
            if stop["signal"]:
                raise KeyboardInterrupt
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)

    # 5. Export.
    out = cfg.out / "generator"
    if accelerator.is_main_process:
        bundled = cfg.teacher.resolve() == BUNDLED_DIGITS_TEACHER.resolve()
        export_generator(served, backbone, cfg.teacher, out, timesteps,
                         extra={"teacher": "bundled:digits-teacher" if bundled else str(cfg.teacher),
                                "steps_trained": step, "updates": updates, "world_size": accelerator.num_processes,
                                "guidance_scale": cfg.guidance_scale, "ema_decay": cfg.ema_decay})
    accelerator.wait_for_everyone()
    accelerator.print(f"generator written to {out}")
    accelerator.end_training()  # closes the trackers and the process group: last
    return out
