"""The trained state of a DMD2 run and one iteration of it.

``Trainer`` holds the three networks (prepared for DDP, or sharded with FSDP2), both optimisers,
the EMA and the memory levers, and ``train_step(step)`` runs one iteration of the two time-scale
rule with gradient accumulation. The run loop (``loop.py``) and the training benchmark
(``bench.py``) build it the same way, so the benchmark times exactly what a run does.

A quiet hot loop: nothing in a step waits for the GPU. Every draw comes from generators seeded
by (seed, step, rank), noise and timesteps on the device; logged values stay on the device and
are read once per ``log_every`` steps (``Trainer.flush_logs``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from dmd2_serve.model.adapters import Backbone, Conditioning
from dmd2_serve.model.schedule import Schedule

from . import checkpoint as ckpt
from .config import DistillConfig
from .ema import ParameterEMA
from .init_from import apply_initial_weights
from .lora import LoraSpec, trainable
from .memory import StateParking, make_optimizer
from .networks import FakeScore, bottleneck_shape, build_networks
from .step import (
    Networks,
    RealBatch,
    StudentDraws,
    draw_fake,
    draw_generator,
    draw_student,
    fake_score_loss,
    generator_loss,
    micro_batch,
)

# Blocks that become their own FSDP2 units (a diffusers UNet's repeated layers).
FSDP_UNITS = ("BasicTransformerBlock", "ResnetBlock2D")


class Batches(Protocol):
    """Where a step's conditioning and real data come from (run data, or random for the benchmark)."""

    def prompts(self, n: int, g: torch.Generator) -> Conditioning:
        """``n`` encoded prompts on the training device, drawn with the host generator ``g``."""

    def real(self, n: int, g: torch.Generator, device_g: torch.Generator) -> RealBatch:
        """``n`` real samples in UNet space with their encoded captions (indices from ``g``,
        the latent sample from ``device_g``)."""


def seed_of(*parts: int) -> int:
    """A 64-bit seed from integers (numpy's SeedSequence: well mixed, stable across releases)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The host generator for the draws of one step on one process (prompts, data indices)."""
    return torch.Generator().manual_seed(seed_of(seed, step, rank))


def step_generators(seed: int, step: int, rank: int, device: torch.device) -> tuple[torch.Generator, ...]:
    """(host, device, shared) generators of one step: the device one draws noise and timesteps
    where they are used; the shared one (same on every process) draws what every process must
    agree on, the backward-simulation step k, so sharded networks run the same passes everywhere."""
    device_g = torch.Generator(device=device).manual_seed(seed_of(seed, step, rank, 1))
    shared = torch.Generator().manual_seed(seed_of(seed, step))
    return step_generator(seed, step, rank), device_g, shared


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to a constant learning rate."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def shard_fsdp2(module: nn.Module, bf16: bool) -> nn.Module:
    """FSDP2 (``fully_shard``) on the UNet's repeated blocks, then on the whole module."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for sub in reversed(list(module.modules())[1:]):  # innermost first
        if type(sub).__name__ in FSDP_UNITS:
            fully_shard(sub, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def reshard(module: nn.Module) -> None:
    """Return every FSDP2 unit of ``module`` to its sharded state (a no-op without FSDP).

    A pass whose backward never reaches a unit (no-grad backward simulation, the GAN pass whose
    backward stops at the generator) leaves it gathered; its next forward would then reuse that
    copy even after the optimiser updated the shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_norm(norm: Tensor) -> Tensor:
    """A gradient norm as a plain tensor (a DTensor under FSDP2)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Trainer:
    """Networks, optimisers, EMA and memory levers of a run; ``train_step`` is one iteration.

    Args:
        cfg: the run's configuration.
        accelerator: accelerate's ``Accelerator`` (devices, DDP, autocast, backward, clipping).
        teacher: the teacher UNet (float32, on the host); the generator and the fake score start
            as copies of it.
        sample_shape: (C, H, W) of the UNet's input.
        schedule: the teacher's schedule and prediction type (its steps are set to ``cfg.timesteps``).
        batches: the conditioning and real-data source.
        uncond_one: the unconditional conditioning, one row.
        bottleneck_of: the adapter's choice of the module the GAN head reads, given a UNet.
        init: weights to start from instead of the teacher's (``init_from``; weights only).
    """

    def __init__(self, cfg: DistillConfig, accelerator: Any, teacher: nn.Module, sample_shape: tuple[int, int, int],
                 schedule: Schedule, batches: Batches, uncond_one: Conditioning,
                 bottleneck_of: Callable[[nn.Module], nn.Module] = Backbone.bottleneck,
                 init: dict[str, dict[str, Tensor]] | None = None) -> None:
        self.cfg, self.accelerator, self.batches = cfg, accelerator, batches
        self.device, self.rank = accelerator.device, accelerator.process_index
        self.shape = sample_shape
        self.schedule = schedule.with_timesteps(cfg.timesteps).to(self.device)
        self.uncond_one = uncond_one.to(self.device)
        bf16 = accelerator.mixed_precision == "bf16"

        torch.manual_seed(cfg.seed)  # the GAN head (and LoRA's A) start identical on every process
        self.lora = LoraSpec.of(cfg)
        real, fake_unet, generator = build_networks(teacher, torch.bfloat16 if bf16 and self.device.type == "cuda"
                                                    else torch.float32, self.lora, self.lora if cfg.lora_fake else None)
        real.to(self.device)
        if cfg.gradient_checkpointing:
            fake_unet.enable_gradient_checkpointing()
            generator.enable_gradient_checkpointing()
        bottleneck = bottleneck_of(fake_unet)
        head = None
        if cfg.gan:
            with accelerator.autocast():  # a LoRA fake score's frozen weights may be bf16
                head = bottleneck_shape(fake_unet.to(self.device), sample_shape, self.uncond_one, bottleneck)
        fake = FakeScore(fake_unet, head, self.schedule, bottleneck).to(self.device)
        if init is not None:
            apply_initial_weights(generator, fake, init)
        generator.to(self.device)

        if cfg.sharding == "fsdp2":
            from torch.distributed.fsdp import register_fsdp_forward_method

            shard_fsdp2(generator, bf16)
            shard_fsdp2(fake, bf16)
            for method in ("eps", "logits"):
                register_fsdp_forward_method(fake, method)
        opt_g = make_optimizer(trainable(generator), cfg.lr_generator, cfg, self.device)
        opt_f = make_optimizer(trainable(fake), cfg.lr_fake, cfg, self.device)
        if cfg.sharding == "fsdp2":  # sharded in place: accelerate prepares only the optimisers
            self.generator, self.fake = generator, fake
            self.opt_g, self.opt_f = accelerator.prepare(opt_g, opt_f)
        else:
            self.generator, self.fake, self.opt_g, self.opt_f = accelerator.prepare(generator, fake, opt_g, opt_f)
        self.gen_module: nn.Module = accelerator.unwrap_model(self.generator)
        self.fake_module: FakeScore = accelerator.unwrap_model(self.fake)
        # The parameter objects the optimisers hold (under FSDP2 the shards: a module exposes
        # gathered copies while a pass holds them).
        self.gen_params = trainable(self.gen_module)
        self.fake_params = trainable(self.fake_module)
        self.nets = Networks(self.generator, self.fake, self.fake_module, real, self.schedule,
                             accelerator.autocast)
        self.ema = ParameterEMA(self.gen_module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.parking = {"generator": StateParking(self.opt_g, self.device),
                        "fake": StateParking(self.opt_f, self.device)}
        self.updates = {"generator": 0, "fake": 0}
        self._totals: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    # ------------------------------------------------------------------ one iteration

    def train_step(self, step: int) -> dict[str, Tensor]:
        """One iteration: the generator step when ``step % ratio == 0``, then the fake-score step.

        Returns the step's logged values as device tensors (also added to the running totals).
        """
        cfg = self.cfg
        host, device_g, shared = step_generators(cfg.seed, step, self.rank, self.device)
        scale = warmup_factor(step, cfg.warmup_steps)
        for opt, lr in ((self.opt_g, cfg.lr_generator), (self.opt_f, cfg.lr_fake)):
            for group in opt.param_groups:
                if torch.is_tensor(group["lr"]):  # torchao's optimisers keep lr as a tensor
                    group["lr"].fill_(lr * scale)
                else:
                    group["lr"] = lr * scale
        logs: dict[str, Tensor] = {}
        if step % cfg.ratio == 0:
            logs |= self._generator_step(host, device_g, shared)
        logs |= self._fake_step(host, device_g, shared)
        for key, value in logs.items():
            self._totals[key] = self._totals[key] + value if key in self._totals else value.clone()
            self._counts[key] = self._counts.get(key, 0) + 1
        return logs

    def _student_inputs(self, n: int, host: torch.Generator, device_g: torch.Generator, shared: torch.Generator,
                        gan_real: bool) -> tuple[Conditioning, StudentDraws, RealBatch | None]:
        """The step's prompts, the draws for G's input and (when needed) a real batch.

        Ablation (no backward simulation): for k > 0 G's input is a noisy real image, under its own
        caption. ``gan_real`` asks for a real batch for the discriminator as well.
        """
        k = int(torch.randint(len(self.cfg.timesteps), (1,), generator=shared))
        ablation = not self.cfg.backward_simulation and k > 0
        real = self.batches.real(n, host, device_g) if ablation or gan_real else None
        cond = real.cond if ablation else self.batches.prompts(n, host)
        return cond, draw_student(k, n, self.shape, device_g, real.x0 if ablation else None), real

    def _generator_step(self, host: torch.Generator, device_g: torch.Generator, shared: torch.Generator) -> dict[str, Tensor]:
        n = self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        cond, student, _ = self._student_inputs(n, host, device_g, shared, gan_real=False)
        draws = draw_generator(student, self.cfg, self.schedule.num_train_timesteps, device_g)
        uncond = self.uncond_one.index([0] * n)
        logs = self._update("generator", self.generator, self.opt_g, self.gen_params, idle="fake",
                            loss_of=lambda i, parts: generator_loss(
                                self.nets, self.cfg, micro_batch(cond, i, parts), micro_batch(uncond, i, parts),
                                micro_batch(draws, i, parts)))
        if self.ema is not None:
            self.ema.update()
        return logs

    def _fake_step(self, host: torch.Generator, device_g: torch.Generator, shared: torch.Generator) -> dict[str, Tensor]:
        n = self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        cond, student, real = self._student_inputs(n, host, device_g, shared, gan_real=self.cfg.gan)
        draws = draw_fake(student, self.cfg, self.schedule.num_train_timesteps, device_g)
        return self._update("fake", self.fake, self.opt_f, self.fake_params,
                            loss_of=lambda i, parts: fake_score_loss(
                                self.nets, self.cfg, micro_batch(cond, i, parts), micro_batch(draws, i, parts),
                                micro_batch(real, i, parts) if self.cfg.gan else None))

    def _update(self, name: str, model: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter],
                loss_of: Callable[[int, int], tuple[Tensor, dict[str, Tensor]]],
                idle: str | None = None) -> dict[str, Tensor]:
        """Accumulate ``loss_of(i, parts)`` over the micro-batches, clip, step one network."""
        parts = self.cfg.gradient_accumulation_steps
        opt.zero_grad(set_to_none=True)
        logs: dict[str, Tensor] = {}
        for i in range(parts):
            with self._no_sync(model, last=i == parts - 1):
                loss, part = loss_of(i, parts)
                self.accelerator.backward(loss / parts)
            logs = _add(logs, part, 1 / parts)
        logs[f"grad_norm/{name}"] = full_norm(self.accelerator.clip_grad_norm_(params, self.cfg.grad_clip)).detach()
        self._optimizer_step(name, opt, idle)
        return logs

    def _no_sync(self, model: nn.Module, last: bool) -> Any:
        """Skip DDP's gradient all-reduce on all but the last micro-batch (FSDP2 reduces each)."""
        return model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()

    def _optimizer_step(self, name: str, opt: torch.optim.Optimizer, idle: str | None = None) -> None:
        if self.cfg.sharding == "fsdp2":
            reshard(self.gen_module)
            reshard(self.fake_module)
        offload = self.cfg.offload_optimizer
        if offload and idle is not None:  # only the stepping network's state on the GPU
            self.parking[idle].park()
        if offload:
            self.parking[name].unpark()
        opt.step()
        if self.cfg.free_grads:
            opt.zero_grad(set_to_none=True)
        if offload and idle is not None:
            self.parking[name].park()
            self.parking[idle].unpark()
        self.updates[name] += 1

    # ------------------------------------------------------------------ logging

    def flush_logs(self) -> dict[str, float]:
        """Means of the logged values since the last flush: the one host synchronisation."""
        if not self._totals:
            return {}
        keys = list(self._totals)
        values = torch.stack([self._totals[k].float() / self._counts[k] for k in keys]).tolist()
        self._totals.clear()
        self._counts.clear()
        return dict(zip(keys, values))

    def diverged(self, losses_broken: bool = False) -> list[str]:
        """What of the run broke, as every process agrees (FSDP2 shards and per-process losses differ):
        "generator" or "fake" for a network whose weights hold a NaN or an infinity, "losses" when
        ``losses_broken`` (a logged loss that was not finite) on any process. One host
        synchronisation, one multi-tensor max-norm per network. A step skipped by fp16's loss scaler
        leaves the weights finite: only a broken run shows."""
        flags = []
        for params in (self.gen_params, self.fake_params):
            local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
            local = [t for t in local if t.numel()]  # FSDP2 leaves a process an empty shard of a small tensor
            norm = torch.nn.utils.get_total_norm(local, norm_type=float("inf")).float().to(self.device)
            flags.append((~torch.isfinite(norm)).float())
        flags.append(torch.tensor(float(losses_broken), device=self.device))
        broken = torch.stack(flags)
        if self.accelerator.num_processes > 1:
            broken = self.accelerator.reduce(broken, reduction="max")
        return [name for name, flag in zip(("generator", "fake", "losses"), broken.tolist()) if flag]

    def learning_rates(self) -> dict[str, float]:
        return {"lr/generator": float(self.opt_g.param_groups[0]["lr"]),
                "lr/fake": float(self.opt_f.param_groups[0]["lr"])}

    # ------------------------------------------------------------------ state

    def _parts(self) -> tuple[dict[str, nn.Module], dict[str, tuple[nn.Module, Any]]]:
        return ({"generator": self.gen_module, "fake": self.fake_module},
                {"opt_g": (self.gen_module, self.opt_g), "opt_f": (self.fake_module, self.opt_f)})

    def training_state(self) -> dict[str, Any]:
        """The DCP state dict of everything trained (collective under FSDP2)."""
        models, optimizers = self._parts()
        if self.cfg.offload_optimizer and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # parked states arrive in host memory asynchronously
        extra = {"generator_ema": self.ema.state_dict()} if self.ema is not None else {}
        return ckpt.training_state(models, optimizers, extra)

    def save(self, out: Any, step: int, meta: dict[str, Any]) -> None:
        """Write checkpoint ``step`` (every process)."""
        scaler = self.accelerator.scaler  # fp16's loss scaler: its scale and growth count, so a resume is exact
        meta = {"updates": dict(self.updates), "world_size": self.accelerator.num_processes,
                "ema_updates": self.ema.updates if self.ema is not None else None,
                **({"loss_scaler": scaler.state_dict()} if scaler is not None else {}), **meta}
        ckpt.save_checkpoint(out, step, self.training_state(), meta, keep=self.cfg.keep_checkpoints)

    def load(self, path: Any) -> int:
        """Restore from a checkpoint folder; returns its step."""
        state = self.training_state()
        ckpt.load_into(path, state)
        models, optimizers = self._parts()
        ckpt.apply_training_state(models, optimizers, state)
        meta = ckpt.read_meta(path)
        if self.ema is not None:
            self.ema.load_state_dict(state["generator_ema"], int(meta["ema_updates"]))
        if self.accelerator.scaler is not None and meta.get("loss_scaler"):  # none: a run saved before fp16
            self.accelerator.scaler.load_state_dict(meta["loss_scaler"])
        self.updates = dict(meta["updates"])
        return int(meta["step"])

    @contextmanager
    def served(self) -> Iterator[nn.Module]:
        """The generator as it is served (its EMA when on), for previews and export."""
        if self.cfg.sharding == "fsdp2":
            reshard(self.gen_module)
        try:
            with self.ema.swapped() if self.ema is not None else nullcontext():
                yield self.gen_module
        finally:
            if self.cfg.sharding == "fsdp2":  # the served weights' gathered copies must not outlive the block
                reshard(self.gen_module)

    def served_state_dict(self) -> dict[str, Tensor]:
        """Full (unsharded) host tensors of the served generator; collective under FSDP2.

        A LoRA generator serves its adapter only (peft names, ``...to_q.lora_A.default.weight``):
        the rest is the teacher's, which the export reads from the teacher's folder.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora is not None)
        with self.served() as module:
            state = get_model_state_dict(module, options=options)
            # On the host the state dict holds the parameters themselves: copy before the swap back.
            live = {p.data_ptr() for p in module.parameters() if p.device.type == "cpu"}
            return {k: v.clone() if v.data_ptr() in live else v for k, v in state.items()}


def _add(total: dict[str, Tensor], part: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    return {k: total.get(k, 0) + weight * v for k, v in part.items()}
