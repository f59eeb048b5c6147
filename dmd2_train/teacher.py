"""Plain diffusion training of the bundled digits teacher (DDPM, eps prediction, CFG dropout).

The teacher is a pixel-space ``UNet2DConditionModel`` on scikit-learn's 8x8 digits, conditioned
on MiniLM token states of varied captions. ``python -m dmd2_train teacher --preset digits``
rebuilds the weights shipped in ``dmd2_train/assets/digits-teacher``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dmd2_serve.model.adapters import unet_prediction
from dmd2_serve.model.adapters.digits import MINILM_PACKAGE, DigitsBackbone
from dmd2_serve.model.card import ModelCard
from dmd2_serve.model.sampling import add_noise

from .config import BUNDLED_BETA_SCHEDULE, TeacherConfig
from .data import CAPTION_TEMPLATES, digit_caption, load_digits
from .export import folder_written_atomically
from .progress import progress
from .run import PromptEncoder, check_output_folder, check_replaceable_model_folder
from .trainer import step_generator


def digits_unet() -> torch.nn.Module:
    """The digits architecture: 8x8x1 in, 32/64 channels, cross-attention to MiniLM (384).

    1.2 M parameters: small enough that distillation takes minutes on two CPU cores.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=384,
        attention_head_dim=4, norm_num_groups=8,
    )


# beta_schedule -> (beta_start, beta_end), T = 1000: Stable Diffusion's (the bundled teacher's), and
# DDPM's, the usual one for small pixel models
BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (1e-4, 0.02)}


def digits_scheduler(beta_schedule: str = BUNDLED_BETA_SCHEDULE) -> object:
    """The teacher's DDPM noise schedule: ``scaled_linear`` (the bundled teacher's) or ``linear``."""
    from diffusers import DDPMScheduler

    start, end = BETAS[beta_schedule]
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end)


def write_digits_folder(unet: torch.nn.Module, out: Path, extra: dict | None = None,
                        beta_schedule: str = BUNDLED_BETA_SCHEDULE) -> Path:
    """Save a digits teacher folder (unet/, scheduler/, dmd2.json), replacing ``out`` atomically."""
    with folder_written_atomically(out) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        digits_scheduler(beta_schedule).save_pretrained(tmp / "scheduler")
        ModelCard(family=DigitsBackbone.family, image_size=8, text_encoder=f"package:{MINILM_PACKAGE}",
                  **(extra or {})).write(tmp)
    return out


def train_teacher(cfg: TeacherConfig) -> Path:
    """Train the digits teacher and write its folder to ``cfg.out``."""
    check_replaceable_model_folder(cfg.out)
    check_output_folder(cfg.out.parent)
    torch.manual_seed(cfg.seed)
    backbone = DigitsBackbone()
    images, labels = load_digits("train")
    captions = [digit_caption(d, j) for d in range(10) for j in range(len(CAPTION_TEMPLATES))]
    encode = PromptEncoder(backbone, known=["", *captions])
    unet = digits_unet().train()
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    abar = digits_scheduler(cfg.beta_schedule).alphas_cumprod
    bar = progress(cfg.steps, desc="teacher", unit="step")
    for step in range(cfg.steps):
        g = step_generator(cfg.seed, step, 0)
        idx = torch.randint(len(labels), (cfg.batch_size,), generator=g)
        template = torch.randint(len(CAPTION_TEMPLATES), (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        prompts = ["" if d else digit_caption(int(labels[i]), int(j))
                   for i, j, d in zip(idx.tolist(), template.tolist(), drop.tolist())]
        x0 = images[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(abar), (cfg.batch_size,), generator=g)
        loss = F.mse_loss(unet_prediction(unet, add_noise(x0, eps, t, abar), t, encode(prompts)), eps)  # eps-prediction
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(unet)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
    bar.close()
    return write_digits_folder(ema.module.eval(), cfg.out, {"steps_trained": cfg.steps, "ema_decay": cfg.ema_decay},
                               cfg.beta_schedule)
