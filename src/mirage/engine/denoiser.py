"""The `Denoiser` protocol every back end implements, and `Cond`, one batch of conditions."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from mirage.engine.schedule import Schedule


@dataclass(frozen=True)
class Cond:
    """Conditions for a batch; every field is per batch item along dim 0, or None.

    `embeds` is what the prompt became (T5 embeddings for IF, class indices for the small models);
    `image` is an image the model is conditioned on pixel by pixel (IF stage II: the noised, upscaled
    64-px image), so views act on it together with x; `level` is that image's noise level.
    """

    embeds: Tensor | None = None
    image: Tensor | None = None
    level: Tensor | None = None

    def __len__(self) -> int:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return 0

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        def join(name):
            parts = [getattr(c, name) for c in conds]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"cannot batch conditions with and without {name}")
            return torch.cat(parts)
        return Cond(**{f.name: join(f.name) for f in fields(Cond)})

    def take(self, index: slice | list[int]) -> "Cond":
        return Cond(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                       for f in fields(self)})

    def map_image(self, fn: Callable[[Tensor], Tensor]) -> "Cond":
        return self if self.image is None else replace(self, image=fn(self.image))

    def with_image(self, image: Tensor, level: Tensor | None = None) -> "Cond":
        return replace(self, image=image, level=level)

    def to(self, device=None, dtype=None) -> "Cond":
        def move(v):
            if v is None:
                return None
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return Cond(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@runtime_checkable
class Denoiser(Protocol):
    """(noisy image, timestep, condition) -> (noise estimate, learned variance or None), batched.

    `size` and `channels` describe the images it denoises; `schedule` is the one it was trained with.
    `encode` turns prompts into conditions ("" is the null condition). `device` and `dtype` are where and
    how it computes; the sampling loop keeps its own state in fp32.
    """

    schedule: Schedule
    size: int
    channels: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, prompts: list[str]) -> Cond: ...

    def __call__(self, x: Tensor, t: int, cond: Cond) -> tuple[Tensor, Tensor | None]: ...


# ---- the model's own space (DESIGN: "The seam for latent models") ------------------------------------
# A Denoiser may work in a space other than its images' pixels (Stable Diffusion: VAE latents). It says so by
# having `space_shape` (C, H, W of what it denoises), `encode_image(images, noise=None)` (into its space;
# `noise`, a sample.Noise, where encoding draws per image, as a VAE's sampling does) and `decode(x)` (back to
# images in [-1, 1]); `view_names` (the views that act on its grid, None: all) and `hybrid_kinds` likewise.
# Pixel models have none of these: each is the identity here, so tasks and the loop never ask what they hold.
def space_shape(model) -> tuple[int, int, int]:
    """The shape of one image in the model's space: (channels, size, size) for pixel models."""
    return tuple(getattr(model, "space_shape", None) or (model.channels, model.size, model.size))


def to_space(model, images: Tensor, noise=None) -> Tensor:
    encode = getattr(model, "encode_image", None)
    return images if encode is None else encode(images, noise)


def from_space(model, x: Tensor) -> Tensor:
    decode = getattr(model, "decode", None)
    return x if decode is None else decode(x)
