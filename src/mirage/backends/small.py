"""mirage's own small UNets (course Part B) as `Denoiser` back ends: the built-in `fashion` and `digits`
models shipped in mirage/builtin/, or any `model.safetensors` that `mirage train ddpm` wrote.

A checkpoint is a safetensors file whose metadata holds {"format": "mirage-small-unet", "config": JSON}; the
config says the architecture (backends/unet.py), the noise schedule (diffusers' scheduler keys), the data set
and its class names. Prompts are class names, matched forgivingly; "" is the null class (index -1).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from mirage.backends.classes import match_class
from mirage.backends.unet import UNet
from mirage.engine.denoiser import Cond
from mirage.engine.schedule import Schedule
from mirage.errors import MirageError, UsageError

FORMAT = "mirage-small-unet"
BUILTIN = ("fashion", "digits")  # shipped in mirage/builtin/: a model, its classifier and its guide each
NULL_CLASS = -1


class SmallUNet:
    """A trained train.unet.UNet that predicts noise, with its schedule and class names."""

    def __init__(self, net: torch.nn.Module, config: dict, name: str = ""):
        if config.get("target", "eps") != "eps":
            raise MirageError(f"{name or 'this model'} is a one-step denoiser, not a diffusion model: "
                              f"it cannot sample (train one with `mirage train ddpm`)")
        self.net = net.eval().requires_grad_(False)
        self.config = config
        self.name = name
        self.schedule = Schedule.from_config(config["schedule"])
        self.size = config["size"]
        self.channels = config["channels"]
        self.data = config.get("data")
        self.class_names: list[str] = list(config.get("class_names") or [])

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def to(self, device=None, dtype=None) -> "SmallUNet":
        self.net.to(device=device, dtype=dtype)
        return self

    def encode(self, prompts: list[str]) -> Cond:
        """Class indices, -1 for ""; an unknown class name raises a UsageError listing the known ones."""
        return Cond(embeds=torch.tensor([self.class_index(p) for p in prompts], dtype=torch.long,
                                        device=self.device))

    def class_index(self, prompt: str) -> int:
        if not self.class_names:
            if prompt.strip():
                raise UsageError(f"{self.name or 'this model'} has no classes: give the empty prompt \"\"")
            return NULL_CLASS

        k = match_class(self.data, prompt)
        return NULL_CLASS if k is None else k

    @torch.inference_mode()
    def __call__(self, x: Tensor, t: int, cond: Cond) -> tuple[Tensor, None]:
        n = x.shape[0]
        tt = torch.full((n,), t / self.schedule.num_train_timesteps, device=self.device)
        classes = cond.embeds.to(self.device) if cond.embeds is not None else None
        eps = self.net(x.to(self.device, self.dtype), tt, classes)
        return eps.to(x.dtype), None


def read_checkpoint(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of a mirage small-UNet file, or a one-line MirageError saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise MirageError(f"no model file at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MirageError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None
    if "optim" in meta:  # a training state (weights, EMA, optimizer) rather than the model it trains
        raise UsageError(f"{path} is a training state (for --resume): use the run's model.safetensors beside it")
    if meta.get("format") != FORMAT or "config" not in meta:
        raise MirageError(f"{path} is not a mirage small-UNet checkpoint (its metadata has no {FORMAT} config)")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise MirageError(f"{path}: the config in its metadata is not valid JSON") from None
    return config, tensors


def build(config: dict, tensors: dict[str, Tensor], source: str) -> torch.nn.Module:
    """The UNet the config describes with these weights (fp32), or a MirageError if they do not fit."""
    try:
        net = UNet(config)
    except (KeyError, TypeError, ValueError) as e:
        raise MirageError(f"{source}: its config does not describe a mirage UNet ({e.__class__.__name__}: {e})") \
            from None
    try:
        net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise MirageError(f"{source}: the weights do not fit the architecture in its config ({first[:160]})") \
            from None
    return net


def load_small(path: str | Path) -> SmallUNet:
    """A model.safetensors written by `mirage train ddpm` (or a built-in file), on the CPU in fp32."""
    path = Path(path)
    config, tensors = read_checkpoint(path)
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # it would sample black images
        raise MirageError(f"{path}: its weights hold NaN or inf values (in {bad}); the file is damaged or its "
                          f"training diverged")
    return SmallUNet(build(config, tensors, str(path)), config, name=path.name)


def builtin_path(name: str, kind: str = "model") -> Path:
    """A shipped file of data set `name`: its model, or its "classifier" or "guide" (quality.classifier)."""
    stem = name if kind == "model" else f"{kind}_{name}"
    return Path(str(resources.files("mirage") / "builtin" / f"{stem}.safetensors"))


def load_builtin(name: str) -> SmallUNet:
    """The shipped `fashion` or `digits` model."""
    path = builtin_path(name)
    if not path.is_file():
        raise MirageError(f"the built-in model {name!r} is not installed (expected {path})")
    model = load_small(path)
    model.name = name
    return model
