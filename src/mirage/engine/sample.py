"""The one denoising loop, and the per-image noise it draws.

Every task calls `diffuse` with a start image, the terms to combine (combine.py), a step function
(schedule.py) and optionally a constraint applied after each step (inpainting). Image k of a batch draws
all its noise from its own CPU generator seeded with its own seed, so it is the same image alone or in a
batch, and the same image diffusers' IF pipelines make with `torch.Generator("cpu").manual_seed(seed)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mirage.engine.combine import Term, check_reduce, estimate
from mirage.engine.denoiser import Denoiser
from mirage.engine.guide import Guide
from mirage.engine.schedule import CLEAN, Schedule, ddim_step, ddpm_step
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


SAMPLERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class Sampling:
    """How the loop runs, settled before it starts and recorded as it is: the timesteps it visits (then the
    clean image), the guidance scale and the timesteps it applies at, the step rule, a classifier guide."""

    timesteps: tuple[int, ...]
    guidance: float = 7.0
    guidance_interval: tuple[int, int] | None = None  # guide only at lo <= t <= hi (None: everywhere)
    sampler: str = "ddpm"  # ddpm | ddim
    eta: float = 0.0  # DDIM's: 0 deterministic, 1 DDPM-like
    guide: Guide | None = None
    progress: bool = False
    # A step rule that keeps its own state (the diffusers schedulers: multistep, sigma-space): anything with
    # `start(timesteps) -> Stepper`, built fresh per run; None: the sampler above. Its timesteps may be
    # fractional (Euler's "linspace" spacing) and repeat (PNDM's).
    scheduler: object | None = None

    def __post_init__(self):
        object.__setattr__(self, "timesteps", tuple(_timestep(t) for t in self.timesteps))
        if not self.timesteps:
            raise UsageError("there are no timesteps to run")
        validate(guidance=self.guidance)
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}: use {' or '.join(SAMPLERS)}")
        if not 0 <= self.eta <= 1:  # also rejects NaN
            raise UsageError(f"--eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {self.eta}")

    @classmethod
    def spaced(cls, schedule: Schedule, steps: int, **settings) -> "Sampling":
        """`steps` timesteps spaced as diffusers spaces them."""
        validate(steps=steps)
        return cls(tuple(schedule.timesteps(steps)), **settings)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def step(self) -> Step:
        return ddpm_step if self.sampler == "ddpm" else partial(ddim_step, eta=self.eta)

    def stepper(self, model: Denoiser) -> "Stepper":
        """A fresh run of this sampling's step rule: the scheduler's, else the sampler on the model's schedule."""
        if self.scheduler is not None:
            return self.scheduler.start(self.timesteps)
        return ScheduleStepper(model.schedule, self.step, self.timesteps)

    def starting_at(self, start: int) -> "Sampling":
        """The same run entered at timesteps[start] (SDEdit)."""
        if not 0 <= start < len(self.timesteps):
            raise UsageError(f"start index {start} is out of range: use 0 to {len(self.timesteps) - 1}")
        return replace(self, timesteps=self.timesteps[start:])

    def guidance_at(self, t: int) -> float:
        lo, hi = self.guidance_interval or (-math.inf, math.inf)
        return self.guidance if lo <= t <= hi else 1.0


def _timestep(t) -> int | float:
    t = float(t) if not isinstance(t, int) else t
    return int(t) if float(t).is_integer() else t


class Stepper(Protocol):
    """One run of a step rule over `timesteps` (Sampling.stepper): i is the index into those timesteps, `noise`
    the run's Noise, whose per-image generators any draw comes from. `on_schedule`: the rule steps on the
    model's own Schedule, so RePaint's jump back (`renoise`) and a classifier guide apply."""

    init_noise_sigma: float
    on_schedule: bool

    def add_noise(self, x0: Tensor, t: int | float, noise: Tensor) -> Tensor: ...  # as Schedule.forward

    def scale(self, x: Tensor, i: int) -> Tensor: ...

    def step(self, eps: Tensor, var: Tensor | None, i: int, x: Tensor, noise: Noise) -> Tensor: ...


class ScheduleStepper:
    """DDPM or DDIM (`rule`, from schedule.py) on the model's own Schedule, as a Stepper: the model sees x as it
    is, and the step draws its noise per image, none at t = 0 (as diffusers draws none)."""

    init_noise_sigma = 1.0
    on_schedule = True

    def __init__(self, schedule: Schedule, rule: Step, timesteps: Sequence):
        self.schedule, self.rule, self.timesteps = schedule, rule, timesteps

    def _prev(self, i: int):
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else CLEAN

    def add_noise(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        return self.schedule.forward(x0, t, noise)

    def scale(self, x: Tensor, i: int) -> Tensor:
        return x

    def step(self, eps: Tensor, var: Tensor | None, i: int, x: Tensor, noise: Noise) -> Tensor:
        t = self.timesteps[i]
        z = noise.draw(x.shape[1:]) if t > 0 else None
        return self.rule(self.schedule, x, eps, var, t, self._prev(i), z)

    def renoise(self, x: Tensor, i: int, noise: Noise) -> Tensor:
        """From the step's result back to its start, q(x_t | x_t_prev): a fresh try at step i (RePaint)."""
        a = self.schedule.alpha_bar(self.timesteps[i]) / self.schedule.alpha_bar(self._prev(i))
        return a.sqrt().to(x) * x + (1 - a).sqrt().to(x) * noise.draw(x.shape[1:])


@torch.inference_mode()
def diffuse(model: Denoiser, x: Tensor, terms: list[Term], noise: Noise, sampling: Sampling, *,
            reduce: str = "mean", constrain: Constraint | None = None, resample: int = 1,
            callback: Callable[[int, int, Tensor], None] | None = None, stepper: Stepper | None = None) -> Tensor:
    """Denoise x, which is at sampling.timesteps[0], down to a clean image.

    Each timestep steps to the next one in the list and the last one to the clean image, as diffusers'
    schedulers do; the step rule is the run's `stepper` (default: sampling.stepper(model)). `resample` > 1
    repeats each step RePaint-style: step, constrain, re-noise back to t. A guidance interval guides only
    inside it (Kynkaanniemi et al. 2024: guidance at high noise costs diversity and gains little); elsewhere
    the unconditional branch is skipped. A guide (guide.Guide) adds classifier guidance at every step.
    """
    check_reduce(reduce, terms)
    stepper = stepper or sampling.stepper(model)
    if not stepper.on_schedule and resample != 1:
        raise UsageError("--resample (RePaint) works with the ddpm and ddim samplers only, not with --scheduler")
    if not stepper.on_schedule and sampling.guide is not None:
        raise UsageError("classifier guidance works with the ddpm and ddim samplers only, not with --scheduler")
    timesteps = sampling.timesteps
    bar = _progress(len(timesteps), sampling.progress)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        x_t = x_next = x
        for r in range(resample):
            if r:  # jump back for a fresh try at this step
                x_t = stepper.renoise(x_next, i, noise)
            eps, var = estimate(model, stepper.scale(x_t, i), t, terms, sampling.guidance_at(t), reduce, i,
                                sampling.guide)
            x_next = stepper.step(eps, var, i, x_t, noise)
            if constrain is not None:
                x_next = constrain(x_next, t_prev)
        x = x_next
        if callback is not None:
            callback(i, t_prev, x)
        bar.update()
    bar.close()
    return x


def _progress(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, leave=False, unit="step")
