"""From a model reference on the command line to a `Denoiser`: built-in names, .safetensors files of mirage's
own UNets, or DeepFloyd IF hub ids and folders."""
from __future__ import annotations

from pathlib import Path

import torch

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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(ref: str, device: torch.device, memory: str = "auto", compile: bool = False) -> Denoiser:
    """The stage-I (or only) model `ref` names; `compile` applies to IF's UNets on a GPU."""
    if is_small(ref):
        return (load_builtin(ref) if ref in BUILTIN else load_small(Path(ref))).to(device)
    check_not_pickle(ref)
    return load_stage(ref, device=device, memory=memory, compile=compile)


def load_upscaler(ref: str | None, stage1_ref: str, device: torch.device, memory: str = "auto",
                  compile: bool = False) -> Denoiser | None:
    """The super-resolution stage: `auto` is IF-II-L after an IF model and none after a small one."""
    if ref in (None, "none") or (ref == "auto" and is_small(stage1_ref)):
        return None

    return load_stage(DEFAULT_UPSCALER if ref == "auto" else ref, device=device, memory=memory,
                      text_encoder_from=stage1_ref, compile=compile)
