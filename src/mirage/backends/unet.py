"""The course's UNet (Part B) with its time and class conditioning, plus a few switches that train faster.

Shape of the network (widths w0, w1, w2; the course uses D, D, 2D):

    x ─ ConvBlock(w0) ──────────────────────────────────────────────── cat ─ ConvBlock(w0) ─ conv ─ out
    28      └ DownBlock(w1) ─────────────────────────────── cat ─ UpBlock(w0) ┘
    14             └ DownBlock(w2) ───────────── cat ─ UpBlock(w1) ┘
     7                    └ Flatten ─ Unflatten ┘   (the global 1x1 bottleneck)

Conditioning as the course does it: t (t/T as one number) and the class (a one-hot vector, all zeros for
"no class") go through FCBlocks whose outputs modulate the unflattened bottleneck and the first up block:
h = c * h + t. Switches (all in the config, which is stored with the weights):
  - `norm`: "batch" (the course) or "group" (GroupNorm: independent of the batch, so EMA weights and
    batch-4 inference behave exactly like training);
  - `time_features`: 0 feeds t/T itself (the course); k > 0 feeds k sinusoids of t/T, which the FCBlocks
    separate far more easily than one number;
  - `film`: also scale and shift the output of every ConvBlock by the (time + class) embedding, so all
    resolutions know the noise level, not only the two modulated layers;
  - `target`: "eps" (DDPM) or "x0" (the one-step denoiser, no time or class input).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COURSE = dict(widths=[64, 64, 128], norm="batch", time_features=0, film=False)
DEFAULT = dict(widths=[32, 64, 128], norm="group", time_features=16, film=True)


def model_config(preset: str = "default", *, size: int = 28, channels: int = 1, num_classes: int = 0,
                 time_cond: bool = True, target: str = "eps", **overrides) -> dict:
    """A complete architecture config; `preset` is "course" or "default", `overrides` replace its keys."""
    presets = {"course": COURSE, "default": DEFAULT}
    if preset not in presets:
        raise ValueError(f"unknown architecture preset {preset!r}: use one of {', '.join(presets)}")
    if size % 4:
        raise ValueError(f"the UNet halves the image twice: size must be a multiple of 4, got {size}")
    return dict(presets[preset], size=size, channels=channels, num_classes=num_classes, time_cond=time_cond,
                target=target, **overrides)


def _norm(kind: str, width: int) -> nn.Module:
    return nn.BatchNorm2d(width) if kind == "batch" else nn.GroupNorm(min(8, width // 4), width)


class ConvBlock(nn.Module):
    """Two (3x3 conv, norm, GELU); with `emb` the result is scaled and shifted by it (FiLM)."""

    def __init__(self, cin: int, cout: int, norm: str, emb_dim: int = 0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.GELU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout), nn.GELU())
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.net(x)
        if self.film is None or emb is None:
            return h
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


class DownBlock(nn.Module):
    """Halve the resolution (3x3 conv, stride 2), then a ConvBlock."""

    def __init__(self, cin: int, cout: int, norm: str, emb_dim: int = 0):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), _norm(norm, cout), nn.GELU())
        self.block = ConvBlock(cout, cout, norm, emb_dim)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.block(self.down(x), emb)


class UpBlock(nn.Module):
    """Double the resolution (4x4 transposed conv, stride 2), then a ConvBlock."""

    def __init__(self, cin: int, cout: int, norm: str, emb_dim: int = 0):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), _norm(norm, cout),
                                nn.GELU())
        self.block = ConvBlock(cout, cout, norm, emb_dim)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.block(self.up(x), emb)


class Flatten(nn.Module):
    """7x7 -> 1x1 by average pooling, as the course does."""

    def __init__(self, pool: int):
        super().__init__()
        self.pool = nn.AvgPool2d(pool)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.pool(x))


class Unflatten(nn.Module):
    """1x1 -> 7x7 by a transposed conv with a 7x7 kernel."""

    def __init__(self, width: int, pool: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(width, width, pool, stride=pool), _norm(norm, width),
                                 nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FCBlock(nn.Module):
    """Linear, GELU, Linear: how the course turns t and the class vector into modulations."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cin, cout), nn.GELU(), nn.Linear(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def time_features(t: Tensor, k: int) -> Tensor:
    """t in [0, 1] as itself (k = 0) or as k sinusoids of geometric frequencies, [B, max(k, 1)]."""
    t = t.float().reshape(-1, 1)
    if k == 0:
        return t
    freqs = torch.exp(torch.linspace(0, math.log(1000), k // 2, device=t.device))
    angles = t * freqs * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class UNet(nn.Module):
    """forward(x [B,C,H,W], t [B] in [0,1] or None, c [B] class index, -1 = none, or None) -> [B,C,H,W]."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        w0, w1, w2 = config["widths"]
        norm, k = config["norm"], config["time_features"]
        pool = config["size"] // 4
        self.num_classes = config["num_classes"]
        self.time_cond = config["time_cond"]
        emb = w2 if config["film"] and (self.time_cond or self.num_classes) else 0
        self.inp = ConvBlock(config["channels"], w0, norm, emb)
        self.down1 = DownBlock(w0, w1, norm, emb)
        self.down2 = DownBlock(w1, w2, norm, emb)
        self.flatten = Flatten(pool)
        self.unflatten = Unflatten(w2, pool, norm)
        self.up1 = UpBlock(2 * w2, w1, norm, emb)
        self.up2 = UpBlock(2 * w1, w0, norm, emb)
        self.out_block = ConvBlock(2 * w0, w0, norm, emb)
        self.out = nn.Conv2d(w0, config["channels"], 3, padding=1)
        tin = max(k, 1)
        # the course's modulation of the bottleneck (width w2) and of up1's output (width w1)
        self.t1, self.t2 = (FCBlock(tin, w2), FCBlock(tin, w1)) if self.time_cond else (None, None)
        n = self.num_classes
        self.c1, self.c2 = (FCBlock(n, w2), FCBlock(n, w1)) if n else (None, None)
        self.t_emb = FCBlock(tin, emb) if emb and self.time_cond else None
        self.c_emb = FCBlock(n, emb) if emb and n else None

    def forward(self, x: Tensor, t: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        tf = time_features(t, self.config["time_features"]) if self.time_cond else None
        onehot = None
        if self.num_classes:
            c = torch.full((x.shape[0],), -1, device=x.device) if c is None else c
            # index -1 (or anything out of range) is the null condition: the all-zero vector
            valid = (c >= 0) & (c < self.num_classes)
            onehot = F.one_hot(c.clamp(0, self.num_classes - 1).long(), self.num_classes).float()
            onehot = onehot * valid[:, None].float()
        emb = self._embedding(tf, onehot)

        h0 = self.inp(x, emb)
        h1 = self.down1(h0, emb)
        h2 = self.down2(h1, emb)
        h = self.unflatten(self.flatten(h2))
        h = self._modulate(h, self.c1, self.t1, onehot, tf)
        h = self.up1(torch.cat([h, h2], 1), emb)
        h = self._modulate(h, self.c2, self.t2, onehot, tf)
        h = self.up2(torch.cat([h, h1], 1), emb)
        h = self.out_block(torch.cat([h, h0], 1), emb)
        return self.out(h)

    def _embedding(self, tf: Tensor | None, onehot: Tensor | None) -> Tensor | None:
        parts = [f(v) for f, v in ((self.t_emb, tf), (self.c_emb, onehot)) if f is not None]
        return F.gelu(sum(parts)) if parts else None

    @staticmethod
    def _modulate(h: Tensor, fc_c, fc_t, onehot, tf) -> Tensor:
        if fc_c is not None:
            h = h * fc_c(onehot)[:, :, None, None]
        if fc_t is not None:
            h = h + fc_t(tf)[:, :, None, None]
        return h
