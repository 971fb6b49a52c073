"""Images in and out: loading any picture as a model input, PNGs that carry their settings, contact sheets.

Tensors are [1, C, H, W] (or [C, H, W]) in [-1, 1]. Every file is written to a temporary name in its folder
and then linked into place (atomic_write, the one atomic writer of the package), so a crash leaves nothing
half-written and nothing is ever overwritten unless the caller asks to replace.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin
from torch import Tensor

from mirage.errors import MirageError, UsageError

log = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
MIN_CELL = 192  # small images (28, 64 px) are blown up to at least this on sheets


# ---- reading ------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, size: int, channels: int = 3, notes: list[str] | None = None) -> Tensor:
    """A picture file as a [1, channels, size, size] tensor in [-1, 1].

    Any mode works (transparency is composited on white, palettes and 16-bit greyscale are expanded, EXIF
    rotation applied); a non-square picture is cropped to its centre square, with a note logged and appended
    to `notes`; the square is resized with antialiasing."""
    if channels not in (1, 3):
        raise UsageError(f"images have 1 or 3 channels, not {channels}")
    image = _open(Path(path))
    w, h = image.size
    if w != h:
        image = image.crop(_centre_square(w, h))
        side = min(w, h)
        note = f"{path}: cropped the {w}x{h} image to its centre {side}x{side} square"
        log.warning(note)
        if notes is not None:
            notes.append(note)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return from_pil(image, channels)


def _centre_square(w: int, h: int) -> tuple[int, int, int, int]:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def load_mask(mask_path: str | os.PathLike | None, box: str | None, image_path: str | os.PathLike,
              size: int) -> Tensor:
    """The region to regenerate as [1, 1, size, size] in {0, 1}: a mask picture (white = regenerate) cropped
    like its image, or a box x0,y0,x1,y1 in the image's pixels after its centre crop."""
    w, h = _read(Path(image_path)).size
    crop = _centre_square(w, h)
    if mask_path is not None:
        picture = _open(Path(mask_path), "mask").convert("L")
        if picture.size != (w, h):
            if abs(picture.size[0] / picture.size[1] - w / h) > 0.01:
                raise UsageError(f"the mask is {picture.size[0]}x{picture.size[1]} but the image is {w}x{h}: "
                                 f"make a mask of the image's size")
            log.warning(f"{mask_path}: resized the {picture.size[0]}x{picture.size[1]} mask to the image's {w}x{h}")
            picture = picture.resize((w, h), Image.Resampling.NEAREST)
        picture = picture.crop(crop).resize((size, size), Image.Resampling.NEAREST)
        mask = torch.from_numpy((np.asarray(picture) > 127).astype(np.float32))
    else:
        mask = _box_mask(box, crop[2] - crop[0], size)
    if not mask.any():
        raise UsageError("the mask is empty: nothing would be regenerated (white marks what to regenerate)")
    if mask.all():
        raise UsageError("the mask covers the whole image: use `mirage sample` to make a new image")
    return mask[None, None]


def _box_mask(box: str, side: int, size: int) -> Tensor:
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise UsageError(f"--box takes x0,y0,x1,y1, got {box!r}") from None
    if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
        raise UsageError(f"--box {box} must lie inside the {side}x{side} (centre-cropped) image with x0<x1, y0<y1")
    scale = size / side
    mask = torch.zeros(size, size)
    mask[round(y0 * scale):max(round(y1 * scale), round(y0 * scale) + 1),
         round(x0 * scale):max(round(x1 * scale), round(x0 * scale) + 1)] = 1
    return mask


def _read(path: Path, what: str = "image") -> Image.Image:
    """The picture file at `path` (`what` it is for: an image, a mask), fully loaded, or a one-line
    MirageError."""
    if not path.exists():
        raise MirageError(f"{what} not found: {path}")
    if not path.is_file():
        raise MirageError(f"{path} is not a file: give the path of the {what}")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        what = "not an image" if isinstance(err, Image.UnidentifiedImageError) else "unreadable or corrupt"
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MirageError(f"cannot read {path}: {what} ({detail})") from None


def _open(path: Path, what: str = "image") -> Image.Image:
    """The picture as 8-bit L or RGB, upright, transparency on white."""
    return _to_8bit(ImageOps.exif_transpose(_read(path, what)))


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit greyscale
        return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray((np.asarray(image, dtype=np.float64).clip(0, 1) * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def from_pil(image: Image.Image, channels: int | None = None) -> Tensor:
    """[1, C, H, W] in [-1, 1]; C is `channels`, or 1 for greyscale pictures and 3 otherwise."""
    channels = channels or (1 if image.mode in ("L", "1") else 3)
    image = image.convert("L" if channels == 1 else "RGB")
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).reshape(*image.size[::-1], channels)
    return (array.permute(2, 0, 1)[None] / 127.5 - 1).contiguous()


def to_pil(image: Tensor | Image.Image) -> Image.Image:
    """An image tensor ([C, H, W] or [1, C, H, W], C = 1 or 3, in [-1, 1]) as an L or RGB picture."""
    if isinstance(image, Image.Image):
        return image
    x = image.detach().float().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise UsageError(f"an image tensor is [C, H, W] or [1, C, H, W] with 1 or 3 channels, got {tuple(x.shape)}")
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if x.shape[0] == 1 else array)


# ---- writing ------------------------------------------------------------------------------------
def unique_path(path: str | os.PathLike) -> Path:
    """`path` if it is free, else the first free `name-2.ext`, `name-3.ext`, ... beside it."""
    path = Path(path)
    k = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def _umask() -> int:
    """The process's umask (read by setting and restoring it, as the os module offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (the owner of a claim or a lock file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


TEMP_PREFIX = ".tmp-"  # atomic_write's temporary files: what a killed write leaves, and a later run removes


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Calls write(temporary path) in `path`'s folder and moves the result to `path`, so readers see no file
    (or the old one) or the whole new one, never half a file; a failed write leaves nothing behind.

    By default it refuses to replace an existing file (mirage never overwrites what it wrote); replace=True
    replaces it atomically (os.replace), for checkpoints and caches. The final file gets the ordinary mode
    0o666 & ~umask, whatever the writer made (mkstemp and safetensors create private 0600 files)."""
    path = Path(path)
    if not replace and path.exists():
        raise MirageError(f"{path} exists and mirage never overwrites; choose another name (or see unique_path)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.stem}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)  # fails if path appeared meanwhile: nothing is ever replaced
        except FileExistsError:
            raise MirageError(f"{path} appeared while writing it; mirage never overwrites") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise MirageError(f"{path} exists and mirage never overwrites") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def settings_line(settings: dict) -> str:
    """Settings as one human-readable `key: value, key: value` line (as AUTOMATIC1111 writes them)."""
    def show(value):
        if isinstance(value, str) and not any(c in value for c in ",:\n\"'"):
            return value
        return json.dumps(value, ensure_ascii=False, default=str)
    return ", ".join(f"{key}: {show(value)}" for key, value in settings.items())


def save_png(path: str | os.PathLike, image: Tensor | Image.Image, settings: dict | None = None) -> Path:
    """Writes the image as a PNG with `settings` in its text chunks: "parameters" (one readable line) and
    "mirage" (JSON, read back by read_settings). Never overwrites."""
    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_text("parameters", settings_line(settings))
        info.add_text("mirage", json.dumps(settings, ensure_ascii=False, sort_keys=True, default=str))
    picture = to_pil(image)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))


def read_settings(path: str | os.PathLike) -> dict:
    """The settings save_png stored in a PNG ({} if it has none)."""
    image = _read(Path(path))
    raw = getattr(image, "text", {}).get("mirage")
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise MirageError(f"{path}: its mirage settings are not valid JSON") from None


def write_json(path: str | os.PathLike, obj) -> Path:
    """Writes obj as indented UTF-8 JSON, atomically; never overwrites."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ---- text and sheets ----------------------------------------------------------------------------
def text_font(size: int) -> ImageFont.ImageFont:
    """PIL's built-in font at `size` px (no font files needed, same on every machine)."""
    return ImageFont.load_default(size=size)


def wrap_text(text: str, font: ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap to `width` px; a word longer than a line is cut."""
    lines: list[str] = []
    for paragraph in str(text).splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while len(word) > 1 and font.getlength(word) > width:
                k = len(word) - 1
                while k > 1 and font.getlength(word[:k]) > width:
                    k -= 1
                lines += [line] if line else []
                lines.append(word[:k])
                line, word = "", word[k:]
            if not line or font.getlength(f"{line} {word}") <= width:
                line = f"{line} {word}".strip()
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def line_height(font) -> int:
    return math.ceil(font.size * 1.3)


def _fit(picture: Image.Image, cell: int) -> Image.Image:
    """The picture scaled to fit a cell x cell square, pixels kept crisp when blown up, centred on white."""
    picture = picture.convert("RGB")
    scale = cell / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    out = Image.new("RGB", (cell, cell), BACKGROUND)
    out.paste(picture.resize(size, resample), ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return out


def contact_sheet(rows: Sequence[Sequence], *, title: str | None = None, col_labels: Sequence[str] | None = None,
                  row_labels: Sequence[str] | None = None, cell: int | None = None, gap: int = 8) -> Image.Image:
    """A white sheet with a grid of images, each cell an image, an (image, caption) pair or None (empty).

    Images are scaled to `cell` px (default: the largest image blown up by a whole factor to at least
    MIN_CELL px, nearest neighbour so 28- and 64-px pixels stay crisp); captions are wrapped under their
    image, column labels go above the columns, row labels to the left, a title on top."""
    cells = [[c if isinstance(c, tuple) or c is None else (c, None) for c in row] for row in rows]
    pictures = [[None if c is None else to_pil(c[0]) for c in row] for row in cells]
    sides = [max(p.size) for row in pictures for p in row if p is not None]
    if not sides:
        raise UsageError("a contact sheet needs at least one image")
    cell = cell or max(sides) * max(1, math.ceil(MIN_CELL / max(sides)))
    font = text_font(max(12, min(20, cell // 12)))
    lh = line_height(font)
    ncols = max(len(row) for row in cells)

    def wrap_all(texts, width):
        return [wrap_text(t, font, width) if t else [] for t in texts]

    def height(blocks):
        return max((len(b) for b in blocks), default=0) * lh

    captions = [wrap_all([c[1] if c else None for c in row], cell) for row in cells]
    labels = wrap_all(col_labels or [], cell)
    words = [w for lab in row_labels or [] for w in str(lab).split()]
    row_w = min(cell, math.ceil(max(map(font.getlength, words))) + gap) if words else 0
    width = gap + row_w + ncols * (cell + gap)
    heading = wrap_text(title, font, width - 2 * gap) if title else []
    y = gap + (len(heading) * lh + gap if heading else 0)
    label_y, y = y, y + (height(labels) + gap if labels else 0)
    tops = []
    for row in captions:
        tops.append(y)
        y += cell + (height(row) + gap // 2 if height(row) else 0) + gap
    sheet = Image.new("RGB", (width, y), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    def text(lines, x, top, w):
        for k, line in enumerate(lines):
            draw.text((x + (w - font.getlength(line)) / 2, top + k * lh), line, fill=(0, 0, 0), font=font)

    text(heading, gap, gap, width - 2 * gap)
    x0 = gap + row_w
    for j, lab in enumerate(labels):
        text(lab, x0 + j * (cell + gap), label_y, cell)
    for i, top in enumerate(tops):
        if row_labels and i < len(row_labels):
            lab = wrap_text(row_labels[i], font, row_w - gap)
            text(lab, gap, top + (cell - len(lab) * lh) // 2, row_w - gap)
        for j, (picture, caption) in enumerate(zip(pictures[i], captions[i])):
            if picture is not None:
                sheet.paste(_fit(picture, cell), (x0 + j * (cell + gap), top))
            text(caption, x0 + j * (cell + gap), top + cell + gap // 2, cell)
    return sheet
