"""Run folders: claimed atomically at the start (never shared, never overwritten), and described by
result.json, which always lists exactly the images that are complete.

Each image's entry is appended to a journal beside the images as soon as the image is on disk; result.json is
made from the journal (streamed, so a run of millions of images keeps its memory flat) every few seconds,
at the end, and when the run stops early, so Ctrl-C or a full disk leaves a valid result.json of what was made.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from itertools import islice, zip_longest
from pathlib import Path
from typing import Iterator

from mirage.errors import MirageError, UsageError
from mirage.io import TEMP_PREFIX, atomic_write, pid_alive, save_png

CLAIM = ".mirage-run"  # present while a run writes into its folder
JOURNAL = ".result-{rank}.jsonl"  # one per torchrun rank (one in a plain run): the entries it made, in order


def journals(folder: Path) -> list[Path]:
    """The run's journals in rank order."""
    return sorted(folder.glob(JOURNAL.format(rank="*")), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def recover(folder: Path) -> None:
    """A run folder whose run was killed (its claim names a process that is gone): its temporary files are
    removed and result.json lists what its journal says was complete, so nothing made is lost."""
    claim = folder / CLAIM
    try:
        pid = int(claim.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    if pid_alive(pid):
        return
    for p in folder.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            p.unlink(missing_ok=True)
    parts = journals(folder)
    if any(p.stat().st_size for p in parts):
        previous = {}
        try:
            previous = json.loads((folder / "result.json").read_text())
        except (OSError, ValueError):
            pass
        head = {k: v for k, v in previous.items() if k != "images"}
        head.update(complete=False, stopped=f"the run (process {pid}) was killed")
        atomic_write(folder / "result.json", lambda tmp: write_result(tmp, parts, head), replace=True)
    for p in parts:
        p.unlink(missing_ok=True)
    claim.unlink(missing_ok=True)


def _claim(folder: Path) -> bool:
    """Take `folder` for this run, atomically: a new folder by mkdir, an existing empty one by creating the
    claim file exclusively. False where another run (or anything else) has it."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        if not folder.is_dir():
            return False
        recover(folder)
        if any(folder.iterdir()):
            return False
    try:
        fd = os.open(folder / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    return True


def claim_folder(out: str | Path) -> Path:
    """`out` if it is new or empty, else the first free `out-2`, `out-3`, ... beside it; claimed before
    anything is loaded, so two runs given the same --out never share a folder."""
    base = Path(out)
    if base.exists() and not base.is_dir():
        raise UsageError(f"--out {base} is a file, not a folder: give a folder path")
    if base.name in ("", ".", "..") and base.is_dir() and any(base.iterdir()):
        raise UsageError(f"--out {out} is a folder that is not empty and has no name to number: give a new "
                         f"folder, e.g. --out {Path(out) / 'run'}")
    candidate, k = base, 2
    while True:
        try:
            if _claim(candidate):
                return candidate
        except OSError as e:
            raise MirageError(f"cannot write to {candidate}: {e.strerror or e}") from None
        candidate, k = base.with_name(f"{base.name}-{k}"), k + 1


def entry_lines(parts: list[Path]) -> Iterator[str]:
    """The complete entries of the journals, in the order of the run's images: rank r made images r, r + N,
    r + 2N, ... of N ranks, so taking one line of each journal in turn restores the order of one process."""
    files = [open(p) for p in parts]
    try:
        for row in zip_longest(*files):
            for line in row:
                if line is not None and line.endswith("\n") and line.strip():
                    yield line.rstrip("\n")
    finally:
        for f in files:
            f.close()


def write_result(tmp: Path, parts: list[Path], head: dict) -> None:
    """result.json: `head`'s keys, then "images", streamed line by line from the journals."""
    with open(tmp, "w") as f:
        f.write(json.dumps(head, indent=1, default=str)[:-2] + ',\n "images": [')
        for k, line in enumerate(entry_lines(parts)):
            f.write(("," if k else "") + "\n  " + line)
        f.write("\n ]\n}\n")


class RunDir:
    """Everything one command writes. Each file is written atomically; result.json lists what is complete.
    Used as a context manager: a run that stops early keeps what it made, or leaves nothing at all."""

    def __init__(self, out: str | Path | None, task: str, command: str = ""):
        requested = Path(out or Path("out") / task)
        full = requested.absolute()
        self.made = [p for p in (full, *full.parents) if not p.exists()]  # deepest first: a failed run removes them
        self.path = claim_folder(requested)
        if self.path != requested:
            self.made = [self.path.absolute()]
        self._setup(task, command, rank=0)

    @classmethod
    def joined(cls, path: Path, task: str, command: str, rank: int) -> "RunDir":
        """Rank `rank`'s share of a folder that rank 0 claimed: its images and its journal; rank 0 alone
        writes result.json."""
        run = cls.__new__(cls)
        run.path, run.made = Path(path), []
        run._setup(task, command, rank)
        return run

    def _setup(self, task: str, command: str, rank: int) -> None:
        self.rank = rank
        self.journal = self.path / JOURNAL.format(rank=rank)
        self.task, self.command = task, command
        self.count = 0
        self.extras: dict = {}
        self._saved_at = time.monotonic()
        self._save_cost = 0.0

    # ---- files ------------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        target = self.path / name
        if target.exists():
            raise FileExistsError(f"{target} exists; mirage never overwrites")
        return target

    def save_image(self, name: str, image, settings: dict) -> str:
        """Save one result (tensor [C,H,W] in [-1,1] or PIL image) with its settings in the PNG."""
        save_png(self.file(name), image, settings)
        return name

    def add(self, entry: dict) -> None:
        """List a complete image: in the journal at once, in result.json at the next save."""
        with open(self.journal, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        self.count += 1

    # ---- result.json --------------------------------------------------------------------------------
    def entries(self, limit: int) -> list[dict]:
        """The first `limit` complete entries of the run, in order."""
        return [json.loads(line) for line in islice(entry_lines(journals(self.path)), limit)]

    def save(self, complete: bool = False, force: bool = True, **extras) -> Path:
        """result.json from the journal. Unforced, it is skipped while the last save is recent (rewriting
        a long list after every batch would cost more than the batches)."""
        path = self.path / "result.json"
        now = time.monotonic()
        if not force and now - self._saved_at < max(5.0, 10 * self._save_cost):
            return path
        head = {"task": self.task, "command": self.command, **self.extras, **extras,
                **({} if complete else {"complete": False})}
        atomic_write(path, lambda tmp: write_result(tmp, journals(self.path), head), replace=True)
        self._saved_at = time.monotonic()
        self._save_cost = self._saved_at - now
        return path

    def finish(self, **extras) -> Path:
        path = self.save(complete=True, **extras)
        self._release()
        return path

    def _release(self) -> None:
        for p in [*journals(self.path), self.path / CLAIM] if self.rank == 0 else [self.journal]:
            p.unlink(missing_ok=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            return
        if self.rank:  # rank 0 lists what every rank made
            return
        if self.count or any(p.stat().st_size for p in journals(self.path)):  # keep what was made, listed; the run is marked incomplete
            try:
                self.save(complete=False, stopped=_reason(error))
            except OSError:
                pass  # the last save stays: still valid, if a batch short
            self._release()
            return
        self._remove()

    def _remove(self) -> None:
        """Nothing complete: leave no trace but files the user put there."""
        ours = set(journals(self.path)) if self.path.is_dir() else set()
        for p in self.path.iterdir() if self.path.is_dir() else []:
            if p.name == CLAIM or p in ours or p.name.startswith(TEMP_PREFIX):
                p.unlink(missing_ok=True)
        for p in self.made:
            try:
                p.rmdir()
            except OSError:
                break


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on the device"
    return f"{error.__class__.__name__}: {error}"


def disk_full(error: BaseException, folder: Path) -> MirageError | None:
    """A full disk, said plainly, with what was kept."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        return MirageError(f"no space left on {folder} ({free // 1024} KiB free): the complete images are kept "
                           f"and listed in its result.json; free some space and run again")
    return None
