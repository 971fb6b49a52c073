"""Linear filters for factorized diffusion (hybrid images) and the course's blur baseline.

`make_components(kind, size)` splits an image (or a noise estimate) [..., C, H, W] into parts that add up
to it exactly: low/high pass, low/mid/high, grayscale/color, motion-blurred/the rest. Blur sizes are given
at 64 px (IF stage I: a 33-tap Gaussian with sigma 2) and scaled with the resolution, so a hybrid keeps
its look at 28 or 256 px.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.errors import UsageError

BASE = 64  # the resolution the filter sizes below are given at
SIGMA = 2.0  # low/high split
BAND_SIGMAS = (1.0, 4.0)  # high/mid and mid/low splits of a triple hybrid
MOTION_LENGTH, MOTION_ANGLE = 13.0, 45.0  # px at 64 px, degrees counterclockwise from the x axis


def gaussian_blur(x: Tensor, kernel: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of [..., C, H, W] with reflect padding (as torchvision's gaussian_blur)."""
    if kernel < 1 or kernel % 2 == 0 or not sigma > 0:
        raise UsageError(f"a Gaussian blur needs an odd kernel size and sigma > 0; got {kernel}, {sigma}")
    r = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    taps = torch.exp(-0.5 * (r / sigma) ** 2)
    taps = taps / taps.sum()
    return _conv(_conv(x, taps[:, None]), taps[None, :])  # separable: two 1-D passes


def _conv(x: Tensor, kernel: Tensor) -> Tensor:
    """x convolved with one 2-D kernel per channel, reflect-padded so the size stays."""
    kh, kw = kernel.shape
    flat = x.reshape(-1, 1, *x.shape[-2:])
    if kh // 2 >= x.shape[-2] or kw // 2 >= x.shape[-1]:
        raise UsageError(f"a {kh}x{kw} filter is too large for a {x.shape[-2]}x{x.shape[-1]} image")
    flat = F.pad(flat, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(flat, kernel.to(x).reshape(1, 1, kh, kw)).reshape(x.shape)


def lowpass(size: int, sigma: float = SIGMA) -> Callable[[Tensor], Tensor]:
    """The Gaussian low pass for images of `size` px, given by its sigma at 64 px; the kernel is 33 taps
    at sigma 2 (16 sigmas wide) and scales with it and with the size, capped by what reflect padding allows."""
    scale = size / BASE
    half = min(max(1, round(8 * sigma * scale)), size - 1)
    return lambda x: gaussian_blur(x, 2 * half + 1, sigma * scale)


def grayscale(x: Tensor) -> Tensor:
    """The channel mean, in every channel."""
    return x.mean(-3, keepdim=True).expand_as(x)


def motion_kernel(length: float, angle: float) -> Tensor:
    """A line of `length` px at `angle` degrees (counterclockwise on the screen), antialiased, sum 1."""
    side = 2 * math.ceil((length - 1) / 2) + 1
    kernel = torch.zeros(side * side, dtype=torch.float64)
    t = torch.linspace(-0.5, 0.5, 8 * side, dtype=torch.float64) * (length - 1)
    a = math.radians(angle)
    ys, xs = side // 2 - t * math.sin(a), side // 2 + t * math.cos(a)
    y0, x0 = ys.floor(), xs.floor()
    for dy in (0, 1):  # bilinear splat of points along the line
        for dx in (0, 1):
            w = (1 - (ys - y0 - dy).abs()) * (1 - (xs - x0 - dx).abs())
            yi, xi = (y0 + dy).long(), (x0 + dx).long()
            ok = (yi < side) & (xi < side)  # the far neighbour of a point on the last row or column (weight 0)
            kernel.index_add_(0, (yi * side + xi)[ok], w[ok])
    kernel = kernel.reshape(side, side)
    return kernel / kernel.sum()


def motion_blur(size: int, length: float = MOTION_LENGTH, angle: float = MOTION_ANGLE):
    kernel = motion_kernel(max(1.0, length * size / BASE), angle)
    return lambda x: _conv(x, kernel)


@dataclass(frozen=True)
class Component:
    """One part of an image; the parts of one kind sum to the image."""

    name: str
    fn: Callable[[Tensor], Tensor]
    size: int

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise UsageError(f"the {self.name} filter was made for {self.size} px images, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        return self.fn(x)


def _rest(*parts: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """x minus the parts: makes the components add up to x exactly (up to rounding)."""
    return lambda x: x - sum(p(x) for p in parts)


# each factorization's components, in order: the names prompts are given under (`mirage hybrid --low ...`)
PARTS = {"lowhigh": ("low", "high"), "lowmidhigh": ("low", "mid", "high"), "graycolor": ("gray", "color"),
         "motion": ("motion", "still")}
KINDS = tuple(PARTS)


def _kinds(size: int, sigma: float) -> dict[str, list[Callable]]:
    low = lowpass(size, sigma)
    fine, coarse = (lowpass(size, s) for s in BAND_SIGMAS)
    blur = motion_blur(size)
    return {
        "lowhigh": [low, _rest(low)],
        "lowmidhigh": [coarse, lambda x: fine(x) - coarse(x), _rest(fine)],
        "graycolor": [grayscale, _rest(grayscale)],
        "motion": [blur, _rest(blur)],
    }


def make_components(kind: str, size: int, sigma: float = SIGMA) -> list[Component]:
    """The parts of a `kind` factorization for `size` px images, in order (e.g. low, high); `sigma` (at
    64 px) is the low/high split."""
    if kind not in KINDS:
        raise UsageError(f"unknown hybrid kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if not sigma > 0:
        raise UsageError(f"--sigma must be a number > 0, got {sigma}")
    return [Component(name, fn, size) for name, fn in zip(PARTS[kind], _kinds(size, sigma)[kind])]
