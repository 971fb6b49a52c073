"""Noise schedules and the steps between two timesteps.

Notation follows the course (Part A): alpha_bar[t] = prod(1 - beta), the forward process
x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps (A.1), the clean estimate (A.2) and the DDPM step
between two strided timesteps (A.3). The arithmetic mirrors diffusers' DDPMScheduler/DDIMScheduler so that
IF's pipelines are reproduced bit for bit in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mirage.errors import UsageError

CLEAN = -1  # the "timestep" after the last one: alpha_bar = 1, no noise left


@dataclass(frozen=True)
class Schedule:
    """alpha_bar over the training timesteps plus how a step treats the clean estimate and variance."""

    alphas_cumprod: Tensor  # float32, length T (diffusers keeps them in fp32; so do we, for exact matches)
    variance_type: str = "fixed_small"  # fixed_small | fixed_large | learned_range
    clip: float | None = None  # clamp x0 to [-clip, clip]
    threshold: tuple[float, float] | None = None  # IF's dynamic thresholding: (ratio, max value)
    config: dict = field(default_factory=dict, compare=False)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Tensor, **kw) -> "Schedule":
        return cls(torch.cumprod(1.0 - betas.to(torch.float32), dim=0), **kw)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw) -> "Schedule":
        return cls.from_betas(torch.linspace(beta_start, beta_end, T, dtype=torch.float32), **kw)

    @classmethod
    def cosine(cls, T: int = 1000, max_beta: float = 0.999, **kw) -> "Schedule":
        """squaredcos_cap_v2 (Nichol & Dhariwal), the schedule DeepFloyd IF was trained with."""
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls.from_betas(torch.tensor(betas, dtype=torch.float32), **kw)

    @classmethod
    def from_config(cls, config: dict) -> "Schedule":
        """From a diffusers scheduler config (scheduler_config.json)."""
        T = config.get("num_train_timesteps", 1000)
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        elif kind == "linear":
            betas = torch.linspace(config.get("beta_start", 1e-4), config.get("beta_end", 0.02), T,
                                   dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(config.get("beta_start", 1e-4) ** 0.5, config.get("beta_end", 0.02) ** 0.5,
                                   T, dtype=torch.float32) ** 2
        elif kind == "squaredcos_cap_v2":
            return cls.cosine(T, **_step_options(config), config=dict(config))
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r} in scheduler config")
        return cls.from_betas(betas, **_step_options(config), config=dict(config))

    # ---- the forward process and estimates ----------------------------------------------------
    def alpha_bar(self, t: int) -> Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def forward(self, x0: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
        """q(x_t | x_0) (A.1); t may be one timestep or one per batch item. CLEAN gives x0 itself."""
        if isinstance(t, int) and t == CLEAN:
            return x0
        a = _per_item(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0_from_eps(self, x_t: Tensor, t: int, eps: Tensor) -> Tensor:
        """The clean image the noise estimate implies (A.2)."""
        a = self.alpha_bar(t).to(x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    # ---- timesteps ----------------------------------------------------------------------------
    def timesteps(self, steps: int) -> list[int]:
        """As diffusers spaces them for `steps` inference steps ("leading", IF's default): 990, 980, ... 0."""
        if not 0 < steps <= self.num_train_timesteps:
            raise UsageError(f"--steps must be between 1 and {self.num_train_timesteps} (this model's schedule), "
                             f"got {steps}")
        ratio = self.num_train_timesteps // steps
        return [i * ratio for i in reversed(range(steps))]

    def strided(self, start: int | None = None, stride: int | None = None) -> list[int]:
        """The course's strided list, 990, 960, ..., 0 for T = 1000, scaled for other T."""
        T = self.num_train_timesteps
        start = T - T // 100 if start is None else start
        stride = max(1, 3 * T // 100) if stride is None else stride
        return list(range(start, -1, -stride))

    # ---- what a step needs of the schedule ----------------------------------------------------
    def clean_estimate(self, x_t: Tensor, t: int, eps: Tensor) -> Tensor:
        x0 = self.x0_from_eps(x_t, t, eps)
        if self.threshold is not None:
            return dynamic_threshold(x0, *self.threshold)
        if self.clip is not None:
            return x0.clamp(-self.clip, self.clip)
        return x0

    def log_variance(self, t: int, t_prev: int, predicted: Tensor | None) -> Tensor:
        """log sigma^2 of the step t -> t_prev; IF's learned range interpolates between beta~ and beta."""
        a, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        beta = 1 - a / a_prev
        small = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
        if self.variance_type == "learned_range" and predicted is not None:
            frac = (predicted + 1) / 2
            return frac * beta.log().to(predicted) + (1 - frac) * small.log().to(predicted)
        return (beta if self.variance_type == "fixed_large" else small).log()


def _step_options(config: dict) -> dict:
    threshold = None
    if config.get("thresholding"):
        threshold = (config.get("dynamic_thresholding_ratio", 0.995), config.get("sample_max_value", 1.0))
    clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
    return dict(variance_type=config.get("variance_type", "fixed_small"), clip=clip, threshold=threshold)


def _per_item(table: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
    a = table[torch.as_tensor(t, device=table.device)].to(like)
    return a.reshape(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding, as IF uses it: clamp to the ratio-quantile of |x0|, then rescale."""
    dtype = x0.dtype
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


# ---- steps: plain functions with one signature ---------------------------------------------------
def ddpm_step(schedule: Schedule, x: Tensor, eps: Tensor, var: Tensor | None, t: int, t_prev: int,
              noise: Tensor | None) -> Tensor:
    """x_t -> x_{t_prev} (A.3): the posterior mean given the clean estimate, plus its variance."""
    a, a_prev = schedule.alpha_bar(t).to(x), schedule.alpha_bar(t_prev).to(x)
    alpha = a / a_prev
    beta = 1 - alpha
    x0 = schedule.clean_estimate(x, t, eps)
    mean = a_prev.sqrt() * beta / (1 - a) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a) * x
    if t <= 0 or noise is None:
        return mean
    return mean + (0.5 * schedule.log_variance(t, t_prev, var)).exp().to(x) * noise


def ddim_step(schedule: Schedule, x: Tensor, eps: Tensor, var: Tensor | None, t: int, t_prev: int,
              noise: Tensor | None, eta: float = 0.0) -> Tensor:
    """DDIM (Song et al.); eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""
    a, a_prev = schedule.alpha_bar(t).to(x), schedule.alpha_bar(t_prev).to(x)
    x0 = schedule.clean_estimate(x, t, eps)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # re-derived, as diffusers does after clipping
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None and t_prev >= 0:
        out = out + sigma * noise
    return out
