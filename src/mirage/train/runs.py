"""A training run's folder and the files in it.

    RUN/config.json         the training settings, model config included (written once)
    RUN/model.safetensors   EMA weights for inference, config + epoch/step in the metadata (loadable as a model)
    RUN/state.safetensors   everything a resume needs: raw and EMA weights, optimizer moments, step
    RUN/metrics.jsonl       one JSON object per logged step and per epoch
    RUN/loss.png            the loss curve
    RUN/samples/epoch_NNN.png, RUN/samples.gif   a sample grid after each epoch, and all of them as a GIF
    RUN/train.lock          while a `mirage train` works in RUN: its pid and host (a second one refuses)

Checkpoint files are replaced atomically (mirage.io.atomic_write with replace=True), so a run killed at any moment
leaves the previous checkpoint or the new one, never half a file; the hidden temporary file a kill can leave
is removed by the next resume. Both checkpoint files carry a SHA-256 of their tensors in their metadata, which
a resume verifies, and a checkpoint is never written from weights that hold NaN or inf.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from mirage.backends.small import FORMAT
from mirage.errors import MirageError, UsageError
from mirage.io import atomic_write, pid_alive

CONFIG, MODEL, STATE, METRICS, LOSS_PNG, GIF, LOCK = (
    "config.json", "model.safetensors", "state.safetensors", "metrics.jsonl", "loss.png", "samples.gif",
    "train.lock")
CHECKSUM = "sha256"  # metadata key: the SHA-256 of a checkpoint's tensors (tensor_digest)
# what a killed atomic_write leaves: `.tmp-<name>.XXXXXXXX<ext>` (or `.tmpXXXXXXXX`), and mkstemp's older
# `.<name>.XXXXXXXX<ext>`
PARTIAL = re.compile(r"^\.(tmp.*|.+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)?)$")


def new_run(out: Path, config: dict) -> RunLock:
    """Create the run folder, claim it, and write its config.json; an existing non-empty folder is left alone.
    Returns the claim, to release when the training ends."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} already exists: continue it with --resume {out}, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    lock = claim(out)  # a second run started into the same --out at the same moment stops here
    try:
        samples = out / "samples"
        if any(p.name not in (LOCK, "samples") for p in out.iterdir()) or (samples.is_dir() and any(samples.iterdir())):
            raise UsageError(f"{out} already exists: continue it with --resume {out}, or choose another --out")
        samples.mkdir(exist_ok=True)
        atomic_write(out / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"), replace=True)
    except BaseException:
        lock.release()
        raise
    return lock


# ---- one training at a time in a run folder ----------------------------------------------------------
class RunLock:
    """RUN/train.lock, created with O_CREAT | O_EXCL and holding "pid host"; its holder also keeps an flock on
    it, which the kernel drops when the holder dies (SIGKILL too), so a stale lock is told from a live one
    without trusting a pid that may have been reused."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.path, self.fd):
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def claim(run: Path) -> RunLock:
    """Claim `run` for this process, or a one-line MirageError naming the process that has it. A lock left by
    a process that is gone (killed) is taken over."""
    path = run / LOCK
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            if _take_stale(path):
                continue
            raise MirageError(f"{run} is in use by another mirage train ({_holder(path)}); wait for it to end, "
                              f"or delete {path} if no training runs there") from None
        except OSError as e:
            raise MirageError(f"cannot claim {run}: cannot create {path} ({e.strerror or e})") from None
        try:  # waits only while a contender checks whether this new file is stale
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no flock here: the pid alone tells a live holder
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return RunLock(path, fd)
    raise MirageError(f"cannot claim {run}: {path} keeps coming back; is another mirage train starting there?")


def _flock(fd: int) -> str:
    """Try to take the flock without waiting: "taken", "held" (by a live process) or "unsupported"."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "taken"
    except OSError as e:
        return "held" if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else "unsupported"


def _take_stale(path: Path) -> bool:
    """Remove `path` if its holder is gone; True if removed (or already gone), False if it is held."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        lock = _flock(fd)
        if lock == "held":
            return False
        pid, host = _read_holder(fd)
        if not pid and time.time() - os.fstat(fd).st_mtime < 10:
            return False  # just created, its holder about to write its pid
        if lock == "unsupported" and (host != socket.gethostname() or pid_alive(pid)):
            return False  # without flock only a dead pid of this host is known to be gone
        if _same_file(path, fd):  # not already replaced by another process taking it over
            path.unlink()
        return True
    finally:
        os.close(fd)


def _read_holder(fd: int) -> tuple[int, str]:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
        return int(text[0]), (text[1] if len(text) > 1 else "")
    except (OSError, ValueError, IndexError):
        return 0, ""


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
    except (OSError, ValueError):
        return "its lock file is being written"
    return f"pid {pid}" + ("" if host == socket.gethostname() else f" on {host}")


def _same_file(path: Path, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_partials(run: Path) -> list[Path]:
    """Delete the temporary files killed writes left in the run folder and its samples/ (call it holding the
    claim, so that no live writer's file goes); returns what it removed."""
    removed = []
    for folder in (run, run / "samples"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if PARTIAL.match(p.name) and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def read_config(run: Path) -> dict:
    path = run / CONFIG
    if not path.is_file():
        raise UsageError(f"nothing to resume in {run}: it has no {CONFIG} (is it a mirage training run?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise MirageError(f"{path} is not valid JSON") from None


# ---- checkpoints ------------------------------------------------------------------------------------
def save_checkpoint(run: Path, model_config: dict, step: int, epoch: int, raw: dict[str, Tensor],
                    ema: dict[str, Tensor], optim: dict[str, Tensor], optim_meta: dict,
                    train_s: float | None = None, log_carry: tuple[float, int] | None = None) -> None:
    """state.safetensors first, then model.safetensors: a resume always finds a complete state. `train_s`:
    the seconds of training behind this step, all sessions of the run together; `log_carry`: the loss sum and
    step count of the log interval under way."""
    meta = {"format": FORMAT, "config": json.dumps(model_config), "step": str(step), "epoch": str(epoch)}
    if train_s is not None:
        meta["train_s"] = f"{train_s:.3f}"
    if log_carry is not None:
        meta["log_carry"] = json.dumps([float(log_carry[0]), int(log_carry[1])])
    state = {**_prefixed("raw.", raw), **_prefixed("ema.", ema), **_prefixed("optim.", optim)}
    atomic_write(run / STATE, lambda p: save_file(state, str(p), metadata={
        **meta, "optim": json.dumps(optim_meta), CHECKSUM: tensor_digest(state)}), replace=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in ema.items()}
    atomic_write(run / MODEL, lambda p: save_file(weights, str(p), metadata={
        **meta, CHECKSUM: tensor_digest(weights)}), replace=True)


def load_state(run: Path) -> dict | None:
    """{'step', 'epoch', 'raw', 'ema', 'optim', 'optim_meta', 'train_s', 'log_carry'} of the last checkpoint, or None if
    there is none. Its checksum (when it has one) must match and its tensors must be finite."""
    path = run / STATE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        split = {p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
                 for p in ("raw.", "ema.", "optim.")}
        state = {"step": int(meta["step"]), "epoch": int(meta["epoch"]), "raw": split["raw."],
                 "ema": split["ema."], "optim": split["optim."], "optim_meta": json.loads(meta["optim"]),
                 "train_s": float(meta["train_s"]) if "train_s" in meta else None,
                 "log_carry": tuple(json.loads(meta["log_carry"])) if "log_carry" in meta else None}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise MirageError(f"{path} is damaged ({e.__class__.__name__}); the run cannot resume from it") from None
    if CHECKSUM in meta and tensor_digest(tensors) != meta[CHECKSUM]:
        raise MirageError(f"{path} fails its checksum: its tensors changed after it was written (a damaged "
                          f"disk or copy); the run cannot resume from it")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise MirageError(f"{path} holds NaN or inf values (in {bad}); the run cannot resume from it")
    return state


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def first_nonfinite(tensors: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                None)


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """An optimizer's state as flat tensors plus its (JSON) hyper-parameters."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)) for i, s in sd["state"].items()
               for k, v in s.items()}
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}  # a tensor learning rate is stored as its value


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# ---- metrics ----------------------------------------------------------------------------------------
def read_metrics(run: Path, upto_step: int | None = None) -> list[dict]:
    path = run / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return [r for r in rows if upto_step is None or r.get("step", 0) <= upto_step]


def rewrite_metrics(run: Path, rows: list[dict]) -> None:
    """After a resume: keep only what the checkpoint had seen, so no step is logged twice."""
    atomic_write(run / METRICS, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)), replace=True)


def append_metrics(run: Path, row: dict) -> None:
    with open(run / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


# ---- pictures ---------------------------------------------------------------------------------------
def grid(images: Tensor, rows: int, pad: int = 2, scale: int = 2) -> Image.Image:
    """Images in [-1, 1] ([n, C, H, W], row-major) as one picture, each scaled up `scale` times."""
    n, c, h, w = images.shape
    cols = math.ceil(n / rows)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    sheet = Image.new("L" if c == 1 else "RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), 255)
    for k in range(n):
        arr = x[k].permute(1, 2, 0).numpy()
        tile = Image.fromarray(arr[..., 0] if c == 1 else arr)
        sheet.paste(tile, (pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)


def save_picture(path: Path, picture: Image.Image) -> None:
    atomic_write(path, lambda p: picture.save(p, format="PNG"), replace=True)


def save_gif(path: Path, frames: list[Path], ms: int = 400) -> None:
    """All sample grids as one looping GIF; the last frame stays longer."""
    pictures = [Image.open(f).convert("L") for f in frames]
    if not pictures:
        return
    durations = [ms] * (len(pictures) - 1) + [ms * 4]
    atomic_write(path, lambda p: pictures[0].save(p, format="GIF", save_all=True, append_images=pictures[1:],
                                                  duration=durations, loop=0), replace=True)


def loss_curve(rows: list[dict], width: int = 640, height: int = 360) -> Image.Image:
    """Loss against step, log scale, drawn with PIL (no plotting library needed)."""
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and "epoch_end" not in r
           and r["loss"] > 0 and math.isfinite(r["loss"])]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, height - 25), "step", fill="black")
    d.text((left, 4), "loss (log scale)", fill="black")
    if len(pts) < 2:
        return img
    s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
    logs = [math.log10(v) for _, v in pts]
    lo, hi = min(logs), max(logs)
    hi = hi if hi > lo else lo + 1
    xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (g - lo) / (hi - lo) * (bottom - top))
          for (s, _), g in zip(pts, logs)]
    d.line(xy, fill=(30, 90, 200), width=2)
    for frac in (0, 0.5, 1):  # three labelled ticks on each axis
        y = bottom - frac * (bottom - top)
        d.text((5, y - 6), f"{10 ** (lo + frac * (hi - lo)):.3g}", fill="black")
        x = left + frac * (right - left)
        d.text((x - 10, bottom + 5), f"{int(s0 + frac * (s1 - s0))}", fill="black")
    return img


def export_model(src: Path, dst: Path, dtype: torch.dtype = torch.float16) -> None:
    """A run's model.safetensors as a smaller file (fp16 by default) with the same metadata: a built-in."""
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise MirageError(f"{src} is not a mirage small-UNet checkpoint")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(src)).items()}
    if CHECKSUM in meta:
        meta = {**meta, CHECKSUM: tensor_digest(tensors)}
    atomic_write(dst, lambda p: save_file(tensors, str(p), metadata=meta), replace=True)
