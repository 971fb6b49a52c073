"""From a model reference on the command line to a `Denoiser`: built-in names, .safetensors files of mirage's
own UNets, DeepFloyd IF hub ids and folders, or Stable Diffusion ones (sd.py: a folder whose model_index.json
names StableDiffusionPipeline, or the x4 upscaler's StableDiffusionUpscalePipeline)."""
from __future__ import annotations

from pathlib import Path

import torch

from mirage.backends import sd
from mirage.backends.deepfloyd import load_stage
from mirage.backends.small import BUILTIN, load_builtin, load_small
from mirage.engine.denoiser import Denoiser
from mirage.errors import UsageError

DEFAULT_UPSCALER = "DeepFloyd/IF-II-L-v1.0"


PICKLES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def is_small(ref: str) -> bool:
    return ref in BUILTIN or ref.endswith(".safetensors")


def check_not_pickle(ref: str) -> None:
    """A local weights file in a pickle format gets its own answer: mirage never unpickles (it runs code)."""
    if Path(ref).suffix.lower() in PICKLES and Path(ref).is_file():
        raise UsageError(f"{ref} is a pickle; mirage loads safetensors only and never unpickles: convert it "
                         f"with safetensors.torch.save_file(torch.load(F, weights_only=True), OUT.safetensors)")


def resolve_device(device: str = "auto") -> torch.device:
    """The device --device names, checked: one this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif chosen.type not in ("cpu", "mps"):
        raise UsageError(f"--device {device}: mirage runs on cpu or cuda")
    return chosen


def is_sd(ref: str) -> bool:
    """A Stable Diffusion model or the x4 upscaler (latent models), told without loading weights."""
    return not is_small(ref) and sd.kind_of(ref) is not None


def load_model(ref: str, device: torch.device, memory: str = "auto", compile: bool | str = False) -> Denoiser:
    """The stage-I (or only) model `ref` names; `compile` (False, or the compile scope) applies to IF's and SD's
    UNets on a GPU."""
    if is_small(ref):
        return (load_builtin(ref) if ref in BUILTIN else load_small(Path(ref))).to(device)
    check_not_pickle(ref)
    if is_sd(ref):
        return sd.load_sd(ref, device=device, memory=memory, compile=compile)
    return load_stage(ref, device=device, memory=memory, compile=compile)


def load_stage3(ref: str | None, device: torch.device, memory: str = "auto",
                compile: bool | str = False) -> Denoiser | None:
    """IF's third stage: the x4 upscaler (`none`: no third stage)."""
    if ref in (None, "none"):
        return None
    check_not_pickle(ref)
    if sd.kind_of(ref) != "upscale":
        raise UsageError(f"--stage3 takes the Stable Diffusion x4 upscaler (e.g. {sd.UPSCALERS[0]}) or none, "
                         f"got {ref}")
    return sd.load_sd(ref, device=device, memory=memory, compile=compile)


def load_upscaler(ref: str | None, stage1_ref: str, device: torch.device, memory: str = "auto",
                  compile: bool | str = False) -> Denoiser | None:
    """The super-resolution stage: `auto` is IF-II-L after an IF model and none after a small one."""
    if ref in (None, "none") or (ref == "auto" and (is_small(stage1_ref) or is_sd(stage1_ref))):
        return None
    if is_sd(stage1_ref):
        raise UsageError(f"--upscaler {ref}: IF's stage II upscales IF's stage I only; after Stable Diffusion "
                         f"give --upscaler none (or upscale its images with `mirage upscale`)")

    return load_stage(DEFAULT_UPSCALER if ref == "auto" else ref, device=device, memory=memory,
                      text_encoder_from=stage1_ref, compile=compile)
