"""The diffusers schedulers as a step rule of the one loop (engine.sample.Sampling.scheduler).

`Scheduler` is the frozen, recorded choice: which scheduler, built from the model's own scheduler config,
for how many steps. Each run starts a fresh `DiffusersStepper` from it (diffusers' schedulers keep state:
the multistep ones their past outputs, the sigma-space ones their step index), which the loop asks for the
scaled model input, the step, and the forward process at a timestep. Noise a step draws comes from each
image's own generator (diffusers' randn_tensor takes one generator per image), so an image is the same alone
or in a batch, and the same as a diffusers pipeline's with `generator=[torch.Generator("cpu").manual_seed(s)]`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mirage.engine.sample import Noise, validate
from mirage.engine.schedule import CLEAN
from mirage.errors import UsageError

# by name, the diffusers class that implements it (names, so that importing mirage loads none of them)
CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
           "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
           "dpm++2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
NAMES = tuple(CLASSES)
BY_CLASS = {cls: name for name, cls in CLASSES.items()}


def own_name(config: dict) -> str | None:
    """The name of the scheduler a scheduler_config.json describes, None where mirage has none for it."""
    return BY_CLASS.get(config.get("_class_name", ""))


def check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in CLASSES:
        raise UsageError(f"unknown scheduler {name!r}: use one of {', '.join(NAMES)}")
    return key


@dataclass(frozen=True)
class Scheduler:
    name: str
    config: dict = field(compare=False, repr=False)  # the model's scheduler config it is built from
    steps: int = 50
    eta: float = 0.0  # DDIM's (and DDPM-like ones'), passed where the scheduler's step takes it

    def __post_init__(self):
        object.__setattr__(self, "name", check_name(self.name))
        validate(steps=self.steps)
        T = self.config.get("num_train_timesteps", 1000)
        if self.steps > T:
            raise UsageError(f"--steps must be between 1 and {T} (this model's schedule), got {self.steps}")

    def build(self):
        import diffusers  # here, as hub's loaders do: importing it would cost every built-in model's run 1.5 s

        return getattr(diffusers, CLASSES[self.name]).from_config(self.config)

    def timesteps(self) -> tuple:
        s = self.build()
        s.set_timesteps(self.steps)
        return tuple(s.timesteps.tolist())

    def start(self, timesteps) -> "DiffusersStepper":
        return DiffusersStepper(self, len(timesteps))


class DiffusersStepper:
    """One run of a diffusers scheduler over the last `count` of its timesteps (fewer: an img2img run entered
    part way, as StableDiffusionImg2ImgPipeline does with set_begin_index)."""

    def __init__(self, spec: Scheduler, count: int):
        s = spec.build()
        s.set_timesteps(spec.steps)
        begin = len(s.timesteps) - count
        if begin < 0:
            raise ValueError(f"{count} timesteps asked of a {spec.name} run of {len(s.timesteps)}")
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(begin)
        self.scheduler, self.timesteps = s, s.timesteps[begin:]
        self.init_noise_sigma = s.init_noise_sigma
        self.on_schedule = False  # sigma-space and multistep rules: no RePaint jump back, no classifier guide
        step_args = inspect.signature(s.step).parameters
        self._extra = dict(eta=spec.eta) if "eta" in step_args else {}
        self._takes_generator = "generator" in step_args

    def add_noise(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        if t == CLEAN:
            return x0
        ts = torch.tensor([t] * x0.shape[0], dtype=self.timesteps.dtype)
        return self.scheduler.add_noise(x0, noise.to(x0), ts)

    def scale(self, x: Tensor, i: int) -> Tensor:
        return self.scheduler.scale_model_input(x, self.timesteps[i])

    def step(self, eps: Tensor, var: Tensor | None, i: int, x: Tensor, noise: Noise) -> Tensor:
        extra = dict(self._extra)
        if self._takes_generator:
            extra["generator"] = noise.generators if len(noise.generators) > 1 else noise.generators[0]
        return self.scheduler.step(eps, self.timesteps[i], x, return_dict=False, **extra)[0]
