"""`mirage score RUN_DIR`: a run's images measured with a classifier of the data set (quality.metrics)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mirage.backends.classes import match_class
from mirage.backends.small import BUILTIN
from mirage.errors import MirageError, UsageError
from mirage.illusions.filters import SIGMA
from mirage.illusions.views import parse_views
from mirage.io import load_image, unique_path, write_json
from mirage.quality.classifier import load_classifier, test_stats
from mirage.quality.metrics import (
    Filter,
    fractions,
    frechet_distance,
    hybrid_maps,
    identity,
    input_size,
    map_predictions,
    rank_maps,
)

MIN_FD_IMAGES = 100  # below this a Fréchet distance is mostly its own sampling noise


@dataclass
class Group:
    """Images of a run checked the same way: maps[i] of each image should show prompts[k][i]."""

    task: str
    checks: list[str]
    maps: list[Filter]
    entries: list[dict] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="measure a run's images with a classifier: class accuracy, FD, illusions",
        description="Score the images of a run folder with a classifier of the data set: class accuracy of "
                    "samples, Fréchet distance against the test set (sample runs of >= 100 images), whether "
                    "each view of an anagram and each part of a hybrid shows its prompt. Writes score.json.")
    p.add_argument("run_dir", help="a folder a mirage command wrote (it holds result.json)")
    p.add_argument("--classifier", help="fashion, digits, or a classifier .safetensors from `mirage train "
                                        "classifier` (default: the one of the run's built-in model)")
    p.add_argument("--blur", type=float, default=None,
                   help="sigma (given at 64 px, like the hybrid filters) of the blur a hybrid's low prompt is "
                        "judged through (default: the low pass the hybrid was made with)")
    p.add_argument("--quiet", action="store_true", help="write score.json, print nothing")
    p.set_defaults(func=score_command)


def score_command(args) -> int:
    run = Path(args.run_dir)
    entries = read_run(run)
    name = args.classifier or _classifier_for(entries)
    classifier = load_classifier(name)
    report = score_run(classifier, run, entries, args.blur)
    report["classifier"] = dict(name=str(name), **classifier.info)
    path = write_json(unique_path(run / "score.json"), report)
    if not args.quiet:
        print("\n".join(summary(report)))
        print(f"wrote {path}")
    return 0


def read_run(run: Path) -> list[dict]:
    path = run / "result.json"
    if not path.is_file():
        raise UsageError(f"{run} holds no result.json: give a folder that a mirage command wrote")
    try:
        entries = json.loads(path.read_text())["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise MirageError(f"{path} is not a mirage result (no image list: {e})") from None
    if not entries:
        raise MirageError(f"{path} lists no images")
    return entries


def _model_of(entry: dict) -> str | None:
    return entry.get("model") or (entry.get("stages") or [{}])[0].get("model")


def _classifier_for(entries: list[dict]) -> str:
    models = {_model_of(e) for e in entries}
    if len(models) == 1 and (model := models.pop()) in BUILTIN:
        return model
    raise UsageError(f"no built-in classifier fits this run's model(s) {sorted(map(str, models))}: "
                     f"pass --classifier fashion, digits or a classifier .safetensors file")


def _image_size(entry: dict, default: int) -> int:
    """The size the run made its images at (the last stage's)."""
    return (entry.get("stages") or [{}])[-1].get("size") or default


def _group_of(entry: dict, size: int, blur: float | None) -> Group | None:
    """How one image is checked, or None where nothing can be (no prompt; a hybrid kind with no low pass)."""
    task = entry.get("task", "sample")
    if entry.get("views"):
        views = parse_views(entry["views"], entry.get("view_seed", 0))
        return Group("anagram " + "+".join(entry["views"]), list(entry["views"]), [v.view for v in views])
    if task == "hybrid":
        if entry.get("kind", "lowhigh") != "lowhigh":
            return None
        return Group("hybrid", ["low (blurred)", "high (full image)"],
                     hybrid_maps(size, blur or entry.get("sigma") or SIGMA))
    if entry.get("prompt") is not None:
        return Group(task, ["image"], [identity])
    return None


def _prompts(entry: dict) -> list[str]:
    return list(entry["prompts"]) if "prompts" in entry else [entry["prompt"]]


def score_run(classifier: nn.Module, run: Path, entries: list[dict], blur: float | None = None) -> dict:
    """Scores of every group of images in a run, plus per image what the classifier saw."""
    size = input_size(classifier)
    images = {e["file"]: load_image(run / e["file"], _image_size(e, size), channels=1)[0] for e in entries}
    groups: dict[tuple, Group] = {}
    for e in entries:
        group = _group_of(e, images[e["file"]].shape[-1], blur)
        if group is None:
            continue
        key = (group.task, e.get("view_seed"), images[e["file"]].shape)
        groups.setdefault(key, group).entries.append(e)
        groups[key].prompts.append(_prompts(e))
    report = {"run": str(run), "images": len(entries), "groups": [], "files": []}
    for group in groups.values():
        x = torch.stack([images[e["file"]] for e in group.entries])
        result, files = _score_group(classifier, group, x)
        report["groups"].append(result)
        report["files"] += files
    return report


def _score_group(classifier: nn.Module, group: Group, x: Tensor) -> tuple[dict, list]:
    names = classifier.config.class_names
    result: dict = {"task": group.task, "images": len(x), "checks": group.checks}
    labels = [[match_class(classifier.config.data, p) for p in ps] for ps in group.prompts]
    prompted = torch.tensor([None not in ls for ls in labels])
    files = []
    if prompted.any():
        y = torch.tensor([ls for ls, ok in zip(labels, prompted) if ok])
        xs = x[prompted]
        predicted = map_predictions(classifier, xs, group.maps)
        acc = fractions(predicted == y)
        result["accuracy"] = dict(zip(group.checks, acc["each"]))
        result["all_right"] = acc["all"]
        result["prompted_images"] = len(xs)
        scores = rank_maps(classifier, xs, y, group.maps)
        result["per_prompt"] = _per_prompt(predicted == y, y, names)
        kept = [e for e, ok in zip(group.entries, prompted) if ok]
        files = [dict(file=e["file"], prompts=[names[k] for k in ys], predicted=[names[k] for k in ps],
                      right=bool((ps == ys).all()), score=round(s, 4))
                 for e, ys, ps, s in zip(kept, y, predicted, scores.tolist())]
    if group.task == "sample":
        result.update(_fd(classifier, x))
    return result, files


def _per_prompt(right: Tensor, y: Tensor, names: list[str]) -> dict[str, float]:
    """Fraction of all-views-right images per prompt combination ('Bag', 'Bag / Trouser')."""
    keys = [" / ".join(names[k] for k in row) for row in y.tolist()]
    ok = right.all(1).tolist()
    return {k: sum(o for kk, o in zip(keys, ok) if kk == k) / keys.count(k) for k in sorted(set(keys))}


def _fd(classifier: nn.Module, x: Tensor) -> dict:
    if len(x) < MIN_FD_IMAGES:
        return {"fd": None, "fd_note": f"{len(x)} images: a Fréchet distance needs at least {MIN_FD_IMAGES}"}
    fd = frechet_distance(classifier, x, test_stats(classifier))
    ref = classifier.info.get("reference_fd")
    return {"fd": fd, "reference_fd": ref, "fd_ratio": fd / ref if ref else None}


def summary(report: dict) -> list[str]:
    """A few lines for the terminal."""
    c = report["classifier"]
    lines = [f"{report['images']} images in {report['run']}, scored with the {c['name']} classifier "
             f"(test accuracy {c.get('test_accuracy', float('nan')):.3f})"]
    for g in report["groups"]:
        parts = [f"{g['task']} ({g['images']} images)"]
        if "accuracy" in g:
            parts.append(", ".join(f"{k} {v:.1%}" for k, v in g["accuracy"].items()))
            if len(g["accuracy"]) > 1:
                parts.append(f"all right {g['all_right']:.1%}")
        if g.get("fd") is not None:
            parts.append(f"FD {g['fd']:.4g} = {g['fd_ratio']:.2f}x the reference {g['reference_fd']:.4g}")
        elif "fd_note" in g:
            parts.append(f"no FD ({g['fd_note']})")
        lines.append(": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if parts[2:] else ""))
    if not report["groups"]:
        lines.append("nothing to score: no image has a class prompt")
    return lines
