"""The one path from a command to its files: resolve the settings, make the images (with tries, ranked where
asked), upscale them, write them. A `Job` says what differs per task: which images, how to make them on one
model, how to show them. Long runs stream: chunk by chunk, each written and listed as soon as it is made."""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from mirage import parallel
from mirage.app.report import run_page
from mirage.app.rundir import RunDir, disk_full
from mirage.app.settings import CHUNK, Settings, resolve, stage_record
from mirage.app.sheets import animate, best_above_rest, save_sheet
from mirage.backends.load import is_small, load_model, load_stage3, load_upscaler, resolve_device
from mirage.engine.denoiser import space_shape
from mirage.engine.guide import Guide, for_task
from mirage.engine.sample import Sampling
from mirage.engine.tasks import LowRes
from mirage.errors import UsageError
from mirage.io import load_image
from mirage.quality.classifier import classifier_for, guide_for
from mirage.quality.clip import ClipJudge, device_for, rank_order
from mirage.quality.clip import candidate_scores as clip_scores
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
    """What checks a job's images (a built-in classifier, or CLIP): how many tries each gets, how sure it must
    be. `scores(images, prompts, maps)` -> (score, right) per image: the classifier's score [n], CLIP's
    [n, 2] (alignment, then concealment: quality.clip.rank_keys), ranked by quality.selection.best_first."""

    name: str
    scores: Callable
    prompts: list[str]
    maps: list
    tries: int
    confidence: float

    def __call__(self, images: Tensor, items: list[dict]):
        return self.scores(images, [self.prompts] * len(images), self.maps)

    def record(self) -> dict:
        return dict(scorer=self.name, tries=self.tries,
                    **({"confidence": self.confidence} if self.name == "classifier" else {}))

    @staticmethod
    def fields(score: Tensor) -> dict:
        """What an image's entry keeps of its score: `score` (the classifier's, or CLIP's alignment A), and
        for CLIP `clip` with A and the concealment C, as `mirage score --clip` and `mirage rank` write them."""
        if score.dim() == 0:
            return {"score": round(float(score), 4)}
        a, c = score.tolist()
        return {"score": round(a, 4), "clip": {"alignment": round(a, 4), "concealment": round(c, 6)}}


class Models:
    """Models kept loaded between runs of one process: `size` sets (a stage-I model and its upscaler), the
    least recently used set freed when another model is picked. Size 0, the command line's, loads afresh."""

    def __init__(self, size: int = 0):
        self.size = size
        self.sets: dict[str, dict] = {}  # stage-I reference -> {key: loaded}, least recently used first

    def get(self, group: str, key: tuple, load: Callable):
        if self.size < 1:
            return load()
        kept = self.sets.pop(group, {})
        while self.sets and len(self.sets) >= self.size:  # freed before the next one loads
            self.sets.pop(next(iter(self.sets)))
            self.free()
        self.sets[group] = kept
        if key not in kept:
            kept[key] = load()
        return kept[key]

    def clear(self) -> None:
        self.sets.clear()
        self.free()

    @staticmethod
    def free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


models = Models()  # the web UI keeps one set; the command line none


def execute(args, job: Job) -> int:
    """Under torchrun each of N ranks makes every N-th image into the one run folder, which rank 0 claims
    and describes; alone, a process makes them all."""
    settings = resolve(args, job.task)  # every value checked before any model loads
    with parallel.session(resolve_device(settings.device)) as ctx:
        out = _folder(settings, job, ctx)
        try:
            with out:  # a run that stops early keeps its complete images, listed
                result, made = make_run(settings, job, out, ctx)
        except OSError as e:
            full = disk_full(e, out.path)
            if full is None:
                raise
            raise full from None
    if not settings.quiet and ctx.main:
        if "mp4_note" in out.extras:
            print(out.extras["mp4_note"], file=sys.stderr)
        print(f"wrote {made} image(s) to {out.path} (see {result.name})")
    return 0


def _folder(s: Settings, job: Job, ctx: parallel.Context) -> RunDir:
    out = RunDir(s.out, job.task, command=s.command) if ctx.main else None
    path = ctx.broadcast_object(None if out is None else str(out.path))
    return out or RunDir.joined(path, job.task, s.command, ctx.rank)


def make_run(s: Settings, job: Job, out: RunDir, ctx: parallel.Context):
    """Makes this rank's images into `out`; returns (result.json, how many images the run made)."""
    device = ctx.device
    model = models.get(s.model, ("model", str(device), s.memory, s.compile),
                       lambda: load_model(s.model, device, s.memory, s.compile))
    guide = _guide(s, model)
    stage1 = s.sampling(model, guide)
    if job.fits is not None:
        job.fits(model, stage1)
    judge = _judge(s, job, model, device)
    upscaler = models.get(s.model, ("upscaler", s.upscaler, str(device), s.memory, s.compile),
                          lambda: load_upscaler(s.upscaler, s.model, device, s.memory, s.compile))
    later = [] if upscaler is None else [Stage(upscaler, s.upscaling(upscaler), s.noise_level)]
    stages = [stage_record(s.model, model, stage1)]
    if upscaler is not None:
        stages.append(stage_record(s.upscaler, upscaler, later[0].sampling, noise_level=s.noise_level))
    if s.stage3 != "none":
        later.append(_stage3(s, device, upscaler))
        stages.append(stage_record(s.stage3, later[-1].model, later[-1].sampling, noise_level=s.noise_level3))
    record = dict(s.record(), stages=stages, **job.settings,
                  **(dict(classifier_guidance=guide.scale) if guide is not None else {}),
                  **(judge.record() if judge is not None else {}))
    _encode_once(model, job, ctx)
    wrong = 0  # images the judge never read right
    mine = range(ctx.rank, job.total, ctx.world)  # this rank's share: every N-th image
    per_chunk = s.chunk(len(mine))
    bar = tqdm(total=len(mine), unit="image", disable=s.quiet or not ctx.main or len(mine) <= per_chunk,
               desc=job.task)
    chunks = _chunks(islice(job.items, ctx.rank, None, ctx.world), per_chunk)
    if s.ranked:  # one chunk, ranked against every rank's: each rank joins, with no share too
        chunks = iter([next(chunks, [])])
    for items in chunks:
        images, low, items = _stages(s, job, model, later, items, stage1, judge)
        wrong += sum(1 for item in items if item.get("right") is False)
        if s.ranked:
            images, low, items = _ranked(ctx, images, low, items)
        _write(out, job, record, images, low, items, model.size)
        if ctx.main:
            out.save(force=False)
        bar.update(len(items))
    bar.close()
    made, wrong = (sum(v) for v in zip(*ctx.gather((out.count, wrong))))
    ctx.barrier()  # every rank's images and journal are complete
    if not ctx.main:  # rank 0 lists this rank's images from its journal
        return None, made
    if wrong and judge.tries > 1 and not s.quiet:
        print(f"{wrong} of {made} image(s) not read as their prompt(s) with {judge.confidence:.0%} "
              f"confidence in {judge.tries} tries: each keeps its best try (\"right\": false in result.json)",
              file=sys.stderr)
    if job.sheet is not None:
        save_sheet(out, _sheet(s, job, out), "sheet.png")
    result = out.finish()
    run_page(out.path)
    return result, made


@dataclass(frozen=True)
class Stage:
    """A super-resolution stage after stage I: its model, its loop, and the noise level of its low-res input."""
    model: object
    sampling: Sampling
    noise_level: int


def _stage3(s: Settings, device, upscaler) -> Stage:
    """The x4 upscaler after IF's stage II, at 4x stage II's size (each illusion's views act on its latents)."""
    if upscaler is None:
        raise UsageError("--stage3 upscales IF's stage-II images: give --upscaler (IF-II), or drop --stage3")
    third = models.get(s.model, ("stage3", s.stage3, str(device), s.memory, s.compile),
                       lambda: load_stage3(s.stage3, device, s.memory, s.compile))
    third.set_size(upscaler.size * (third.size // space_shape(third)[-1]))
    return Stage(third, s.stage3_sampling(third), s.noise_level3)


def _encode_once(model, job: Job, ctx: parallel.Context) -> None:
    """Under torchrun, rank 0 encodes the prompts into the shared cache first; the others then read them."""
    if not ctx.active:
        return
    if ctx.main:
        model.encode(sorted({*_prompts(job), ""}))
    ctx.barrier()


def _prompts(job: Job) -> list[str]:
    if "prompt" in job.settings:
        return [job.settings["prompt"]]
    return [p for p in job.settings.get("prompts", []) if p]


def _ranked(ctx: parallel.Context, images: Tensor, low: Tensor | None, items: list[dict]):
    """Every rank's candidates best first, with their rank; rank 0 holds them all (and writes them), the
    others none. Made in the order of one process, so that equal scores keep that order."""
    shares = ctx.gather((images, low, items))
    if not ctx.main:
        return images[:0], None if low is None else low[:0], []
    order_all = [(r, k) for k in range(max(len(sh[2]) for sh in shares)) for r in range(len(shares))
                 if k < len(shares[r][2])]
    images = torch.stack([shares[r][0][k] for r, k in order_all])
    low = None if low is None else torch.stack([shares[r][1][k] for r, k in order_all])
    items = [shares[r][2][k] for r, k in order_all]
    order = _order(items)
    items = [dict(items[k], rank=r + 1) for r, k in enumerate(order.tolist())]
    return images[order], None if low is None else low[order], items


def _order(items: list[dict]) -> Tensor:
    """Scored candidates best first: CLIP's by alignment with concealment breaking ties, as `mirage rank`
    orders them; the classifier's by score."""
    if all("clip" in item for item in items):
        a, c = (torch.tensor([item["clip"][k] for item in items], dtype=torch.float64)
                for k in ("alignment", "concealment"))
        return rank_order(a, c)
    return best_first(torch.tensor([item["score"] for item in items], dtype=torch.float64))


def _sheet(s: Settings, job: Job, out: RunDir):
    """The sheet of the run's first images (or, ranked, of the best above the rest), read back from their
    files, so that it shows what was written whichever rank wrote it."""
    entries = out.entries(CHUNK)
    images = torch.stack([_read_back(out.path / e["file"]) for e in entries])
    items = [{k: v for k, v in e.items() if k in ("seed", "start", "rank", "score", "right")} for e in entries]
    k = 1 if s.ranked else len(items)  # ranked: the best large, the rest small below
    sheet = job.sheet(images[:k], items[:k], job.task, job.settings)
    return sheet if k == len(items) else best_above_rest(sheet, images[k:], items[k:])


def _read_back(path) -> Tensor:
    """A PNG the run wrote, as the tensor it was made from (to 8 bits): its own size and channels."""
    with Image.open(path) as im:
        size, channels = im.width, 1 if im.mode == "L" else 3
    return load_image(path, size=size, channels=channels)[0]


def _stages(s: Settings, job: Job, model, later: list[Stage], items: list[dict], stage1: Sampling,
            judge: Judge | None):
    """(images, stage-I images where upscaled, items) of one chunk, made through stage I and the `later` ones,
    each model freed before the next one runs."""
    if not items:
        return torch.empty(0), None, []
    images, items = _make(s, job, model, items, stage1, judge)
    low, before = None if not later else images, model
    for stage in later:
        getattr(before, "free", lambda: None)()
        images = _batched(job.run, stage.model, items, stage.sampling, s.batch_size,
                          LowRes(images, stage.noise_level))
        before = stage.model
    return images, low, items


def _make(s: Settings, job: Job, model, items: list[dict], sampling: Sampling, judge: Judge | None):
    """One chunk's images at stage I: each remade up to --tries times where the judge reads it wrong."""
    def make(batch):
        return _batched(job.run, model, batch, sampling, s.batch_size)

    if judge is None:
        return make(items), items
    images, items, scores, right = first_right(make, judge, items, judge.tries)
    return images, [dict(item, **judge.fields(scores[k]), right=bool(right[k])) for k, item in enumerate(items)]


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


def _judge(s: Settings, job: Job, model, device) -> Judge | None:
    """What checks this job's images, None where nothing does. Asked for (--pick best, --tries N), it must
    be able to, or the job stops here before any work; the default tries apply only where a built-in
    classifier can check every prompt."""
    asked = [f for f, on in (("--pick best", s.ranked), ("--tries", s.tries not in (None, 1))) if on]
    prompts, maps = job.checks(model.size) if job.checks is not None else ([], [])
    scorer = s.scorer or ("classifier" if is_small(s.model) else "clip")
    if not asked:
        wanted = (s.tries is None and s.default_tries > 1 and job.checks is not None
                  and all(p.strip() for p in prompts) and scorer == "classifier")
        classifier = classifier_for(model) if wanted else None
        if classifier is None:
            return None
        return _classifier_judge(classifier, model, prompts, maps, s.default_tries, s.confidence)
    if job.checks is None:
        raise UsageError(f"{asked[0]} cannot check this {job.task}: only samples, anagrams and low/high hybrids")
    if not all(p.strip() for p in prompts):
        raise UsageError(f"{asked[0]} checks images against their prompts: give every prompt, not \"\"")
    tries = s.tries or s.default_tries
    if scorer == "clip":
        return _clip_judge(s, prompts, maps, tries, device)
    classifier = classifier_for(model)
    if classifier is None:
        raise UsageError(f"{asked[0]} with --scorer classifier checks images with a built-in model's classifier, "
                         f"and {s.model} has none: use --scorer clip, or --model fashion or digits")
    return _classifier_judge(classifier, model, prompts, maps, tries, s.confidence)


def _clip_judge(s: Settings, prompts, maps, tries: int, device) -> Judge:
    """CLIP loaded only while it works, as T5 is: now, before any UNet loads, for the prompts' text features,
    then for each scoring of images, given those features; freed each time. It runs on the run's device, or
    on the CPU where a UNet leaves that GPU too little free memory for it (said once)."""
    noted = []

    def load(texts=None) -> ClipJudge:
        where, note = device_for(s.clip, device)
        if note is not None and not noted and not s.quiet:
            noted.append(note)
            print(note, file=sys.stderr)
        return ClipJudge.load(s.clip, where, texts=texts)

    with load() as clip:
        texts = dict(zip(prompts, clip.text_features(prompts)))

    def scores(images, ps, ms):
        with load(texts) as clip:
            return clip_scores(clip, images, ps, ms)
    return Judge(f"clip {s.clip}", scores, list(prompts), list(maps), tries, s.confidence)


def _classifier_judge(classifier, model, prompts, maps, tries: int, confidence: float) -> Judge:
    def scores(images, ps, ms):
        return candidate_scores(classifier, model, images, ps, ms, confidence)
    return Judge("classifier", scores, list(prompts), list(maps), tries, confidence)
