"""`mirage again FILE.png|result.json|RUN_DIR [--out DIR]`: run a recorded result once more.

Every run records the arguments it was given (`argv` in result.json and in each PNG's `mirage` chunk), so
running them again under the same mirage makes the same images. From a run (its result.json) the whole run
is made again; from one PNG, only that image: its own seed (and for an edit its start step), since each image
depends on its own seed alone.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from mirage.errors import UsageError
from mirage.io import read_settings

# options whose value says which images to make or where to write them: replaced when one image is made again
PER_RUN = ("--seed", "--n", "--seeds", "--start", "--out")


def add_arguments(p) -> None:
    p.add_argument("source", help="an image a mirage command wrote (PNG), its run's result.json, or the run folder")
    p.add_argument("--out", help="output folder (default: out/<command>, numbered when it exists)")


def recorded_argv(source: Path) -> tuple[list[str], dict | None]:
    """(the arguments the run was given, the PNG's own settings or None for a whole run)."""
    if source.is_dir():
        source = source / "result.json"
    if not source.is_file():
        raise UsageError(f"{source} does not exist: give a PNG, result.json or run folder that mirage wrote")
    if source.suffix.lower() == ".png":
        settings = read_settings(source)
        if "argv" not in settings:
            raise UsageError(f"{source} holds no recorded arguments (written before mirage recorded them): "
                             f"run its command again by hand")
        return list(settings["argv"]), settings
    try:
        doc = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{source} is not a readable result.json ({e})") from None
    if "argv" in doc:
        return list(doc["argv"]), None
    if doc.get("command", "").startswith("mirage "):
        return shlex.split(doc["command"])[1:], None
    raise UsageError(f"{source} records no command: nothing to run again")


def without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv less the given options and their values (`--opt V` and `--opt=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in options)):
            out.append(a)
    return out


def again_argv(source: str, out: str | None) -> list[str]:
    """The arguments that make `source` again, writing into `out`."""
    argv, image = recorded_argv(Path(source))
    if image is not None:
        argv = without(argv, PER_RUN) + ["--seeds", str(image["seed"])]
        if "start" in image:
            argv += ["--start", str(image["start"])]
    elif out is not None:
        argv = without(argv, ("--out",))
    return argv + (["--out", out] if out is not None else [])
