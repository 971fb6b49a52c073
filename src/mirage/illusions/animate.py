"""Animations of illusions: the image turns, flips or reshuffles from one view to the next while the prompt
under it fades from one to the other; written as GIF (always) and MP4 (when imageio-ffmpeg is installed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from mirage.errors import UsageError
from mirage.illusions.views import Identity, View
from mirage.io import (
    BACKGROUND,
    atomic_write,
    line_height,
    text_font,
    to_pil,
    wrap_text,
)

FRAME_MS = 50  # 20 frames a second


def _pictures(frames: Sequence) -> list[Image.Image]:
    if not frames:
        raise UsageError("an animation needs at least one frame")
    return [to_pil(f).convert("RGB") for f in frames]


def save_gif(path: str | os.PathLike, frames: Sequence, duration: int | Sequence[int] = FRAME_MS) -> Path:
    """Writes a looping GIF (frames: pictures or image tensors; duration in ms, one or per frame).
    Never overwrites. Runs of identical frames are stored once, with their durations added."""
    pictures = [_paletted(p) for p in _pictures(frames)]
    return atomic_write(path, lambda tmp: pictures[0].save(
        tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=duration, loop=0))


def _paletted(picture: Image.Image) -> Image.Image:
    """A gray frame as is (GIF stores it exactly); a colour one with its own fast octree palette, 4x quicker
    than PIL's default median cut, which was most of a built-in anagram's run time."""
    r, g, b = (np.asarray(c) for c in picture.split())
    if np.array_equal(r, g) and np.array_equal(g, b):
        return picture.convert("L")
    return picture.quantize(256, method=Image.Quantize.FASTOCTREE)


def save_mp4(path: str | os.PathLike, frames: Sequence, fps: float = 1000 / FRAME_MS) -> str | None:
    """Writes an H.264 MP4 and returns None, or returns a one-line note saying why no MP4 was written."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return "no MP4 written: imageio-ffmpeg is not installed (pip install imageio-ffmpeg); the GIF has it all"
    pictures = _pictures(frames)
    w, h = pictures[0].size
    even = (w + w % 2, h + h % 2)  # H.264 in yuv420p needs even sides

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(str(tmp), even, fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                             pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
        writer.send(None)
        for picture in pictures:
            canvas = Image.new("RGB", even, BACKGROUND)
            canvas.paste(picture, (0, 0))
            writer.send(canvas.tobytes())
        writer.close()

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as err:
        return f"no MP4 written: ffmpeg failed ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


class _Captions:
    """Each caption drawn once as ink coverage; a band shows any mix of them, fading."""

    def __init__(self, captions: Sequence[str], width: int, font_size: int):
        font = text_font(font_size)
        lh = line_height(font)
        wrapped = [wrap_text(c, font, width - 2 * (font_size // 2)) for c in captions]
        self.height = max(len(w) for w in wrapped) * lh + font_size
        self.ink = []
        for lines in wrapped:
            mask = Image.new("L", (width, self.height), 0)
            pen = ImageDraw.Draw(mask)
            for k, line in enumerate(lines):
                pen.text(((width - font.getlength(line)) / 2, font_size // 2 + k * lh), line, fill=255, font=font)
            self.ink.append(np.asarray(mask, dtype=np.float32) / 255)

    def band(self, alphas: Sequence[float]) -> np.ndarray:
        cover = np.max([a * ink for a, ink in zip(alphas, self.ink)], axis=0)
        return np.repeat(((1 - cover) * 255)[..., None], 3, axis=2)


def illusion_animation(img: Tensor, views: Sequence[View], captions: Sequence[str], size: int = 384,
                       steps: int = 24, hold: int = 16, font_size: int | None = None) -> list[Image.Image]:
    """Frames that hold each view of `img` (the illusion, identity orientation) and move smoothly to the
    next, back to the first at the end so the animation loops; caption i (view i's prompt) is shown under
    view i and fades out and in during each move. Frames are size wide; the image keeps a margin wide
    enough for turning views."""
    if len(views) != len(captions):
        raise UsageError(f"{len(views)} views need {len(captions)} captions, one each")
    if not views:
        raise UsageError("an animation needs at least one view")
    img = img[0] if img.dim() == 4 else img
    pad = max(v.margin for v in views)
    text = _Captions(captions, size, font_size or max(12, size // 24))

    def moves(view: View, forward: bool) -> list[Tensor]:
        frames = view.frames(img, steps, size=size, pad=pad)
        return frames if forward else frames[::-1]

    def transition(a: int, b: int) -> list[Tensor]:
        """From view a to view b through the illusion itself (identity), where a move is defined."""
        back = [] if isinstance(views[a], Identity) else moves(views[a], False)
        ahead = [] if isinstance(views[b], Identity) else moves(views[b], True)
        path = back + ahead[1:] if back and ahead else back or ahead
        return path or [views[a].frames(img, 2, size=size, pad=pad)[0]] * steps

    out: list[Image.Image] = []

    def emit(frame: Tensor, alphas: list[float]) -> None:
        picture = np.concatenate([np.asarray(to_pil(frame).convert("RGB")), text.band(alphas)], axis=0)
        out.append(Image.fromarray(picture.astype(np.uint8)))

    order = list(range(len(views)))
    for a, b in zip(order, order[1:] + order[:1]):
        still = views[a].frames(img, 2, size=size, pad=pad)[-1]
        for _ in range(hold):
            emit(still, [float(k == a) for k in order])
        if len(views) > 1:
            path = transition(a, b)
            for k, frame in enumerate(path):
                u = k / max(1, len(path) - 1)
                alphas = [0.0] * len(views)
                alphas[a] = max(alphas[a], 1 - 2 * u)
                alphas[b] = max(alphas[b], 2 * u - 1)
                emit(frame, alphas)
    return out
