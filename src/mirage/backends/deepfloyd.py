"""DeepFloyd IF stage I (text -> 64 px) and stage II (64 -> 256 px upscaler) as Denoisers, via diffusers.

Sizes, channels and schedules come from the model's own configs; prompts go through T5 (prompts.py), which is
freed before the UNet loads. How the UNet loads and runs (memory plans, CUDA graphs, compiled blocks) is
runtime.py's, shared with Stable Diffusion.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.backends import hub
from mirage.backends.memory import check_plan
from mirage.backends.prompts import PromptEncoder
from mirage.backends.runtime import UNetRuntime
from mirage.engine.denoiser import Cond
from mirage.engine.schedule import Schedule
from mirage.errors import MirageError, UsageError

# DeepFloyd's own short timestep lists, as diffusers ships them (IFPipeline(..., timesteps=...)): --schedule NAME
SCHEDULES = ("fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100")


def named_timesteps(name: str, schedule: Schedule) -> tuple[int, ...]:
    """The published list `name` (fast27, smart50, super100, ...), for a model trained on 1000 timesteps."""
    if name not in SCHEDULES:
        raise UsageError(f"unknown --schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    if schedule.num_train_timesteps != 1000:
        raise UsageError(f"--schedule {name} lists timesteps of DeepFloyd IF's 1000-step schedule; this model "
                         f"was trained on {schedule.num_train_timesteps}: use --steps")
    from diffusers.pipelines.deepfloyd_if import timesteps as published  # here: see hub's loaders

    return tuple(getattr(published, f"{name}_timesteps"))


def load_stage(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               memory: str = "auto", text_encoder_from: str | None = None, cache_dir: str | Path | None = None,
               compile: bool | str | None = None):
    """IFStage or IFUpscaler, whichever `ref` is: stage II's UNet takes more channels than it denoises
    (the upscaled low-res image is concatenated to its input). `compile`: None (auto) compiles where the
    UNet is resident on a GPU; True also under offload; False never (see IFStage)."""
    check_plan(memory)
    dtype = dtype or hub.default_dtype(device)
    folder = hub.resolve(ref, (hub.UNET, hub.SCHEDULER), dtype)
    sched_cfg = hub.read_config(folder, hub.SCHEDULER)
    _, cond_channels, _ = _shape(hub.read_config(folder, hub.UNET), _learned(sched_cfg), folder)
    cls = IFUpscaler if cond_channels else IFStage
    return cls(ref, device, dtype, text_encoder=text_encoder_from, cache_dir=cache_dir, memory=memory,
               compile=compile)


class IFStage(UNetRuntime):
    """One IF stage (stage I here, stage II in IFUpscaler) from a hub id or a folder in the hub's layout.

    Prompts are encoded by the T5 of `text_encoder` (default: `ref` itself); give stage II the stage-I
    model there, whose T5 IF shares. `memory` is a plan name (memory.PLANS); `plan` is the plan in force
    once the UNet has loaded. Results come back on `device` whatever the plan computes on. `compile`: as
    UNetRuntime takes it.
    """

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None, memory: str = "auto",
                 compile: bool | str | None = None):
        self._device = torch.device(device)
        self._dtype = dtype or hub.default_dtype(self._device)
        self.ref = ref
        self.folder = hub.resolve(ref, (hub.UNET, hub.SCHEDULER), self._dtype)
        unet_cfg = hub.read_config(self.folder, hub.UNET)
        sched_cfg = hub.read_config(self.folder, hub.SCHEDULER)
        self.schedule = Schedule.from_config(sched_cfg)
        self.learned_variance = _learned(sched_cfg)
        self.channels, self.cond_channels, self.size = _shape(unet_cfg, self.learned_variance, self.folder)
        if self.is_upscaler != isinstance(self, IFUpscaler):
            raise MirageError(f"{ref} is an IF stage-{'II upscaler' if self.is_upscaler else 'I'} model; "
                              f"pass it as {'--upscaler' if self.is_upscaler else '--model'}")
        self.text = PromptEncoder(text_encoder or ref, self._device, self._dtype, cache_dir, memory)
        # Channels-last weights and inputs when resident on a GPU: measured on an H100 (bench/if_gpu.py), they
        # make IF-I-XL's call at 64 px 20 % faster and IF-II-L's at 256 px 30 % slower eagerly (its group norms),
        # 7 % faster where the fused scope compiles those (runtime.py decides as the UNet loads).
        self._init_runtime(memory, compile, channels_last=None if self.is_upscaler else True)

    @property
    def is_upscaler(self) -> bool:
        return self.cond_channels > 0

    def encode(self, prompts: list[str]) -> Cond:
        return Cond(embeds=self.text.encode(prompts))

    def __call__(self, x: Tensor, t: int, cond: Cond) -> tuple[Tensor, Tensor | None]:
        if self.is_upscaler and (cond.image is None or cond.level is None):
            raise ValueError("IF stage II needs cond.image and cond.level (from noised_condition)")
        out = self._run(x, t, cond)
        if not self.learned_variance:
            return out, None
        eps, var = out.split(self.channels, dim=1)
        return eps, var


class IFUpscaler(IFStage):
    """IF stage II: denoises at `size` conditioned on a low-res image upscaled and noised to a level."""

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None, memory: str = "auto",
                 compile: bool | str | None = None):
        super().__init__(ref, device, dtype, text_encoder, cache_dir, memory, compile)
        folder = hub.resolve(ref, (hub.NOISING,), self._dtype)
        self.noising = Schedule.from_config(hub.read_config(folder, hub.NOISING))

    def noised_condition(self, low_res: Tensor, noise: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """The low-res image [B, C, h, w] in [-1, 1], upscaled to `size` and noised to `level`, and the
        level per item, as IFSuperResolutionPipeline prepares them (bilinear, align_corners, add_noise)."""
        if not 0 <= level < self.noising.num_train_timesteps:
            raise UsageError(f"the noise level must be between 0 and {self.noising.num_train_timesteps - 1}, "
                             f"got {level}")
        up = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=True)
        levels = torch.full((up.shape[0],), level, dtype=torch.long, device=up.device)
        return self.noising.forward(up, levels, noise.to(up)), levels


def _learned(sched_cfg: dict) -> bool:
    return sched_cfg.get("variance_type") in ("learned", "learned_range")


def _shape(unet_cfg: dict, learned_variance: bool, folder: Path) -> tuple[int, int, int]:
    """(image channels, conditioning-image channels, size) from a UNet config."""
    out = unet_cfg.get("out_channels", 0)
    channels = out // 2 if learned_variance else out
    cond_channels = unet_cfg.get("in_channels", 0) - channels
    size = unet_cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if channels <= 0 or cond_channels < 0 or not isinstance(size, int):
        raise MirageError(f"{folder}/unet/config.json does not describe an IF UNet (in_channels, out_channels, "
                          f"sample_size: {unet_cfg.get('in_channels')}, {out}, {unet_cfg.get('sample_size')})")
    return channels, cond_channels, size


# ---- `mirage fetch` ---------------------------------------------------------------------------------
def fetch(ref: str, dtype: torch.dtype = torch.float16) -> Path:
    """Download what mirage needs of an IF stage: its UNet and schedulers, and T5 for a stage-I model."""
    stage = load_stage(ref, dtype=dtype)
    parts = (hub.NOISING,) if stage.is_upscaler else hub.TEXT_PARTS
    return hub.resolve(ref, parts, dtype)


def fetch_command(args) -> int:
    """`mirage fetch M [M ...]` (args.models; args.fp32 fetches full-precision weights instead of fp16)."""
    dtype = torch.float32 if getattr(args, "fp32", False) else torch.float16
    for ref in args.models:
        print(f"{ref}: {fetch(ref, dtype)}")
    return 0
