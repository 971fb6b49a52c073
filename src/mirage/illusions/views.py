"""Visual-anagram views: maps of an image with their exact inverses, for square images of any size.

Every view but `negate` is a pixel permutation, so it keeps Gaussian noise Gaussian. A permutation view is
described by rigid *pieces* (a patch, a jigsaw piece, the inner disc, the whole image) that each move and turn
by a multiple of 90 or 180 degrees; the permutation is where every pixel lands at the end of that motion, and
the same motion drives the animation (`View.frames`). Nothing is stored: each size is built on first use from
the seed and cached.

Geometry is laid out on a *cell grid* of at most 64 cells per side (the largest divisor of the size that fits):
at 64 px a cell is a pixel, at 256 px a 4x4 block. So a view at 256 px is its 64-px self with every pixel
blown up, and IF's stage II (256 px) sees the same illusion that stage I (64 px) made.

Coordinates are (y, x) of pixel centres, y pointing down; angles turn counterclockwise on the screen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.errors import UsageError

MAX_CELLS = 64  # cells per side of the grid the views are laid out on (IF stage I works at 64 px)


def _size_of(x: Tensor) -> int:
    if x.dim() < 3 or x.shape[-1] != x.shape[-2]:
        raise UsageError(f"views work on square images [..., C, H, W]; got shape {tuple(x.shape)}")
    return x.shape[-1]


def _cells(size: int) -> int:
    return max(d for d in range(1, min(size, MAX_CELLS) + 1) if size % d == 0)


def _ease(n: int) -> list[float]:
    """n times from 0 to 1, slow at both ends (smoothstep)."""
    if n < 2:
        raise UsageError(f"an animation needs at least 2 frames, got {n}")
    return [t * t * (3 - 2 * t) for t in (k / (n - 1) for k in range(n))]


def _turn(angle: Tensor, dy: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets (dy, dx) turned counterclockwise on the screen by `angle` radians."""
    c, s = torch.cos(angle), torch.sin(angle)
    return dy * c - dx * s, dx * c + dy * s


def _pixel_coords(size: int) -> Tensor:
    """[N, 2] (y, x) of every pixel, in raster order."""
    r = torch.arange(size, dtype=torch.float64)
    return torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)


# ---- drawing on a canvas -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Canvas:
    """A square frame of side `size` with the image drawn `inner` px wide in its middle."""

    image: int
    size: int
    inner: int

    @classmethod
    def of(cls, image: int, size: int | None, pad: float) -> "_Canvas":
        size = size or image
        return cls(image, size, max(1, round(size / (1 + 2 * pad))))

    @property
    def offset(self) -> int:
        return (self.size - self.inner) // 2

    @property
    def scale(self) -> float:
        return self.inner / self.image

    @property
    def mode(self) -> str:
        # small images (28 or 64 px) are shown blown up: keep their pixels crisp
        return "nearest" if self.scale >= 2 else "bilinear"

    def blank(self, img: Tensor, fill: float) -> Tensor:
        return img.new_full((*img.shape[:-2], self.size, self.size), fill)

    def place(self, img: Tensor, fill: float) -> Tensor:
        flat = img.reshape(-1, *img.shape[-3:])
        if self.mode == "nearest":
            small = F.interpolate(flat, size=(self.inner, self.inner), mode="nearest-exact")
        else:
            small = F.interpolate(flat, size=(self.inner, self.inner), mode="bilinear", align_corners=False,
                                  antialias=self.inner < self.image)
        out, o = self.blank(img, fill), self.offset
        out[..., o:o + self.inner, o:o + self.inner] = small.reshape(*img.shape[:-2], self.inner, self.inner)
        return out

    def image_coords(self) -> tuple[Tensor, Tensor]:
        """(dy, dx) of every canvas pixel in image pixels from the image centre, [size, size] each."""
        r = (torch.arange(self.size, dtype=torch.float64) + 0.5 - self.offset) / self.scale - self.image / 2
        return torch.meshgrid(r, r, indexing="ij")

    def warp(self, img: Tensor, sy: Tensor, sx: Tensor, fill: float) -> Tensor:
        """Each canvas pixel takes the image at (sy, sx) (offsets from the centre); outside is `fill`."""
        h = self.image / 2
        grid = torch.stack([sx / h, sy / h], -1).to(img.dtype).to(img.device)
        flat = img.reshape(-1, *img.shape[-3:])
        grid = grid.expand(flat.shape[0], -1, -1, -1)
        both = torch.cat([flat, torch.ones_like(flat[:, :1])], 1)  # the last channel says how much is covered
        out = F.grid_sample(both, grid, mode=self.mode, padding_mode="zeros", align_corners=False)
        covered = out[:, -1:]
        out = out[:, :-1] + (1 - covered) * fill
        return out.reshape(*img.shape[:-2], self.size, self.size)

    def splat(self, img: Tensor, pos: Tensor, priority: Tensor, fill: float) -> Tensor:
        """Every image pixel drawn as a small square at `pos` ([N, 2] image pixel coordinates); where
        squares overlap, the higher priority shows. Squares are one canvas pixel larger than a cell so
        that turning pieces leave no holes."""
        n = self.image
        side = math.ceil(self.scale) + 1
        centre = self.offset + (pos + 0.5) * self.scale
        top = torch.floor(centre - side / 2 + 0.5).long()
        steps = torch.arange(side)
        ys = top[:, :1] + steps.repeat_interleave(side)
        xs = top[:, 1:] + steps.repeat(side)
        inside = (ys >= 0) & (ys < self.size) & (xs >= 0) & (xs < self.size)
        target = (ys * self.size + xs)[inside]
        prio = priority[:, None].expand(-1, side * side)[inside]
        best = torch.full((self.size * self.size,), -1, dtype=torch.long).scatter_reduce(
            0, target, prio, "amax")
        shown = best >= 0
        source = (best[shown] % (n * n)).to(img.device)
        out = self.blank(img, fill).reshape(*img.shape[:-2], -1)
        out[..., shown.to(img.device)] = img.reshape(*img.shape[:-2], -1)[..., source]
        return out.reshape(*img.shape[:-2], self.size, self.size)


# ---- views --------------------------------------------------------------------------------------
class View:
    """A map of images [..., C, H, W] (H == W, any size) with its exact inverse."""

    name: str = ""
    margin: float = 0.0  # how far its animation reaches beyond the image, as a fraction of the image side

    def view(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse_variance(self, v: Tensor) -> Tensor:
        """A per-pixel variance (or IF's variance code) moves with the pixels but keeps its sign."""
        return self.inverse(v)

    def frames(self, img: Tensor, n: int, size: int | None = None, pad: float = 0.0,
               fill: float = 1.0) -> list[Tensor]:
        """n images going smoothly from `img` to `view(img)`, each [..., C, size, size] (default: the image
        size) with the image drawn `pad` image-sides from the border and `fill` (white) around it."""
        canvas = _Canvas.of(_size_of(img), size, pad)
        ts = _ease(n)
        middle = [self._frame(img, t, canvas, fill) for t in ts[1:-1]]
        return [canvas.place(img, fill), *middle, canvas.place(self.view(img), fill)]

    def _frame(self, img: Tensor, t: float, canvas: _Canvas, fill: float) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Identity(View):
    name = "identity"

    def view(self, x: Tensor) -> Tensor:
        return x

    inverse = view

    def _frame(self, img, t, canvas, fill):
        return canvas.place(img, fill)


class Negate(View):
    name = "negate"

    def view(self, x: Tensor) -> Tensor:
        return -x

    inverse = view

    def inverse_variance(self, v: Tensor) -> Tensor:
        return v

    def _frame(self, img, t, canvas, fill):
        return canvas.place((1 - 2 * t) * img, fill)  # a crossfade from the image to its negative


@dataclass(frozen=True)
class Pieces:
    """Rigid pieces: pixel i belongs to piece[i]; piece p moves its centroid from src[p] to dst[p] while
    turning by angle[p]."""

    piece: Tensor  # [N] long
    src: Tensor  # [P, 2] float64 centroids
    dst: Tensor  # [P, 2]
    angle: Tensor  # [P] radians

    @classmethod
    def rigid(cls, piece: Tensor, angle: Tensor, pivot: Tensor, moved_pivot: Tensor) -> "Pieces":
        """Piece p ends up turned by angle[p] about pivot[p], with the pivot moved to moved_pivot[p]."""
        size = math.isqrt(piece.numel())
        angle = angle.to(torch.float64)
        count = angle.numel()
        sums = torch.zeros(count, 2, dtype=torch.float64).index_add_(0, piece, _pixel_coords(size))
        src = sums / torch.bincount(piece, minlength=count).clamp(min=1)[:, None].to(torch.float64)
        dy, dx = _turn(angle, src[:, 0] - pivot[:, 0], src[:, 1] - pivot[:, 1])
        return cls(piece, src, torch.stack([dy, dx], -1) + moved_pivot, angle)

    def positions(self, t: float, centres: Tensor | None = None) -> Tensor:
        """[N, 2] where every pixel is at time t; `centres` ([P, 2]) overrides the straight centroid path."""
        size = math.isqrt(self.piece.numel())
        centres = self.src + t * (self.dst - self.src) if centres is None else centres
        off = _pixel_coords(size) - self.src[self.piece]
        dy, dx = _turn(self.angle[self.piece] * t, off[:, 0], off[:, 1])
        return torch.stack([dy, dx], -1) + centres[self.piece]


def _upsample(labels: Tensor, size: int) -> Tensor:
    """A label map on the cell grid blown up to `size` pixels per side."""
    k = size // labels.shape[0]
    return labels.repeat_interleave(k, 0).repeat_interleave(k, 1)


class Permutation(View):
    """A view that moves pixels (and never changes them), built per size from `pieces(size)`."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._pieces: dict[int, Pieces] = {}
        self._perms: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def pieces(self, size: int) -> Pieces:
        if size not in self._pieces:
            self._pieces[size] = self._build(size)
        return self._pieces[size]

    def _build(self, size: int) -> Pieces:
        raise NotImplementedError

    def positions(self, size: int, t: float) -> Tensor:
        return self.pieces(size).positions(t)

    def permutation(self, size: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """(perm, inverse) with view(x).flat[j] = x.flat[perm[j]]."""
        key = (size, str(device))
        if key not in self._perms:
            # made outside inference mode, as it outlives the call: classifier guidance differentiates views
            with torch.inference_mode(False):
                end = self.positions(size, 1.0).round().long()
                dest = end[:, 0] * size + end[:, 1]
                if not torch.equal(torch.sort(dest).values, torch.arange(size * size)):
                    raise RuntimeError(f"view {self.name} is not a permutation at {size} px (a bug in mirage)")
                perm = torch.empty_like(dest)
                perm[dest] = torch.arange(size * size)
                self._perms[key] = (perm.to(device), dest.to(device))
        return self._perms[key]

    def _apply(self, x: Tensor, which: int) -> Tensor:
        size = _size_of(x)
        index = self.permutation(size, x.device)[which]
        return x.reshape(*x.shape[:-2], size * size)[..., index].reshape(x.shape)

    def view(self, x: Tensor) -> Tensor:
        return self._apply(x, 0)

    def inverse(self, x: Tensor) -> Tensor:
        return self._apply(x, 1)

    def _frame(self, img, t, canvas, fill):
        size = canvas.image
        pieces = self.pieces(size)
        # whole pieces stack on each other (later pieces on top), pixels of one piece in raster order
        priority = pieces.piece * size * size + torch.arange(size * size)
        return canvas.splat(img, self.positions(size, t), priority, fill)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, seed={self.seed})"


def _whole(size: int, angle: float) -> Pieces:
    """The whole image as one piece turning about its centre."""
    centre = torch.full((1, 2), (size - 1) / 2, dtype=torch.float64)
    return Pieces.rigid(torch.zeros(size * size, dtype=torch.long), torch.tensor([angle]), centre, centre)


class Rotate(Permutation):
    margin = (math.sqrt(2) - 1) / 2  # the corners of a square turned 45 degrees

    def __init__(self, name: str, quarter_turns: int, seed: int = 0):
        super().__init__(seed)
        self.name, self.angle = name, quarter_turns * math.pi / 2

    def _build(self, size):
        return _whole(size, self.angle)

    def _frame(self, img, t, canvas, fill):
        dy, dx = canvas.image_coords()
        sy, sx = _turn(torch.tensor(-self.angle * t, dtype=torch.float64), dy, dx)
        return canvas.warp(img, sy, sx, fill)


class Flip(Permutation):
    """Upside down (axis 0) or left-right (axis 1); animated as a card turning over in perspective."""

    margin = 1 / 6  # the near edge of the turning card looks 4/3 as wide (camera 4 half-sides away)
    CAMERA = 4.0

    def __init__(self, name: str, axis: int, seed: int = 0):
        super().__init__(seed)
        self.name, self.axis = name, axis

    def _build(self, size):
        return _whole(size, 0.0)

    def positions(self, size, t):
        pos = _pixel_coords(size)
        c = (size - 1) / 2
        pos[:, self.axis] = c + (pos[:, self.axis] - c) * math.cos(math.pi * t)
        return pos

    def _frame(self, img, t, canvas, fill):
        h, d = canvas.image / 2, self.CAMERA
        dy, dx = canvas.image_coords()
        across, along = (dy / h, dx / h) if self.axis == 0 else (dx / h, dy / h)
        c, s = math.cos(math.pi * t), math.sin(math.pi * t)
        # the card turned by pi*t about its middle line, seen from `d` half-sides away: invert the projection
        denom = c * d - across * s
        src_across = across * d / torch.where(denom.abs() < 1e-9, torch.full_like(denom, 1e-9), denom)
        src_along = along * (d + src_across * s) / d
        bad = (denom.abs() < 1e-9) | (src_across.abs() > 1) | (src_along.abs() > 1)
        src_across, src_along = src_across.masked_fill(bad, 2.0), src_along.masked_fill(bad, 2.0)
        sy, sx = (src_across, src_along) if self.axis == 0 else (src_along, src_across)
        return canvas.warp(img, sy * h, sx * h, fill)


class Skew(Permutation):
    """Column x slides down (wrapping around) by half of x: a circular shift that grows across the image."""

    name = "skew"

    def _shift(self, size: int) -> Tensor:
        k = size // _cells(size)
        x = _pixel_coords(size)[:, 1].long()
        return ((x // k) // 2 * k).to(torch.float64)

    def _build(self, size):
        columns = _pixel_coords(size)[:, 1].long()
        zero = torch.zeros(size, 2, dtype=torch.float64)
        return Pieces.rigid(columns, torch.zeros(size), zero, zero)

    def positions(self, size, t):
        pos = _pixel_coords(size)
        pos[:, 0] = torch.remainder(pos[:, 0] + t * self._shift(size) + 0.5, size) - 0.5
        return pos


class BlockPermute(Permutation):
    """Square blocks on a `per_side` grid, shuffled by a seeded random permutation."""

    def __init__(self, name: str, per_side, seed: int = 0):
        super().__init__(seed)
        self.name, self._per_side = name, per_side

    def _build(self, size):
        g = self._per_side(size)
        k = size // g
        cells = torch.arange(g * g).reshape(g, g)
        piece = _upsample(cells, size).reshape(-1)
        moved = torch.randperm(g * g, generator=torch.Generator().manual_seed(self.seed))
        corner = lambda i: torch.stack([i // g, i % g], -1).to(torch.float64) * k  # noqa: E731
        return Pieces.rigid(piece, torch.zeros(g * g), corner(cells.reshape(-1)), corner(moved))


def _patches(size: int) -> int:
    """Patches per side: the divisor of the size nearest 4 (so 64 and 256 px share one layout)."""
    return min((d for d in range(2, size + 1) if size % d == 0), key=lambda d: (abs(d - 4), d))


def _centre_pivots(count: int, size: int) -> Tensor:
    return torch.full((count, 2), (size - 1) / 2, dtype=torch.float64)


class InnerCircle(Permutation):
    """The inner disc (radius 3/8 of the side) turned 180 degrees; the ring around it stays."""

    name = "inner_circle"
    RADIUS = 0.375

    def _build(self, size):
        g = _cells(size)
        r = torch.arange(g, dtype=torch.float64) - (g - 1) / 2
        disc = (r[:, None] ** 2 + r[None, :] ** 2 < (self.RADIUS * g) ** 2).long()
        piece = _upsample(disc, size).reshape(-1)
        pivots = _centre_pivots(2, size)
        return Pieces.rigid(piece, torch.tensor([0.0, math.pi]), pivots, pivots)


class SquareHinge(Permutation):
    """A 3x3 grid of squares, each turned a quarter in place, neighbours in opposite directions; animated
    as a hinged chain whose squares swing apart and back."""

    name = "square_hinge"
    margin = (math.sqrt(2) - 1) / 2

    def _build(self, size):
        g = _cells(size)
        k, s = size // g, g // 3
        start = (g - 3 * s) // 2
        idx = torch.arange(g) - start
        band = torch.where((idx >= 0) & (idx < 3 * s), idx // max(s, 1), torch.full_like(idx, -1))
        grid = band[:, None] * 3 + band[None, :]
        grid = torch.where((band[:, None] < 0) | (band[None, :] < 0), torch.full_like(grid, 9), grid)
        piece = _upsample(grid, size).reshape(-1)
        i = torch.arange(10)
        centre = ((start + (torch.stack([i // 3, i % 3], -1) + 0.5) * s) * k - 0.5).to(torch.float64)
        centre[9] = 0.0  # the leftover rim (sizes not divisible by 3) stays put
        angle = torch.where((i // 3 + i % 3) % 2 == 0, math.pi / 2, -math.pi / 2)
        angle[9] = 0.0
        return Pieces.rigid(piece, angle, centre, centre)

    def positions(self, size, t):
        pieces = self.pieces(size)
        mid = torch.full((1, 2), (size - 1) / 2, dtype=torch.float64)
        theta = t * math.pi / 2
        centres = mid + (pieces.src - mid) * (math.sin(theta) + math.cos(theta))
        centres[9] = pieces.src[9]
        return pieces.positions(t, centres)


class Jigsaw(Permutation):
    """A 4x4 jigsaw with round tabs, laid out with four-fold symmetry about the centre so that every piece
    fits the slots of its three quarter-turned copies; the seed picks the tabs and, within each such group
    of four, which slot each piece moves to (turning as it goes)."""

    name = "jigsaw"
    margin = 0.06
    N = 4  # pieces per side
    TAB_RADIUS, TAB_OFFSET = 0.22, 0.14  # of a piece's side: tab size, and how far its centre is past the edge

    def _turn_cell(self, cell: int) -> int:
        i, j = divmod(cell, self.N)
        return (self.N - 1 - j) * self.N + i

    def _orbit(self, cell: int) -> list[int]:
        orbit = [cell]
        while (nxt := self._turn_cell(orbit[-1])) != cell:
            orbit.append(nxt)
        return orbit

    def _tabs(self, gen: torch.Generator) -> list[tuple[int, int]]:
        """(owner, neighbour) per inner edge: the owner's tab juts into the neighbour; four-fold symmetric."""
        n, tabs, done = self.N, [], set()
        edges = [(a, a + step) for a in range(n * n) for step, ok in ((1, (a + 1) % n), (n, a + n < n * n)) if ok]
        for a, b in edges:
            if frozenset((a, b)) in done:
                continue
            owner, other = (a, b) if torch.randint(2, (1,), generator=gen).item() else (b, a)
            for _ in range(4):
                tabs.append((owner, other))
                done.add(frozenset((owner, other)))
                owner, other = self._turn_cell(owner), self._turn_cell(other)
        return tabs

    def _labels(self, g: int, gen: torch.Generator) -> Tensor:
        """Piece of every cell of a g x g grid; the centre cell of an odd grid is its own piece, N*N."""
        n, side = self.N, g / self.N
        h, w = g // 2, (g + 1) // 2  # a quarter; its three turns tile the rest (all but an odd centre)
        ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
        xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
        quarter = ((ys // side).clamp(max=n - 1) * n + (xs // side).clamp(max=n - 1)).long()
        for owner, other in self._tabs(gen):
            (oi, oj), (ni, nj) = divmod(owner, n), divmod(other, n)
            ty = ((oi + ni) / 2 + 0.5 + (ni - oi) * self.TAB_OFFSET) * side
            tx = ((oj + nj) / 2 + 0.5 + (nj - oj) * self.TAB_OFFSET) * side
            inside = (ys - ty) ** 2 + (xs - tx) ** 2 <= (self.TAB_RADIUS * side) ** 2
            quarter = torch.where(inside, torch.full_like(quarter, owner), quarter)
        turn = torch.tensor([self._turn_cell(c) for c in range(n * n)] + [-1])  # index -1 maps -1 to -1
        full = torch.full((g, g), -1, dtype=torch.long)
        full[:h, :w] = quarter
        for _ in range(3):
            full = torch.where(full < 0, turn[torch.rot90(full, 1)], full)
        return full.masked_fill(full < 0, n * n)

    def _build(self, size):
        g = _cells(size)
        gen = torch.Generator().manual_seed(self.seed)
        piece = _upsample(self._labels(g, gen), size).reshape(-1)
        count = self.N * self.N + 1
        angle = torch.zeros(count, dtype=torch.float64)
        seen: set[int] = set()
        for cell in range(self.N * self.N):
            if cell in seen:
                continue
            orbit = self._orbit(cell)
            seen.update(orbit)
            slots = torch.randperm(len(orbit), generator=gen).tolist()
            for a, slot in enumerate(slots):
                quarters = (slot - a) % 4
                angle[orbit[a]] = (quarters - 4 if quarters > 2 else quarters) * math.pi / 2
        pivots = _centre_pivots(count, size)
        return Pieces.rigid(piece, angle, pivots, pivots)


# ---- by name ------------------------------------------------------------------------------------
_FACTORIES = {
    "identity": lambda seed: Identity(),
    "flip": lambda seed: Flip("flip", 0, seed),
    "mirror": lambda seed: Flip("mirror", 1, seed),
    "rotate_cw": lambda seed: Rotate("rotate_cw", -1, seed),
    "rotate_ccw": lambda seed: Rotate("rotate_ccw", 1, seed),
    "rotate_180": lambda seed: Rotate("rotate_180", 2, seed),
    "negate": lambda seed: Negate(),
    "skew": lambda seed: Skew(seed),
    "patch_permute": lambda seed: BlockPermute("patch_permute", _patches, seed),
    "pixel_permute": lambda seed: BlockPermute("pixel_permute", _cells, seed),
    "jigsaw": lambda seed: Jigsaw(seed),
    "inner_circle": lambda seed: InnerCircle(seed),
    "square_hinge": lambda seed: SquareHinge(seed),
}
VIEW_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_view(name: str, seed: int = 0) -> View:
    """The view called `name` ("rotate-cw" and "Rotate_CW" work too); `seed` picks random layouts."""
    key = name.strip().lower().replace("-", "_")
    if key not in _FACTORIES:
        raise UsageError(f"unknown view {name!r}; known views: {', '.join(VIEW_NAMES)}")
    return _FACTORIES[key](seed)


def parse_views(names, seed: int = 0) -> list[View]:
    """Views from names (a list, or one comma-separated string), all built from the same seed."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    return [make_view(n, seed) for n in names]
