"""The one denoising loop, and the per-image noise it draws.

Every task calls `diffuse` with a start image, the terms to combine (combine.py), a step function
(schedule.py) and optionally a constraint applied after each step (inpainting). Image k of a batch draws
all its noise from its own CPU generator seeded with its own seed, so it is the same image alone or in a
batch, and the same image diffusers' IF pipelines make with `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from mirage.engine.combine import Term, check_reduce, estimate
from mirage.engine.denoiser import Denoiser
from mirage.engine.schedule import CLEAN, ddpm_step
from mirage.errors import UsageError

MAX_SEED = 2**63 - 1

Step = Callable[..., Tensor]
Constraint = Callable[[Tensor, int], Tensor]  # (x at timestep t, t) -> x


class Noise:
    """Gaussian noise for a batch, drawn per image from that image's own seed."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        for s in seeds:
            if not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise UsageError(f"seed {s!r} is out of range: use a whole number from 0 to {MAX_SEED}")
        self.seeds = list(seeds)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        self.device, self.dtype = torch.device(device), dtype

    def __len__(self) -> int:
        return len(self.seeds)

    def draw(self, shape: Sequence[int]) -> Tensor:
        """One sample of `shape` per image, stacked: [n, *shape]."""
        parts = [torch.randn((1, *shape), generator=g, dtype=self.dtype) for g in self.generators]
        return torch.cat(parts).to(self.device)


def validate(steps: int | None = None, guidance: float | None = None) -> None:
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise UsageError(f"--steps must be a positive whole number, got {steps!r}")
    if guidance is not None and not (0 <= guidance < math.inf):  # also rejects NaN
        raise UsageError(f"--guidance must be a finite number >= 0, got {guidance!r}")


@torch.inference_mode()
def diffuse(model: Denoiser, x: Tensor, terms: list[Term], noise: Noise, timesteps: Sequence[int], *,
            guidance: float, guidance_interval: tuple[int, int] | None = None, reduce: str = "mean",
            step: Step = ddpm_step, constrain: Constraint | None = None, resample: int = 1, guide=None,
            callback: Callable[[int, int, Tensor], None] | None = None, progress: bool = False) -> Tensor:
    """Denoise x, which is at timesteps[0], down to a clean image.

    Each timestep steps to the next one in the list and the last one to the clean image, as diffusers'
    schedulers do. `resample` > 1 repeats each step RePaint-style: step, constrain, re-noise back to t.
    `guidance_interval = (lo, hi)` guides only at timesteps lo <= t <= hi (Kynkaanniemi et al. 2024: guidance
    at high noise costs diversity and gains little); elsewhere the unconditional branch is skipped. A `guide`
    (guide.Guide) adds classifier guidance at every step.
    """
    check_reduce(reduce, terms)
    timesteps = list(timesteps)
    bar = _progress(len(timesteps), progress)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        x_t = x_next = x
        for r in range(resample):
            if r:  # jump back: q(x_t | x_t_prev) for a fresh try at this step
                x_t = _renoise(model, x_next, t_prev, t, noise)
            eps, var = estimate(model, x_t, t, terms, _guidance_at(t, guidance, guidance_interval), reduce, i,
                                guide)
            z = noise.draw(x.shape[1:]) if t > 0 else None  # diffusers draws no noise at t = 0
            x_next = step(model.schedule, x_t, eps, var, t, t_prev, z)
            if constrain is not None:
                x_next = constrain(x_next, t_prev)
        x = x_next
        if callback is not None:
            callback(i, t_prev, x)
        bar.update()
    bar.close()
    return x


def _guidance_at(t: int, guidance: float, interval: tuple[int, int] | None) -> float:
    return guidance if interval is None or interval[0] <= t <= interval[1] else 1.0


def _renoise(model: Denoiser, x: Tensor, t_from: int, t_to: int, noise: Noise) -> Tensor:
    a = model.schedule.alpha_bar(t_to) / model.schedule.alpha_bar(t_from)
    return a.sqrt().to(x) * x + (1 - a).sqrt().to(x) * noise.draw(x.shape[1:])


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, unit="step")
