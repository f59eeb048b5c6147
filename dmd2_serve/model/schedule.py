"""The noise schedule a model was trained on, its prediction type, and the few steps a generator takes.

Notation (DDPM): ``abar[t]`` is the scheduler's ``alphas_cumprod``;
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. A UNet predicts one of
    ``epsilon``       eps;
    ``v_prediction``  v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0   (Salimans & Ho, 2022).
The losses, backward simulation and the sampler all work in eps; :meth:`Schedule.eps` turns a
prediction into eps right after the UNet, and :meth:`Schedule.target` gives what the UNet itself
is trained to output (the fake score learns in its teacher's parameterisation).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import ModelFolderError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _abar(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``abar[t]`` per sample, in float32, shaped to broadcast against ``like`` (B, ...)."""
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.to(like.device).long()]
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def eps_from_v(x_t: Tensor, v: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v`` (float32)."""
    a = _abar(alphas_cumprod, t, x_t)
    return (1 - a).sqrt() * x_t.float() + a.sqrt() * v.float()


def v_from(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (float32)."""
    a = _abar(alphas_cumprod, t, x0)
    return a.sqrt() * eps.float() - (1 - a).sqrt() * x0.float()


class ScheduleError(ModelFolderError):
    """A scheduler the project cannot distil or serve; the message names what is supported."""


@dataclass(frozen=True)
class Schedule:
    """A model's noise schedule and parameterisation, plus the generator's few-step timesteps.

    Attributes:
        alphas_cumprod: (T,) float64 ``abar`` of the scheduler (moved with :meth:`to`).
        prediction_type: ``epsilon`` or ``v_prediction``.
        timesteps: the few-step schedule a generator uses, e.g. (999, 749, 499, 249); empty for
            a teacher.
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    timesteps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ScheduleError(f"prediction type {self.prediction_type!r} is not supported; supported:"
                                f" {', '.join(PREDICTION_TYPES)}")

    @property
    def num_train_timesteps(self) -> int:
        """T: the number of training noise levels (t in [0, T))."""
        return int(self.alphas_cumprod.shape[0])

    def with_timesteps(self, timesteps: tuple[int, ...] | list[int]) -> Schedule:
        """The same schedule with another few-step sequence."""
        return replace(self, timesteps=tuple(int(t) for t in timesteps))

    def to(self, device: torch.device | str) -> Schedule:
        """A copy whose ``alphas_cumprod`` lives on ``device`` (where the conversions index it)."""
        return replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

    def abar(self, t: int) -> float:
        """``abar[t]`` as a Python float (the fused kernel's argument)."""
        return float(self.alphas_cumprod[int(t)])

    def eps(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """The UNet's output as an eps prediction (an eps prediction is returned untouched)."""
        if self.prediction_type == "epsilon":
            return prediction
        return eps_from_v(x_t, prediction, t, self.alphas_cumprod)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the UNet is trained to output for ``x_t = add_noise(x0, eps, t)``."""
        if self.prediction_type == "epsilon":
            return eps
        return v_from(x0, eps, t, self.alphas_cumprod)

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any], timesteps: tuple[int, ...] = ()) -> Schedule:
        """Read a diffusers scheduler config (DDPM-family betas); flow-matching is refused."""
        from diffusers import DDPMScheduler

        name = config.get("_class_name", "")
        if "FlowMatch" in name or config.get("prediction_type") == "flow_prediction":
            raise ScheduleError(f"the scheduler is {name} (flow matching, as in SD3 and Flux), which DMD2 here does"
                                " not support; supported: DDPM-family schedulers with epsilon or v_prediction")
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ScheduleError(f"the scheduler predicts {prediction!r}; supported: {', '.join(PREDICTION_TYPES)}")
        if config.get("rescale_betas_zero_snr"):
            # abar[T-1] = 0: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) divides by zero at t = 999
            raise ScheduleError("the scheduler rescales betas to zero terminal SNR (rescale_betas_zero_snr: true),"
                                " which the eps-space loops here cannot invert at t = 999; supported: DDPM-family"
                                " schedulers without it, with epsilon or v_prediction")
        # the betas, from the keys a DDPMScheduler takes (an LCM or Euler config's others drew a warning)
        accepted = inspect.signature(DDPMScheduler.__init__).parameters
        scheduler = DDPMScheduler.from_config({k: v for k, v in config.items() if k in accepted})
        return cls(scheduler.alphas_cumprod.to(torch.float64), prediction, tuple(timesteps))

    @classmethod
    def from_folder(cls, folder: Path, timesteps: tuple[int, ...] = ()) -> Schedule:
        """The schedule of a pipeline folder's ``scheduler/scheduler_config.json``."""
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ScheduleError(f"could not read '{path}': {e}; the folder needs a diffusers scheduler config") from e
        return cls.from_scheduler_config(config, timesteps)
