"""The one path from a command to its files: resolve the settings, make the images (with tries, ranked where
asked), upscale them, write them. A `Job` says what differs per task: which images, how to make them on one
model, how to show them. Long runs stream: chunk by chunk, each written and listed as soon as it is made."""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mirage.app.rundir import RunDir, disk_full
from mirage.app.settings import Settings, resolve, stage_record
from mirage.app.sheets import animate, best_above_rest, save_sheet
from mirage.backends.load import load_model, load_upscaler, resolve_device
from mirage.engine.guide import Guide, for_task
from mirage.engine.sample import Sampling
from mirage.engine.tasks import LowRes
from mirage.errors import UsageError
from mirage.quality.classifier import classifier_for, guide_for
from mirage.quality.selection import best_first, candidate_scores, first_right

# (model, items, sampling, low_res) -> the images of those items
Run = Callable[[object, list[dict], Sampling, LowRes | None], Tensor]


@dataclass
class Job:
    task: str
    items: Iterable[dict]  # one per output image, its seed and whatever else varies per image; may be lazy
    total: int  # how many items there are
    run: Run
    settings: dict = field(default_factory=dict)  # the task's settings, shared by every image and recorded
    sheet: Callable | None = None  # (images, items, task, settings) -> the contact sheet
    views: list | None = None  # an illusion's views: each image also gets its animation
    checks: Callable | None = None  # size -> (prompts, maps): map i of an image should show prompt i (--pick)
    fits: Callable | None = None  # (model, sampling) -> None, or a UsageError where the job cannot run so


@dataclass
class Judge:
    """The built-in classifier checking a job's images: how many tries each gets, how sure it must be."""

    classifier: object
    model: object
    prompts: list[str]
    maps: list
    tries: int
    confidence: float

    def __call__(self, images: Tensor, items: list[dict]):
        return candidate_scores(self.classifier, self.model, images, [self.prompts] * len(images), self.maps,
                                self.confidence)


def execute(args, job: Job) -> int:
    settings = resolve(args, job.task)  # every value checked before any model loads
    out = RunDir(settings.out, job.task, command=shlex.join(["mirage", *settings.argv]))
    try:
        with out:  # a run that stops early keeps its complete images, listed
            result = make_run(settings, job, out)
    except OSError as e:
        full = disk_full(e, out.path)
        if full is None:
            raise
        raise full from None
    if not settings.quiet:
        if "mp4_note" in out.extras:
            print(out.extras["mp4_note"], file=sys.stderr)
        print(f"wrote {out.count} image(s) to {out.path} (see {result.name})")
    return 0


def make_run(s: Settings, job: Job, out: RunDir):
    device = resolve_device(s.device)
    model = load_model(s.model, device, s.memory, s.compile)
    guide = _guide(s, model)
    stage1 = s.sampling(model, guide)
    if job.fits is not None:
        job.fits(model, stage1)
    judge = _judge(s, job, model)
    upscaler = load_upscaler(s.upscaler, s.model, device, s.memory, s.compile)
    stage2 = s.upscaling(upscaler) if upscaler is not None else None
    stages = [stage_record(s.model, model, stage1)]
    if upscaler is not None:
        stages.append(stage_record(s.upscaler, upscaler, stage2, noise_level=s.noise_level))
    record = dict(s.record(), stages=stages, **job.settings,
                  **(dict(classifier_guidance=guide.scale) if guide is not None else {}),
                  **(dict(tries=judge.tries, confidence=judge.confidence) if judge is not None else {}))
    shown: tuple[Tensor, list[dict]] | None = None  # the first chunk: what the sheet shows
    wrong = 0  # images the judge never read right
    bar = tqdm(total=job.total, unit="image", disable=s.quiet or job.total <= s.chunk(job.total), desc=job.task)
    for items in _chunks(job.items, s.chunk(job.total)):
        images, items = _make(s, job, model, items, stage1, judge)
        wrong += sum(1 for item in items if item.get("right") is False)
        low = None
        if upscaler is not None:
            getattr(model, "free", lambda: None)()
            low = images
            images = _batched(job.run, upscaler, items, stage2, s.batch_size, LowRes(low, s.noise_level))
        if s.ranked:
            order = best_first(torch.tensor([item["score"] for item in items]))
            images, items = images[order], [dict(items[k], rank=r + 1) for r, k in enumerate(order.tolist())]
            low = None if low is None else low[order]
        _write(out, job, record, images, low, items, model.size)
        shown = shown or (images, items)
        out.save(force=False)
        bar.update(len(items))
    bar.close()
    if wrong and judge.tries > 1 and not s.quiet:
        print(f"{wrong} of {out.count} image(s) not read as their prompt(s) with {judge.confidence:.0%} "
              f"confidence in {judge.tries} tries: each keeps its best try (\"right\": false in result.json)",
              file=sys.stderr)
    if job.sheet is not None and shown is not None:
        images, items = shown
        k = 1 if s.ranked else len(items)  # ranked: the best large, the rest small below
        sheet = job.sheet(images[:k], items[:k], job.task, job.settings)
        save_sheet(out, sheet if k == len(items) else best_above_rest(sheet, images[k:], items[k:]), "sheet.png")
    return out.finish()


def _make(s: Settings, job: Job, model, items: list[dict], sampling: Sampling, judge: Judge | None):
    """One chunk's images at stage I: each remade up to --tries times where the judge reads it wrong."""
    def make(batch):
        return _batched(job.run, model, batch, sampling, s.batch_size)

    if judge is None:
        return make(items), items
    images, items, scores, right = first_right(make, judge, items, judge.tries)
    return images, [dict(item, score=round(float(scores[k]), 4), right=bool(right[k]))
                    for k, item in enumerate(items)]


def _write(out: RunDir, job: Job, record: dict, images: Tensor, low: Tensor | None, items: list[dict],
           size: int) -> None:
    for k, item in enumerate(items):
        entry = dict(record, **item)
        name = _name(job.task, item)
        if low is not None:
            entry["stage1_file"] = out.save_image(f"{name}-{size}px.png", low[k], entry)
        entry["file"] = out.save_image(f"{name}.png", images[k], entry)
        if job.views is not None:
            animate(out, [entry], images[k:k + 1], job.views, job.settings["prompts"])
        out.add(entry)


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _batched(run: Run, model, items: list[dict], sampling: Sampling, batch_size: int | None,
             low_res: LowRes | None = None) -> Tensor:
    """Runs the job in model calls of --batch-size images; each image depends on its seed alone, so the
    batch size changes nothing but memory."""
    size = batch_size or len(items)
    parts = []
    for lo in range(0, len(items), size):
        low = None if low_res is None else LowRes(low_res.images[lo:lo + size], low_res.noise_level)
        parts.append(run(model, items[lo:lo + size], sampling, low).float().cpu())
    return torch.cat(parts)


def _name(task: str, item: dict) -> str:
    extra = "".join(f"-{k}{v}" for k, v in item.items()  # the rank, not the try or whether it is right
                    if k not in ("seed", "try") and isinstance(v, int) and not isinstance(v, bool))
    return f"{task}-seed{item['seed']}{extra}"


def _guide(s: Settings, model) -> Guide | None:
    """Classifier guidance by the model's data set's guide at --classifier-guidance, by default at the
    strength the guide's file gives for this task (measured when it was shipped); None where that is 0."""
    asked = s.classifier_guidance
    classifier = guide_for(model) if asked != 0 else None
    if classifier is None:
        if asked:
            raise UsageError(f"--classifier-guidance steers class prompts with a built-in data set's guide, and "
                             f"{s.model} has none: drop it, or use --model fashion or digits")
        return None
    return for_task(classifier, s.task) if asked is None else Guide(classifier, asked)


def _judge(s: Settings, job: Job, model) -> Judge | None:
    """The classifier that checks this job's images, None where none does. Asked for (--pick best, --tries N),
    it must exist, or the job stops here before any work; the default tries apply only where it can check
    every prompt."""
    asked = [f for f, on in (("--pick best", s.ranked), ("--tries", s.tries not in (None, 1))) if on]
    prompts, maps = job.checks(model.size) if job.checks is not None else ([], [])
    if not asked:
        wanted = (s.tries is None and s.default_tries > 1 and job.checks is not None
                  and all(p.strip() for p in prompts))
        classifier = classifier_for(model) if wanted else None
        if classifier is None:
            return None
        return Judge(classifier, model, list(prompts), list(maps), s.default_tries, s.confidence)
    classifier = classifier_for(model)
    if classifier is None:
        raise UsageError(f"{asked[0]} checks images with a built-in model's classifier, and {s.model} has "
                         f"none: drop it, or use --model fashion or digits")
    if job.checks is None:
        raise UsageError(f"{asked[0]} cannot check this {job.task}: only samples, anagrams and low/high hybrids")
    if not all(p.strip() for p in prompts):
        raise UsageError(f"{asked[0]} checks images against class names: give every prompt a class, not \"\"")
    return Judge(classifier, model, list(prompts), list(maps), s.tries or s.default_tries, s.confidence)
