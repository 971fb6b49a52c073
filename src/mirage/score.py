"""How good are generated images? Measured with a small classifier of the data set (mirage.train.classifier):
class accuracy, Fréchet distance in its feature space, whether each view of an anagram and each component of
a hybrid shows its prompt, and a score to rank candidates by. `mirage score RUN_DIR` applies them to a run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MirageError, UsageError

Filter = Callable[[Tensor], Tensor]


# ---- images -------------------------------------------------------------------------------------
def prepare(images: Tensor, size: int) -> Tensor:
    """Any batch of images -> float [N, 1, size, size] in [-1, 1], as the classifier takes them: uint8
    [N, H, W] data-set images, or [N, C, H, W] model outputs in [-1, 1] (colour averaged to grey)."""
    if images.dtype == torch.uint8:
        images = images.float().div(127.5).sub(1)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.float().mean(dim=1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] > size else "bilinear")
    return x


def identity(x: Tensor) -> Tensor:
    return x


def hybrid_maps(size: int, sigma: float) -> list[Filter]:
    """How a low/high hybrid is checked: blurred (seen from afar) it shows the low prompt, as it is (close
    up) the high one. `sigma` is the low pass's, given at 64 px like the hybrid filters."""
    from .filters import lowpass

    return [lowpass(size, sigma), identity]


@torch.inference_mode()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([fn(part) for part in x.split(batch_size)])


def _size(classifier: nn.Module) -> int:
    return classifier.config.size if hasattr(classifier, "config") else 28


def log_probs(classifier: nn.Module, images: Tensor) -> Tensor:
    """[N, classes] log-probabilities."""
    return _batched(classifier, prepare(images, _size(classifier))).log_softmax(dim=1)


def predictions(classifier: nn.Module, images: Tensor) -> Tensor:
    return log_probs(classifier, images).argmax(dim=1)


# ---- Fréchet distance ---------------------------------------------------------------------------
def feature_stats(classifier: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of the classifier's features over `images`."""
    feats = _batched(classifier.features, prepare(images, _size(classifier))).double()
    if len(feats) < 2:
        raise ValueError("feature statistics need at least two images")
    return feats.mean(dim=0), torch.cov(feats.T)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (round-off) -> 0."""
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the Fréchet distance of two Gaussians. The
    product under the root is symmetric, so eigh does what scipy's sqrtm would, in float64."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(value.item(), 0.0)


def frechet_distance(classifier: nn.Module, images: Tensor, reference: Tensor | tuple[Tensor, Tensor]) -> float:
    """Fréchet distance between `images` and `reference` (images, or their (mean, covariance) as stored
    with a shipped classifier) in the classifier's feature space."""
    ref = reference if isinstance(reference, tuple) else feature_stats(classifier, reference)
    return frechet_from_stats(*feature_stats(classifier, images), *ref)


# ---- accuracies ---------------------------------------------------------------------------------
def class_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier puts in their class."""
    return (predictions(classifier, images) == labels.to(torch.long)).float().mean().item()


def map_predictions(classifier: nn.Module, images: Tensor, maps: Sequence[Filter]) -> Tensor:
    """[N, V]: the class the classifier sees in map i (a view, a blur) of each image."""
    return torch.stack([predictions(classifier, m(images)) for m in maps], 1)


def map_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]) -> dict:
    """Does map i of each image show class labels[:, i]? Per map the fraction right, and `all`: the
    fraction of images where every map is right."""
    labels = labels.to(torch.long).reshape(len(images), len(maps))
    return _fractions(map_predictions(classifier, images, maps) == labels)


def _fractions(right: Tensor) -> dict:
    return {"each": right.float().mean(0).tolist(), "all": right.all(1).float().mean().item()}


def illusion_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, views: Sequence) -> dict:
    """Anagrams: view i (views.View) of each image should show labels[:, i]."""
    return map_accuracy(classifier, images, labels, [v.view for v in views])


def hybrid_accuracy(classifier: nn.Module, images: Tensor, low_labels: Tensor, high_labels: Tensor,
                    blur: Filter) -> dict:
    """Hybrids: the blurred image (seen from afar) should show the low label, the full image the high one."""
    labels = torch.stack([torch.as_tensor(low_labels), torch.as_tensor(high_labels)], 1)
    return map_accuracy(classifier, images, labels, [blur, identity])


def rank(classifier: nn.Module, images: Tensor, labels: Tensor, views: Sequence | None = None) -> Tensor:
    """A score per image, higher is better: the mean log-probability of the right class over the views
    (labels [N] without views, [N, V] with V views). Sort candidates by it to keep the best."""
    return rank_maps(classifier, images, labels, [identity] if views is None else [v.view for v in views])


def rank_maps(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]) -> Tensor:
    """`rank` for any maps of the image (views, blurs)."""
    return _map_log_probs(classifier, images, labels, maps)[0].mean(1)


def _map_log_probs(classifier: nn.Module, images: Tensor, labels: Tensor, maps: Sequence[Filter]):
    """([N, V] log-probability of labels[:, i] in map i, [N, V] whether it is the classifier's choice there)."""
    labels = labels.to(torch.long).reshape(len(images), len(maps))
    per_map = [log_probs(classifier, m(images)) for m in maps]
    chosen = torch.stack([lp.gather(1, labels[:, i:i + 1])[:, 0] for i, lp in enumerate(per_map)], 1)
    right = torch.stack([lp.argmax(1) for lp in per_map], 1) == labels
    return chosen, right


def builtin_data(model) -> str | None:
    """The built-in data set (fashion, digits) of a class-conditioned small model, or None (IF, an
    unconditional model, another data set)."""
    data = getattr(model, "data", None)
    data = "digits" if data == "mnist" else data
    return data if data in BUILTIN and getattr(model, "class_names", None) else None


def classifier_for(model) -> nn.Module | None:
    """The shipped classifier of a class-conditioned built-in model's data set, or None: what ranks and
    checks candidates."""
    return _shipped(model, "classifier")


def guide_for(model) -> nn.Module | None:
    """The shipped guide (a classifier of noised images) of the model's data set, or None: what steers
    `--classifier-guidance`."""
    return _shipped(model, "guide")


def _shipped(model, kind: str) -> nn.Module | None:
    data = builtin_data(model)
    path = builtin_path(data, kind) if data else None
    return load_classifier(path) if path is not None and path.is_file() else None


def candidate_scores(classifier: nn.Module, model, images: Tensor, prompts: Sequence[Sequence[str]],
                     maps: Sequence[Filter], min_prob: float = 0.0) -> tuple[Tensor, Tensor]:
    """(score, right) per candidate: `rank_maps`'s score and whether the classifier reads every map as its
    prompt, with at least `min_prob`; prompts[k][i] is what maps[i] of image k should show, given as the
    model's class names."""
    labels = torch.tensor([[model.class_index(p) for p in row] for row in prompts])
    chosen, right = _map_log_probs(classifier, images, labels, maps)
    return chosen.mean(1), (right & (chosen.exp() >= min_prob)).all(1)


def candidate_seed(seed: int, j: int) -> int:
    """The noise seed of try j of the image with seed `seed` (`--tries`): the seed itself first, then steps
    of 2**32 / golden ratio, far from the small seeds people pick. Modulo 2**32: torch's CPU generator, which
    draws every image's noise, reads only a seed's low 32 bits."""
    return (seed + j * 0x9E3779B9) % 2**32


def first_right(make: Callable, judge: Callable, items: list[dict], tries: int):
    """Rejection sampling: each item's first try (seeds `candidate_seed(seed, 0..tries-1)`) that `judge`
    reads right, or its best-scoring try where none is. It keeps the model's own variety, where ranking
    candidates keeps the most typical ones. Only the items still wrong are made again.
    make(items) -> images; judge(images, items) -> (scores, right). Returns (images, items with `try`,
    scores, right)."""
    images = make(items)
    scores, right = judge(images, items)
    chosen = [dict(item, **{"try": 0}) for item in items]
    for j in range(1, tries):
        todo = (~right).nonzero()[:, 0]
        if len(todo) == 0:
            break
        again = [dict(items[k], seed=candidate_seed(items[k]["seed"], j)) for k in todo.tolist()]
        new = make(again)
        new_scores, new_right = judge(new, again)
        take = new_right | (new_scores > scores[todo])
        for i in take.nonzero()[:, 0].tolist():
            k = int(todo[i])
            images[k], scores[k], right[k] = new[i], new_scores[i], new_right[i]
            chosen[k] = dict(items[k], **{"try": j})
    return images, chosen, scores, right


# ---- classifiers --------------------------------------------------------------------------------
def builtin_path(name: str, kind: str = "classifier") -> Path:
    """A shipped classifier (kind "classifier") or guide (kind "guide") of data set `name`."""
    return Path(__file__).parent / "builtin" / f"{kind}_{name}.safetensors"


def load_classifier(name_or_path: str | Path) -> nn.Module:
    """A shipped classifier by data-set name (fashion, digits or mnist) or one `mirage train classifier` wrote."""
    from .train.classifier import load

    name = str(name_or_path)
    name = "digits" if name == "mnist" else name
    return load(builtin_path(name) if name in BUILTIN else Path(name))


def reference_fd(name_or_classifier: str | Path | nn.Module) -> float:
    """The Fréchet distance between 1000 real training images and the test set, measured when the classifier
    was trained: what a sample run of 1000 images is compared with (the target is <= 2x this)."""
    classifier = name_or_classifier
    if not isinstance(classifier, nn.Module):
        classifier = load_classifier(classifier)
    return classifier.info["reference_fd"]


def test_stats(classifier: nn.Module) -> tuple[Tensor, Tensor]:
    """The test set's feature mean and covariance stored with the classifier."""
    return classifier.test_mu, classifier.test_sigma


# ---- mirage score RUN_DIR -----------------------------------------------------------------------
BUILTIN = ("fashion", "digits")
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
    from .io import unique_path, write_json

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
    from .views import parse_views

    task = entry.get("task", "sample")
    if entry.get("views"):
        views = parse_views(entry["views"], entry.get("view_seed", 0))
        return Group("anagram " + "+".join(entry["views"]), list(entry["views"]), [v.view for v in views])
    if task == "hybrid":
        if entry.get("kind", "lowhigh") != "lowhigh":
            return None
        from .filters import SIGMA

        return Group("hybrid", ["low (blurred)", "high (full image)"],
                     hybrid_maps(size, blur or entry.get("sigma") or SIGMA))
    if entry.get("prompt") is not None:
        return Group(task, ["image"], [identity])
    return None


def _prompts(entry: dict) -> list[str]:
    return list(entry["prompts"]) if "prompts" in entry else [entry["prompt"]]


def score_run(classifier: nn.Module, run: Path, entries: list[dict], blur: float | None = None) -> dict:
    """Scores of every group of images in a run, plus per image what the classifier saw."""
    from .io import load_image

    size = _size(classifier)
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
    from .train.data import match_class

    names = classifier.config.class_names
    result: dict = {"task": group.task, "images": len(x), "checks": group.checks}
    labels = [[match_class(classifier.config.data, p) for p in ps] for ps in group.prompts]
    prompted = torch.tensor([None not in ls for ls in labels])
    files = []
    if prompted.any():
        y = torch.tensor([ls for ls, ok in zip(labels, prompted) if ok])
        xs = x[prompted]
        predicted = map_predictions(classifier, xs, group.maps)
        acc = _fractions(predicted == y)
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
