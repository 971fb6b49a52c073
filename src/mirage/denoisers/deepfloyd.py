"""DeepFloyd IF stage I (text -> 64 px) and stage II (64 -> 256 px upscaler) as Denoisers, via diffusers.

Sizes, channels and schedules come from the model's own configs. The UNet is loaded on the first call, so
that prompts are encoded (and T5 freed) before it takes any memory.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import hub
from ..errors import MirageError, UsageError
from ..prompts import PromptEncoder
from ..schedule import Schedule
from .base import Cond

MEMORY_PLANS = ("auto", "gpu")  # the leaner plans (offload, 8-bit T5, ...) come with the memory work


def load_stage(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               memory: str = "auto", text_encoder_from: str | None = None, cache_dir: str | Path | None = None):
    """IFStage or IFUpscaler, whichever `ref` is: stage II's UNet takes more channels than it denoises
    (the upscaled low-res image is concatenated to its input)."""
    if memory not in MEMORY_PLANS:
        raise UsageError(f"memory plan {memory!r} is not available; use one of {', '.join(MEMORY_PLANS)}")
    dtype = dtype or hub.default_dtype(device)
    folder = hub.resolve(ref, (hub.UNET, hub.SCHEDULER), dtype)
    sched_cfg = hub.read_config(folder, hub.SCHEDULER)
    _, cond_channels, _ = _shape(hub.read_config(folder, hub.UNET), _learned(sched_cfg), folder)
    cls = IFUpscaler if cond_channels else IFStage
    return cls(ref, device, dtype, text_encoder=text_encoder_from, cache_dir=cache_dir)


class IFStage:
    """One IF stage (stage I here, stage II in IFUpscaler) from a hub id or a folder in the hub's layout.

    Prompts are encoded by the T5 of `text_encoder` (default: `ref` itself); give stage II the stage-I
    model there, whose T5 IF shares.
    """

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None):
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
        self.text = PromptEncoder(text_encoder or ref, self._device, self._dtype, cache_dir)
        self._unet = None

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def is_upscaler(self) -> bool:
        return self.cond_channels > 0

    def encode(self, prompts: list[str]) -> Cond:
        return Cond(embeds=self.text.encode(prompts))

    # ---- the UNet -----------------------------------------------------------------------------------
    def unet(self):
        if self._unet is None:
            unet = hub.load_unet(self.folder, hub.UNET, self._device, self._dtype)
            if self._device.type == "cuda":
                unet = unet.to(memory_format=torch.channels_last)
            self._unet = unet  # diffusers' default attention processors already use SDPA
        return self._unet

    def free(self) -> None:
        """Drop the UNet (it is loaded again on the next call)."""
        self._unet = None
        hub.release(self._device)

    def __call__(self, x: Tensor, t: int, cond: Cond) -> tuple[Tensor, Tensor | None]:
        if self.is_upscaler and (cond.image is None or cond.level is None):
            raise ValueError("IF stage II needs cond.image and cond.level (from noised_condition)")
        inp = x if cond.image is None else torch.cat([x, cond.image.to(x)], dim=1)
        inp = inp.to(self._device, self._dtype)
        if self._device.type == "cuda":
            inp = inp.contiguous(memory_format=torch.channels_last)
        level = None if cond.level is None else cond.level.to(self._device)
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            out = self.unet()(inp, torch.tensor(t, device=self._device), return_dict=False, class_labels=level,
                              encoder_hidden_states=cond.embeds.to(self._device, self._dtype))[0]
        out = out.float()
        if not self.learned_variance:
            return out, None
        eps, var = out.split(self.channels, dim=1)
        return eps, var


class IFUpscaler(IFStage):
    """IF stage II: denoises at `size` conditioned on a low-res image upscaled and noised to a level."""

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None):
        super().__init__(ref, device, dtype, text_encoder, cache_dir)
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
