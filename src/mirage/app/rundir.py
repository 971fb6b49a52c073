"""Run folders: numbered instead of overwritten, created at the first file, described by result.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mirage.errors import MirageError, UsageError
from mirage.io import save_png, write_json


def free_folder(out: str | Path) -> Path:
    """`out` if it is new or empty, else the first free `out-2`, `out-3`, ... beside it."""
    base = Path(out)
    if base.exists() and not base.is_dir():
        raise UsageError(f"--out {base} is a file, not a folder: give a folder path")
    if not base.exists() or not any(base.iterdir()):
        return base
    k = 2
    while (candidate := base.with_name(f"{base.name}-{k}")).exists():
        k += 1
    return candidate


def _check_writable(folder: Path) -> None:
    """Before any model work: a folder that cannot be written fails at once, not after the run. What the
    check creates it removes again, so that a run that fails later leaves no empty folder."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mirage-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise MirageError(f"cannot write to {folder}: {e.strerror or e}") from None
    finally:
        for p in made:  # deepest first
            if p.is_dir():
                p.rmdir()


class RunDir:
    """Everything one command writes. Each file is written atomically; result.json is written last."""

    def __init__(self, out: str | Path | None, task: str, command: str = ""):
        self.path = free_folder(out or Path("out") / task)
        _check_writable(self.path)
        self.task, self.command = task, command
        self.entries: list[dict] = []
        self.extras: dict = {}

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / name
        if target.exists():
            raise FileExistsError(f"{target} exists; mirage never overwrites")
        return target

    def save_image(self, name: str, image, settings: dict) -> str:
        """Save one result (tensor [C,H,W] in [-1,1] or PIL image) with its settings in the PNG."""
        save_png(self.file(name), image, settings)
        return name

    def add(self, entry: dict) -> None:
        self.entries.append(entry)

    def finish(self, **extras) -> Path:
        doc = {"task": self.task, "command": self.command, **self.extras, **extras, "images": self.entries}
        path = self.file("result.json")
        write_json(path, json.loads(json.dumps(doc, default=str)))
        return path
