"""`mirage score RUN_DIR`: a run's images measured with a classifier of the data set (quality.metrics), or
with CLIP (`--clip [MODEL]`, quality.clip): per image its similarity matrix, alignment and concealment. It
writes score.json (numbered when there is one) and the run's page (app.report.run_page) with the scores."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from mirage.app.report import run_page
from mirage.backends.classes import match_class
from mirage.backends.load import resolve_device
from mirage.backends.small import BUILTIN
from mirage.errors import MirageError, UsageError
from mirage.illusions.filters import SIGMA
from mirage.illusions.views import parse_views
from mirage.io import load_image, unique_path, write_json
from mirage.quality.classifier import load_classifier, test_stats
from mirage.quality.clip import (
    DEFAULT_CLIP,
    ClipJudge,
    rank_order,
    record,
    view_similarity,
)
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
        "score", help="measure a run's images with a classifier (class accuracy, FD, illusions) or with CLIP",
        description="Score the images of a run folder with a classifier of the data set: class accuracy of "
                    "samples, Fréchet distance against the test set (sample runs of >= 100 images), whether "
                    "each view of an anagram and each part of a hybrid shows its prompt. With --clip, score "
                    "every image with CLIP instead: the similarity S of each view with each prompt, the "
                    "alignment (the worst view's similarity to its own prompt) and the concealment (how well "
                    "each view picks out its own prompt). Writes score.json.")
    p.add_argument("run_dir", help="a folder a mirage command wrote (it holds result.json)")
    scorer = p.add_mutually_exclusive_group()
    clip_argument(scorer)
    scorer.add_argument("--classifier", help="fashion, digits, or a classifier .safetensors from `mirage train "
                                             "classifier` (default: the one of the run's built-in model)")
    judging_args(p, "score.json")
    p.set_defaults(func=score_command)


def judging_args(p, writes: str) -> None:
    """The options `score` and `rank` share: how a hybrid is judged, where CLIP runs, what is printed."""
    p.add_argument("--blur", type=float, default=None,
                   help="sigma (given at 64 px, like the hybrid filters) of the blur a hybrid's low prompt is "
                        "judged through (default: the low pass the hybrid was made with)")
    p.add_argument("--device", default="auto", help="where CLIP runs: auto (a GPU if there is one), cpu, cuda")
    p.add_argument("--quiet", action="store_true", help=f"write {writes}, print nothing")


def clip_argument(p) -> None:
    p.add_argument("--clip", nargs="?", const=DEFAULT_CLIP, default=None, metavar="MODEL",
                   help=f"score with CLIP: a hub id or a local folder in the hub's layout (--clip alone: "
                        f"{DEFAULT_CLIP}); put it after RUN_DIR")


def score_command(args) -> int:
    run = Path(args.run_dir)
    if args.clip is not None:
        return clip_command(args, run)
    doc = read_result(run)
    check_images(run, doc)
    entries = doc["images"]
    name = args.classifier or _classifier_for(entries)
    classifier = load_classifier(name)
    report = score_run(classifier, run, entries, args.blur)
    report["classifier"] = dict(name=str(name), **classifier.info)
    return _written(run, report, summary, args.quiet)


def _written(run: Path, report: dict, table, quiet: bool) -> int:
    """score.json (a numbered one beside earlier ones) and the run's page, then the table printed."""
    path = write_json(unique_path(run / "score.json"), report)
    page = run_page(run)
    if not quiet:
        print("\n".join(table(report)))
        print(f"wrote {path} and the run's page {page}")
    return 0


def read_run(run: Path) -> list[dict]:
    return read_result(run)["images"]


def read_result(run: Path) -> dict:
    """The run's result.json, with a non-empty list of images that each name their file."""
    path = run / "result.json"
    if not path.is_file():
        raise UsageError(f"{run} holds no result.json: give a folder that a mirage command wrote")
    try:
        doc = json.loads(path.read_text())
        entries = doc["images"]
        files = [e["file"] for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise MirageError(f"{path} is not a mirage result (no image list: {e})") from None
    if not entries:
        raise MirageError(f"{path} lists no images")
    if not all(isinstance(f, str) for f in files):
        raise MirageError(f"{path} is not a mirage result (an image's file is not a name)")
    return doc


def check_images(run: Path, doc: dict) -> None:
    """Every image result.json lists is there, and every picture in the folder is known to it: an image, its
    stage-I picture or a sheet. Otherwise a usage error naming the first file at fault."""
    listed = [e["file"] for e in doc["images"]]
    missing = [f for f in listed if not (run / f).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UsageError(f"{run / missing[0]} is missing{more}: result.json lists it but the run folder does "
                         f"not hold it")
    known = set(listed) | {e["stage1_file"] for e in doc["images"] if e.get("stage1_file")}
    known |= set(doc.get("sheets") or [])
    strays = sorted(p.name for p in run.glob("*.png") if p.name not in known)
    if strays:
        raise UsageError(f"{run / strays[0]} has no entry in {run / 'result.json'}: its prompts are unknown "
                         f"(move it out of the run folder)")


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


# ---- CLIP ---------------------------------------------------------------------------------------------
def clip_command(args, run: Path) -> int:
    doc = read_result(run)
    check_images(run, doc)
    entries = doc["images"]
    plan = clip_plan(run, entries, args.blur)  # before CLIP loads: an unscorable run stops here
    with ClipJudge.load(args.clip, resolve_device(args.device)) as judge:
        report = clip_report(judge, run, entries, plan)
    return _written(run, report, clip_table, args.quiet)


@dataclass
class ClipPlan:
    """How CLIP checks a run: groups of images checked the same way, and the images it cannot check."""

    groups: list[Group]
    sizes: dict[str, int]  # file -> its side in px
    skipped: list[dict]  # {file, why}


def _side(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return min(im.size)
    except (OSError, ValueError) as e:
        raise MirageError(f"cannot read {path}: {e}") from None


def clip_plan(run: Path, entries: list[dict], blur: float | None = None) -> ClipPlan:
    """Each image's maps and prompts at its own size; a usage error when no image can be scored."""
    groups: dict[tuple, Group] = {}
    sizes, skipped = {}, []
    for e in entries:
        size = sizes[e["file"]] = _side(run / e["file"])
        group = _group_of(e, size, blur)
        prompts = _prompts(e) if group is not None else []
        if group is None or not all(isinstance(p, str) and p.strip() for p in prompts):
            why = (f"a {e.get('kind')} hybrid: only low/high hybrids are scored" if group is None and
                   e.get("task") == "hybrid" else "a prompt is empty (unconditional, or a part made from an image)")
            skipped.append({"file": e["file"], "why": why})
            continue
        key = (group.task, e.get("view_seed"), size, blur or e.get("sigma"))
        groups.setdefault(key, group).entries.append(e)
        groups[key].prompts.append(prompts)
    if not groups:
        raise UsageError(f"nothing in {run} can be scored with CLIP: no image has prompts (unconditional "
                         f"samples, or hybrids with a component from an image)")
    return ClipPlan(list(groups.values()), sizes, skipped)


def clip_scores(judge: ClipJudge, run: Path, plan: ClipPlan) -> dict[str, dict]:
    """file -> {task, checks, prompts, clip: {similarity, alignment, concealment}} for every scored image."""
    scores = {}
    for group in plan.groups:
        x = torch.cat([load_image(run / e["file"], plan.sizes[e["file"]], channels=3) for e in group.entries])
        S = view_similarity(judge, x, group.prompts, group.maps)
        for e, prompts, s in zip(group.entries, group.prompts, S):
            scores[e["file"]] = {"task": group.task, "checks": group.checks, "prompts": prompts,
                                 "clip": record(s, judge.tau)}
    return scores


def clip_order(scores: dict[str, dict]) -> list[str]:
    """The scored files best first: by alignment, ties broken by concealment (quality.clip.rank_order)."""
    files = list(scores)
    a = torch.tensor([scores[f]["clip"]["alignment"] for f in files], dtype=torch.float64)
    c = torch.tensor([scores[f]["clip"]["concealment"] for f in files], dtype=torch.float64)
    return [files[k] for k in rank_order(a, c).tolist()]


def clip_report(judge: ClipJudge, run: Path, entries: list[dict], plan: ClipPlan) -> dict:
    scores = clip_scores(judge, run, plan)
    ranks = {f: r + 1 for r, f in enumerate(clip_order(scores))}
    images = [dict(file=e["file"], **scores[e["file"]], rank=ranks[e["file"]]) for e in entries
              if e["file"] in scores]
    return {"run": str(run), "scorer": "clip",
            "clip": {"model": judge.name, "logit_scale": round(judge.logit_scale, 4), "tau": round(judge.tau, 6),
                     "device": str(judge.device), "dtype": str(judge.dtype).removeprefix("torch.")},
            "images": images, "skipped": plan.skipped}


def clip_table(report: dict) -> list[str]:
    """The scored images best first: alignment, concealment, and each view's similarity to its own prompt."""
    images = sorted(report["images"], key=lambda i: i["rank"])
    rows = [("#", "file", "alignment", "concealment", "views: own prompt (similarity)")]
    for i in images:
        own = "; ".join(f"{c}: {p} ({s[k]:.3f})" for k, (c, p, s) in
                        enumerate(zip(i["checks"], i["prompts"], i["clip"]["similarity"])))
        rows.append((str(i["rank"]), i["file"], f"{i['clip']['alignment']:.4f}", f"{i['clip']['concealment']:.4f}",
                     own))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    head = (f"{len(images)} images in {report['run']} scored with CLIP {report['clip']['model']} "
            f"(tau {report['clip']['tau']:.4g}), best first")
    lines = [head]
    lines += ["  ".join(v.rjust(w) if k != 1 else v.ljust(w) for k, (v, w) in enumerate(zip(r, widths)))
              + "  " + r[4] for r in rows]
    if images:
        mean_a = sum(i["clip"]["alignment"] for i in images) / len(images)
        mean_c = sum(i["clip"]["concealment"] for i in images) / len(images)
        lines.append(f"mean alignment {mean_a:.4f}, mean concealment {mean_c:.4f}")
    lines += [f"not scored: {s['file']} ({s['why']})" for s in report["skipped"]]
    return lines


# ---- the classifier ----------------------------------------------------------------------------------
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
        files = [{"file": e["file"], "prompts": [names[k] for k in ys], "predicted": [names[k] for k in ps],
                  "right": bool((ps == ys).all()), "score": round(s, 4)}
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
    lines = [(f"{report['images']} images in {report['run']}, scored with the {c['name']} classifier "
              f"(test accuracy {c.get('test_accuracy', float('nan')):.3f})")]
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
