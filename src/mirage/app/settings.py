"""One run's settings, resolved once: the task's defaults overridden by the arguments, every value checked
before any model loads, then checked against the loaded model when the engine's `Sampling` is made from it.
What result.json records is read off this one value."""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from mirage import __version__
from mirage.app.args import parse_interval
from mirage.app.defaults import X4_RECIPE, task_defaults
from mirage.backends.deepfloyd import SCHEDULES, named_timesteps
from mirage.backends.load import is_sd, is_small, resolve_device
from mirage.backends.schedulers import Scheduler, check_name
from mirage.backends.memory import check_plan
from mirage.backends.runtime import COMPILE_SCOPE
from mirage.engine.guide import Guide, check_strength
from mirage.quality.clip import DEFAULT_CLIP
from mirage.engine.sample import Sampling, validate
from mirage.errors import UsageError

CHUNK = 64  # images made, upscaled and written together: what a long run holds in memory at once


@dataclass(frozen=True)
class Settings:
    task: str
    model: str
    device: str
    memory: str
    compile: bool | str  # False, or the compile scope
    steps: int  # the task's default where --steps was not given
    spacing: str  # "diffusers": --steps spaced as diffusers does; "strided": the course's strided list
    guidance: float
    guidance_interval: tuple[int, int] | None
    sampler: str
    eta: float
    classifier_guidance: float | None  # None: the strength the guide's file gives for the task
    pick: str  # none | best
    tries: int | None  # None: the task's default, where a classifier can check every prompt
    default_tries: int
    confidence: float
    batch_size: int | None  # None: a whole chunk per model call
    upscaler: str
    steps2: int
    guidance2: float
    noise_level: int
    out: str | None
    quiet: bool
    argv: tuple[str, ...]
    scorer: str | None = None  # --scorer: what checks candidates (None: the classifier of a built-in model, else CLIP)
    clip: str = DEFAULT_CLIP  # --clip: the CLIP model that scores where CLIP does
    schedule: str | None = None  # --schedule: one of IF's published timestep lists instead of --steps
    schedule2: str | None = None  # --schedule2: the same for stage II
    scheduler: str | None = None  # --scheduler; None: the model's own where it has one (Stable Diffusion)
    size: int | None = None  # --size (Stable Diffusion)
    stage3: str = "none"  # --stage3: the x4 upscaler after IF stage II
    steps3: int = X4_RECIPE["steps"]  # its loop (default: its published recipe)
    guidance3: float = X4_RECIPE["guidance"]
    noise_level3: int = X4_RECIPE["noise_level"]

    @property
    def command(self) -> str:
        """The command line that ran, as result.json shows it."""
        return shlex.join(["mirage", *self.argv])

    @property
    def ranked(self) -> bool:
        return self.pick == "best"

    def chunk(self, total: int) -> int:
        """Images per chunk: all of them where they are ranked against each other, else up to CHUNK."""
        return total if self.ranked else min(total, CHUNK)

    def sampling(self, model, guide: Guide | None = None) -> Sampling:
        """Stage I's loop for `model`: its timesteps from its own schedule (a --steps beyond it is refused
        here, before any sampling), and the guidance interval inside that schedule."""
        schedule = model.schedule
        T = schedule.num_train_timesteps
        if self.size is not None:
            if not hasattr(model, "set_size"):
                raise UsageError(f"--size sets a Stable Diffusion model's resolution; {self.model} makes "
                                 f"{model.size} px images only: drop --size")
            model.set_size(self.size)
        scheduler = self.scheduler_for(model)
        if scheduler is not None:
            return Sampling(scheduler.timesteps(), self.guidance, self.guidance_interval, self.sampler, self.eta,
                            guide, progress=not self.quiet, scheduler=scheduler)
        if self.guidance_interval is not None and self.guidance_interval[0] >= T:
            raise UsageError(f"--guidance-interval {self.guidance_interval[0]}-{self.guidance_interval[1]} lies "
                             f"outside this model's timesteps 0..{T - 1}")
        if self.schedule is not None:
            timesteps = named_timesteps(self.schedule, schedule)
        elif self.spacing == "strided":
            timesteps = schedule.strided()
        else:
            timesteps = schedule.timesteps(self.steps)
        return Sampling(tuple(timesteps), self.guidance, self.guidance_interval, self.sampler, self.eta, guide,
                        progress=not self.quiet)

    def scheduler_for(self, model) -> Scheduler | None:
        """--scheduler (or the model's own) built from the model's scheduler config; None: --sampler."""
        name = self.scheduler or getattr(model, "scheduler_name", None)
        if name is None:
            return None
        config = getattr(model, "scheduler_config", None) or model.schedule.config
        if not config or config.get("variance_type") in ("learned", "learned_range"):
            raise UsageError(f"--scheduler works with Stable Diffusion models; {self.model} steps with --sampler "
                             f"ddpm or ddim only")
        return Scheduler(name, config, self.steps, self.eta)

    def upscaling(self, upscaler) -> Sampling:
        T = upscaler.schedule.num_train_timesteps
        if not 0 <= self.noise_level < T:
            raise UsageError(f"--noise-level must be between 0 and {T - 1}, got {self.noise_level}")
        timesteps = (named_timesteps(self.schedule2, upscaler.schedule) if self.schedule2 is not None
                     else upscaler.schedule.timesteps(self.steps2))
        return Sampling(tuple(timesteps), self.guidance2, None, self.sampler, self.eta, progress=not self.quiet)

    def stage3_sampling(self, upscaler) -> Sampling:
        """The x4 upscaler's loop after stage II: its own scheduler for --steps3 steps."""
        if not 0 <= self.noise_level3 <= upscaler.max_noise_level:
            raise UsageError(f"--noise-level3 must be between 0 and {upscaler.max_noise_level} for {self.stage3}, "
                             f"got {self.noise_level3}")
        spec = Scheduler(upscaler.scheduler_name, upscaler.scheduler_config, self.steps3)
        return Sampling(spec.timesteps(), self.guidance3, scheduler=spec, progress=not self.quiet)

    def record(self) -> dict:
        """The run-wide settings every image's record starts with."""
        return dict(task=self.task, mirage=__version__, argv=list(self.argv), sampler=self.sampler,
                    **(dict(eta=self.eta) if self.sampler == "ddim" else {}),
                    **(dict(scheduler=self.scheduler) if self.scheduler else {}),
                    **(dict(size=self.size) if self.size else {}))


def stage_record(name: str, model, sampling: Sampling, **extra) -> dict:
    """What one stage ran: its model, resolution and the timesteps it visited."""
    return dict(model=name, size=model.size, steps=sampling.steps, guidance=sampling.guidance,
                **({} if sampling.guidance_interval is None else dict(guidance_interval=sampling.guidance_interval)),
                timesteps=list(sampling.timesteps), **extra)


def resolve(args, task: str) -> Settings:
    """The settings of `task` from the command line's arguments: defaults filled in, each value checked."""
    small = is_small(args.model)
    defaults = task_defaults(small, task, "sd" if is_sd(args.model) else None)
    scheduler = getattr(args, "scheduler", None)
    if scheduler is not None:
        scheduler = check_name(scheduler)
    size = getattr(args, "size", None)
    if size is not None and size <= 0:
        raise UsageError(f"--size must be a positive number of pixels, got {size}")
    noise_level = args.noise_level if args.noise_level is not None else \
        X4_RECIPE["noise_level"] if task == "upscale" else 250
    steps = defaults["steps"] if args.steps is None else args.steps
    guidance = defaults["guidance"] if args.guidance is None else args.guidance
    validate(steps=steps, guidance=guidance)
    interval = (defaults["guidance_interval"] if args.guidance_interval is None
                else parse_interval(args.guidance_interval))
    confidence = defaults["confidence"] if getattr(args, "confidence", None) is None else args.confidence
    if not 0 <= confidence < 1:  # also rejects NaN
        raise UsageError(f"--confidence is a probability below 1: give a number from 0 to below 1, got {confidence}")
    if args.classifier_guidance is not None:
        check_strength(args.classifier_guidance)
    resolve_device(args.device)  # a device this machine lacks is refused before anything loads
    if args.compile_scope and not args.compile:
        raise UsageError(f"--compile-scope {args.compile_scope} chooses what --compile compiles: add --compile")
    compile = (args.compile_scope or COMPILE_SCOPE) if args.compile else False
    check_plan(args.memory)  # for every model: a built-in one must not take a plan it ignores silently
    if not 0 <= args.eta <= 1:  # also rejects NaN
        raise UsageError(f"--eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {args.eta}")
    tries = getattr(args, "tries", None)
    if tries is not None and tries < 1:
        raise UsageError(f"--tries must be at least 1, got {tries}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size} (leave it out for a whole "
                         f"chunk of up to {CHUNK} images per call)")
    validate(steps=args.steps2, guidance=args.guidance2)
    stage3 = getattr(args, "stage3", "none") or "none"
    steps3, guidance3, noise3 = (getattr(args, f"{k}3", X4_RECIPE[k]) for k in ("steps", "guidance", "noise_level"))
    validate(steps=steps3, guidance=guidance3)
    spacing = defaults["spacing"] if args.steps is None else "diffusers"
    return Settings(task=task, model=args.model, device=args.device, memory=args.memory, compile=compile,
                    steps=steps, spacing=spacing, guidance=guidance, guidance_interval=interval,
                    sampler=args.sampler, eta=args.eta, classifier_guidance=args.classifier_guidance,
                    pick=getattr(args, "pick", "none"), tries=tries, default_tries=defaults["tries"],
                    confidence=confidence, batch_size=args.batch_size, upscaler=args.upscaler,
                    steps2=args.steps2, guidance2=args.guidance2, noise_level=noise_level, out=args.out,
                    quiet=args.quiet, argv=tuple(args.argv), scorer=getattr(args, "scorer", None),
                    clip=getattr(args, "clip", None) or DEFAULT_CLIP, schedule=_schedule(args, "schedule", "steps"),
                    schedule2=_schedule(args, "schedule2", "steps2"), scheduler=scheduler, size=size,
                    stage3=stage3, steps3=steps3, guidance3=guidance3, noise_level3=noise3)


def _schedule(args, option: str, steps: str) -> str | None:
    """A published timestep list by name (checked here, before anything loads), which replaces --steps."""
    name = getattr(args, option, None)
    if name is None:
        return None
    if name not in SCHEDULES:
        raise UsageError(f"unknown --{option} {name!r}: use one of {', '.join(SCHEDULES)}")
    if option == "schedule" and args.steps is not None:
        raise UsageError(f"--schedule {name} fixes the timesteps: drop --{steps}")
    return name
