"""What each `mirage` subcommand does: a `Job` (which images, how to make them on one model) handed to one
pipeline that loads the models, runs stage I then stage II, and writes images, sheets and result.json."""
from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from PIL import Image
from torch import Tensor

from mirage import __version__
from mirage.app import demo
from mirage.app.args import Command, parse_interval, seeds_of
from mirage.app.defaults import SMALL_DEFAULTS, task_defaults
from mirage.app.rundir import RunDir
from mirage.backends import deepfloyd, prompts
from mirage.backends.load import is_small, load_model, load_upscaler, resolve_device
from mirage.backends.memory import check_plan
from mirage.engine import tasks
from mirage.engine.guide import Guide, check_strength, for_task
from mirage.engine.sample import Noise, validate
from mirage.engine.schedule import ddim_step, ddpm_step
from mirage.errors import UsageError
from mirage.illusions.animate import illusion_animation, save_gif, save_mp4
from mirage.illusions.filters import SIGMA, gaussian_blur, make_components
from mirage.illusions.views import VIEW_NAMES, parse_views
from mirage.io import atomic_write, contact_sheet, load_image, load_mask, to_pil
from mirage.quality.classifier import classifier_for, guide_for
from mirage.quality.metrics import hybrid_maps, identity
from mirage.quality.selection import candidate_scores, first_right

Run = Callable[..., Tensor]  # (model, items, **stage) -> images for those items


@dataclass
class Job:
    task: str
    items: list[dict]  # one per output image: its seed and whatever else varies per image
    run: Run
    settings: dict = field(default_factory=dict)  # shared by every image
    sheet: Callable | None = None  # (images, items, job) -> the contact sheet (a picture)
    views: list | None = None  # the illusion's views, for its sheet and animation
    checks: Callable | None = None  # size -> (prompts, maps): map i of an image should show prompt i (--pick)
    timesteps: Callable | None = None  # model -> stage I's timesteps where --steps' spacing is not used


# ---- the pipeline ---------------------------------------------------------------------------------
def execute(args, job: Job) -> int:
    defaults = task_defaults(is_small(args.model), job.task)
    stage1 = dict(steps=defaults["steps"] if args.steps is None else args.steps,
                  guidance=defaults["guidance"] if args.guidance is None else args.guidance)
    validate(**stage1)  # settings first: a wrong one is reported before any model is loaded
    interval = (defaults["guidance_interval"] if args.guidance_interval is None
                else parse_interval(args.guidance_interval))
    if interval is not None:
        stage1["guidance_interval"] = interval
    confidence = defaults["confidence"] if getattr(args, "confidence", None) is None else args.confidence
    if not 0 <= confidence < 1:
        raise UsageError(f"--confidence is a probability below 1, got {confidence}")
    if args.classifier_guidance is not None:
        check_strength(args.classifier_guidance)
    check_plan(args.memory)  # for every model: a built-in one must not take a plan it ignores silently
    if not 0 <= args.eta <= 1:  # also rejects NaN
        raise UsageError(f"--eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {args.eta}")
    out = RunDir(args.out, job.task, command=shlex.join(["mirage", *args.argv]))
    device = resolve_device(args.device)
    model = load_model(args.model, device, args.memory, args.compile)
    guide = _guide(args, model, job.task)
    step = ddpm_step if args.sampler == "ddpm" else (lambda *a: ddim_step(*a, eta=args.eta))
    ranked = getattr(args, "pick", "none") == "best"
    classifier, tries = _checker(args, job, model, ranked, defaults["tries"])

    # the timesteps that run, resolved once: what every image is made with and what its record says
    timesteps = job.timesteps(model) if job.timesteps else model.schedule.timesteps(stage1["steps"])
    stage1 = dict(stage1, steps=len(timesteps), timesteps=timesteps)

    def make(items):
        return _batched(job.run, model, items, args, step=step, guide=guide, progress=not args.quiet, **stage1)

    def judge(images, _items):
        prompts, maps = job.checks(images.shape[-1])
        return candidate_scores(classifier, model, images, [prompts] * len(images), maps, confidence)

    items = job.items
    if classifier is None:
        images = make(items)
    else:
        images, items, scores, right = first_right(make, judge, items, tries)
        if tries > 1 and not right.all() and not args.quiet:
            print(f"{int((~right).sum())} of {len(items)} image(s) not read as their prompt(s) with "
                  f"{confidence:.0%} confidence in {tries} tries: "
                  f"each keeps its best try (\"right\": false in result.json)", file=sys.stderr)
    stages = [dict(model=args.model, size=model.size, **stage1)]
    upscaler = load_upscaler(args.upscaler, args.model, device, args.memory, args.compile)
    if upscaler is not None:
        stage2 = dict(steps=args.steps2, guidance=args.guidance2)
        validate(**stage2)
        getattr(model, "free", lambda: None)()
        low = images
        images = _batched(job.run, upscaler, items, args, low_res=low, noise_level=args.noise_level,
                          step=step, progress=not args.quiet, **stage2)
        stages.append(dict(model=args.upscaler, size=upscaler.size, noise_level=args.noise_level, **stage2))
    if classifier is not None:
        order = scores.argsort(descending=True, stable=True) if ranked else torch.arange(len(items))
        images = images[order]
        if upscaler is not None:
            low = low[order]
        items = [dict(items[k], score=round(float(scores[k]), 4), right=bool(right[k]),
                      **({"rank": r + 1} if ranked else {})) for r, k in enumerate(order.tolist())]
    settings = dict(task=job.task, mirage=__version__, argv=args.argv, sampler=args.sampler,
                    **(dict(eta=args.eta) if args.sampler == "ddim" else {}), stages=stages, **job.settings,
                    **(dict(classifier_guidance=guide.scale) if guide is not None else {}),
                    **(dict(tries=tries, confidence=confidence) if classifier is not None else {}))
    for k, item in enumerate(items):
        entry = dict(settings, **item)
        name = _name(job.task, item)
        if upscaler is not None:
            entry["stage1_file"] = out.save_image(f"{name}-{model.size}px.png", low[k], entry)
        entry["file"] = out.save_image(f"{name}.png", images[k], entry)
        out.add(entry)
    if job.sheet is not None:
        shown = 1 if ranked else len(items)  # ranked: the best large, the rest small below
        sheet = job.sheet(images[:shown], items[:shown], job)
        save_sheet(out, sheet if shown == len(items) else _with_rest(sheet, images[shown:], items[shown:]),
                   "sheet.png")
    if job.views is not None:
        _animations(out, images, job)
    if "mp4_note" in out.extras and not args.quiet:
        print(out.extras["mp4_note"], file=sys.stderr)
    result = out.finish()
    if not args.quiet:
        print(f"wrote {len(items)} image(s) to {out.path} (see {result.name})")
    return 0


def _guide(args, model, task: str) -> Guide | None:
    """Classifier guidance by the model's data set's guide at --classifier-guidance, by default at the
    strength the guide's file gives for this task (measured when it was shipped); None where that is 0."""
    asked = args.classifier_guidance
    classifier = guide_for(model) if asked != 0 else None
    if classifier is None:
        if asked:
            raise UsageError(f"--classifier-guidance steers class prompts with a built-in data set's guide, and "
                             f"{args.model} has none: drop it, or use --model fashion or digits")
        return None
    return for_task(classifier, task) if asked is None else Guide(classifier, asked)


# ---- --pick and --tries: the built-in model's classifier checks its candidates ----------------------------
def pick_args(p) -> None:
    p.add_argument("--pick", choices=("none", "best"), default="none",
                   help="best: rank all --n candidates with the built-in model's classifier (mirage score) and "
                        "list them best first; the sheet shows the best large and the rest small")
    p.add_argument("--tries", type=int, default=None,
                   help="make each image up to N times (new noise each time) until the built-in model's "
                        "classifier reads it as its prompt(s): every view, both hybrid halves; else keep its "
                        "best try (default: 3 for built-in samples of a class, else 1)")
    p.add_argument("--confidence", type=float, default=None,
                   help="how sure the classifier must be of each prompt for an image to pass (default 0.5 for "
                        "samples, 0.9 for illusions, whose views are far from what it was trained on)")


def _checker(args, job: Job, model, ranked: bool, default_tries: int):
    """(classifier, tries): the classifier that checks this job's images, None where none does, and the tries
    each image gets. Asked for (--pick best, --tries N), it must exist, or the job stops here before any
    work; the default tries apply only where it can check every prompt."""
    tries = getattr(args, "tries", None)
    if tries is not None and tries < 1:
        raise UsageError(f"--tries must be at least 1, got {tries}")
    asked = [f for f, on in (("--pick best", ranked), ("--tries", tries not in (None, 1))) if on]
    prompts = job.checks(model.size)[0] if job.checks is not None else []
    if not asked:
        wanted = tries is None and default_tries > 1 and job.checks is not None and all(p.strip() for p in prompts)
        classifier = classifier_for(model) if wanted else None
        return (classifier, default_tries) if classifier is not None else (None, 1)
    classifier = classifier_for(model)
    if classifier is None:
        raise UsageError(f"{asked[0]} checks images with a built-in model's classifier, and {args.model} has "
                         f"none: drop it, or use --model fashion or digits")
    if job.checks is None:
        raise UsageError(f"{asked[0]} cannot check this {job.task}: only samples, anagrams and low/high hybrids")
    if not all(p.strip() for p in prompts):
        raise UsageError(f"{asked[0]} checks images against class names: give every prompt a class, not \"\"")
    return classifier, tries or default_tries


def _with_rest(sheet, images: Tensor, items: list[dict]):
    """The best candidate's sheet above the other candidates, small, with their rank and score."""
    cells = [(to_pil(img), f"#{item['rank']} seed {item['seed']} ({item['score']:.2f})")
             for img, item in zip(images, items)]
    rest = contact_sheet([cells[i:i + 8] for i in range(0, len(cells), 8)], title="the other candidates",
                         cell=min(96, max(48, 2 * images.shape[-1])))
    page = Image.new("RGB", (max(sheet.width, rest.width), sheet.height + rest.height), "white")
    page.paste(sheet, (0, 0))
    page.paste(rest, (0, sheet.height))
    return page


def _name(task: str, item: dict) -> str:
    extra = "".join(f"-{k}{v}" for k, v in item.items()  # the rank, not the try or whether it is right
                    if k not in ("seed", "try") and isinstance(v, int) and not isinstance(v, bool))
    return f"{task}-seed{item['seed']}{extra}"


def _batched(run: Run, model, items: list[dict], args, low_res: Tensor | None = None, **stage) -> Tensor:
    """Runs the job in chunks of --batch-size images; each image depends on its seed alone, so chunking
    changes nothing but memory."""
    size = args.batch_size if args.batch_size > 0 else len(items)
    parts = []
    for lo in range(0, len(items), size):
        low = None if low_res is None else low_res[lo:lo + size]
        parts.append(run(model, items[lo:lo + size], low_res=low, **stage).float().cpu())
    return torch.cat(parts)


def seeds(items: list[dict]) -> list[int]:
    return [item["seed"] for item in items]


# ---- sample -------------------------------------------------------------------------------------
def sample_args(p):
    p.add_argument("--prompt", default="", help='what to draw ("" = unconditional)')
    pick_args(p)


def sample_cmd(args) -> int:
    def run(model, items, **stage):
        return tasks.sample(model, args.prompt, seeds(items), **stage)

    return execute(args, Job("sample", [dict(seed=s) for s in seeds_of(args)], run,
                             settings=dict(prompt=args.prompt), sheet=_grid_sheet,
                             checks=lambda size: ([args.prompt], [identity])))


# ---- edits --------------------------------------------------------------------------------------
def image_args(p, prompt_default="a high quality photo"):
    p.add_argument("--image", required=True, help="input image (any size or mode: center-cropped and resized)")
    p.add_argument("--prompt", default=None, help=f'text guidance (default "{prompt_default}" for IF, '
                                                  '"" for built-in models)')


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    return "" if is_small(args.model) else "a high quality photo"


def _timesteps(model, args) -> list[int]:
    """The course's strided list (990, 960, ... 0) unless --steps asks for diffusers' spacing."""
    return model.schedule.strided() if args.steps is None else model.schedule.timesteps(args.steps)


@lru_cache(maxsize=8)
def _load(path: str, size: int, channels: int) -> Tensor:
    return load_image(path, size=size, channels=channels)


def image_for(model, args) -> Tensor:
    return _load(args.image, model.size, model.channels).to(model.device)


def edit_args(p):
    image_args(p)
    p.add_argument("--start", default="1,3,5,7,10,20",
                   help="start indices into the strided timesteps: how much of the image to keep (default "
                        "1,3,5,7,10,20; larger keeps more)")


def edit_cmd(args) -> int:
    try:
        starts = [int(v) for v in args.start.split(",")]
    except ValueError:
        raise UsageError(f"--start takes comma-separated whole numbers, got {args.start!r}") from None
    if len(set(starts)) < len(starts):
        raise UsageError(f"--start names a start step more than once ({args.start}): each makes one image")
    prompt = _prompt(args)

    def run(model, items, low_res=None, **stage):
        if low_res is not None:  # stage II upscales the edit, guided by the prompt
            return tasks.sample(model, prompt, seeds(items), low_res=low_res, **stage)
        out = torch.empty(len(items), model.channels, model.size, model.size)
        for start in sorted({item["start"] for item in items}):
            idx = [k for k, item in enumerate(items) if item["start"] == start]
            out[idx] = tasks.edit(model, image_for(model, args), prompt, [items[k]["seed"] for k in idx],
                                  start=start, **stage).float().cpu()
        return out

    items = [dict(seed=s, start=i) for s in seeds_of(args) for i in starts]
    return execute(args, Job("edit", items, run, settings=dict(prompt=prompt, image=args.image),
                             sheet=_series_sheet, timesteps=lambda model: _timesteps(model, args)))


def inpaint_args(p):
    image_args(p)
    p.add_argument("--mask", help="mask PNG: white = regenerate, black = keep")
    p.add_argument("--box", help="x0,y0,x1,y1 in the image's pixels (after center crop) to regenerate")
    p.add_argument("--resample", type=int, default=1, help="RePaint resampling per step (default 1 = off)")


def mask_for(model, args) -> Tensor:
    return load_mask(args.mask, args.box, args.image, model.size).to(model.device)


def inpaint_cmd(args) -> int:
    if (args.mask is None) == (args.box is None):
        raise UsageError("give exactly one of --mask FILE or --box x0,y0,x1,y1")
    if args.resample < 1:
        raise UsageError(f"--resample must be at least 1, got {args.resample}")
    prompt = _prompt(args)

    def run(model, items, **stage):
        return tasks.inpaint(model, image_for(model, args), mask_for(model, args), prompt, seeds(items),
                             resample=args.resample, **stage)

    job = Job("inpaint", [dict(seed=s) for s in seeds_of(args)], run,
              settings=dict(prompt=prompt, image=args.image, mask=args.mask, box=args.box,
                            resample=args.resample), sheet=_grid_sheet)
    return execute(args, job)


# ---- illusions -----------------------------------------------------------------------------------
def anagram_args(p):
    p.add_argument("--prompt", action="append", required=True, help="one per view, in the order of --view")
    p.add_argument("--view", action="append", help="identity, flip, rotate_cw, ... (default: identity, then "
                                                   "flip; see `mirage views`)")
    p.add_argument("--reduce", choices=("mean", "alternate"), default="mean",
                   help="average the views' estimates every step, or take one view per step")
    p.add_argument("--view-seed", type=int, default=0, help="seed of random permutation views (jigsaw, ...)")
    pick_args(p)


def anagram_cmd(args) -> int:
    names = args.view or ["identity", "flip"][:max(2, len(args.prompt))]
    if len(names) < 2:
        raise UsageError("an anagram needs at least two views")
    if len(args.prompt) != len(names):
        raise UsageError(f"{len(names)} views ({', '.join(names)}) need {len(names)} prompts, one per view; "
                         f"got {len(args.prompt)}")
    views = parse_views(names, args.view_seed)

    def run(model, items, **stage):
        return tasks.anagram(model, args.prompt, views, seeds(items), reduce=args.reduce, **stage)

    return execute(args, Job("anagram", [dict(seed=s) for s in seeds_of(args)], run, views=views,
                             settings=dict(prompts=args.prompt, views=names, view_seed=args.view_seed,
                                           reduce=args.reduce), sheet=_illusion_sheet,
                             checks=lambda size: (args.prompt, [v.view for v in views])))


HYBRID_KINDS = {"lowhigh": ("low", "high"), "lowmidhigh": ("low", "mid", "high"), "graycolor": ("gray", "color"),
                "motion": ("motion", "still")}


def hybrid_args(p):
    p.add_argument("--kind", choices=sorted(HYBRID_KINDS), default="lowhigh",
                   help="which factorization: low/high pass (default), low/mid/high, gray/color, motion")
    for part in ("low", "mid", "high", "gray", "color", "motion", "still"):
        p.add_argument(f"--{part}", help=f"prompt for the {part} component")
    p.add_argument("--sigma", type=float, default=None,
                   help=f"low/high split: Gaussian sigma in px at 64 px, scaled with the resolution (default {SIGMA:g} "
                        f"for IF, {SMALL_DEFAULTS['sigma_hybrid']:g} for built-in models)")
    p.add_argument("--image", help="take one component from this image instead of a prompt (inverse problem)")
    p.add_argument("--image-component", help="which component the image gives (default: the first, e.g. low "
                                             "or gray)")
    pick_args(p)


def hybrid_cmd(args) -> int:
    parts = HYBRID_KINDS[args.kind]
    from_image = None
    if args.image:
        from_image = args.image_component or parts[0]
        if from_image not in parts:
            raise UsageError(f"--image-component must be one of {', '.join(parts)} for --kind {args.kind}")
    prompts = ["" if part == from_image else getattr(args, part) for part in parts]
    missing = [f"--{part}" for part, p in zip(parts, prompts) if p is None]
    if missing:
        raise UsageError(f"a {args.kind} hybrid needs {' and '.join(missing)}")
    sigma = args.sigma if args.sigma is not None else task_defaults(is_small(args.model), "hybrid")["sigma"]
    if not (math.isfinite(sigma) and sigma > 0):
        raise UsageError(f"--sigma must be a finite positive number, got {sigma}")

    def run(model, items, **stage):
        kw = {}
        if from_image is not None:
            kw = dict(image=image_for(model, args), image_component=parts.index(from_image))
        return tasks.hybrid(model, prompts, seeds(items), kind=args.kind, sigma=sigma, **kw, **stage)

    job = Job("hybrid", [dict(seed=s) for s in seeds_of(args)], run, sheet=_hybrid_sheet,
              settings=dict(kind=args.kind, sigma=sigma, prompts=prompts, components=list(parts),
                            image=args.image, image_component=from_image),
              checks=(lambda size: (prompts, hybrid_maps(size, sigma)))
              if args.kind == "lowhigh" and from_image is None else None)
    return execute(args, job)


# ---- the denoising study (course Part A 1.1-1.6) ------------------------------------------------
def denoise_args(p):
    image_args(p)
    p.add_argument("--levels", default="250,500,750", help="noise levels out of 1000 (default 250,500,750)")
    p.add_argument("--i-start", type=int, default=10, help="start index of iterative denoising (default 10)")
    p.add_argument("--every", type=int, default=5, help="show every k-th iterative step (default 5)")


def denoise_cmd(args) -> int:
    out = RunDir(args.out, "denoise", command=shlex.join(["mirage", *args.argv]))
    model = load_model(args.model, resolve_device(args.device), args.memory)
    T = model.schedule.num_train_timesteps
    try:
        levels = [min(T - 1, int(v) * T // 1000) for v in args.levels.split(",")]
    except ValueError:
        raise UsageError(f"--levels takes comma-separated numbers, got {args.levels!r}") from None
    prompt, guidance = _prompt(args), 1.0 if args.guidance is None else args.guidance
    validate(guidance=guidance)
    image, seed = image_for(model, args), seeds_of(args)[0]
    noise = Noise([seed], device=model.device)
    noisy = [model.schedule.forward(image, t, noise.draw(image.shape[1:])) for t in levels]
    blur = dict(kernel=max(3, model.size // 13 * 2 + 1), sigma=model.size / 32)
    rows = [[(to_pil(image[0]), "original")] + [(to_pil(x[0]), f"noisy t={t}") for x, t in zip(noisy, levels)],
            [(to_pil(image[0]), "")] + [(to_pil(gaussian_blur(x, **blur)[0]), f"blur t={t}")
                                        for x, t in zip(noisy, levels)],
            [(to_pil(image[0]), "")] + [(to_pil(tasks.one_step(model, x, t, prompt, guidance)[0]), f"one-step t={t}")
                                        for x, t in zip(noisy, levels)]]
    ts = _timesteps(model, args)
    if not 0 <= args.i_start < len(ts):
        raise UsageError(f"--i-start {args.i_start} is out of range: use 0 to {len(ts) - 1}")
    shown = []
    keep = lambda i, t, x: shown.append((to_pil(x[0]), f"t={max(t, 0)}")) if i % args.every == 0 else None  # noqa
    final = tasks.edit(model, image, prompt, [seed], start=args.i_start, timesteps=ts, guidance=guidance,
                       callback=keep, progress=not args.quiet)
    start_noisy = model.schedule.forward(image, ts[args.i_start], Noise([seed], model.device).draw(image.shape[1:]))
    rows.append(shown + [(to_pil(final[0]), "iterative"),
                         (to_pil(tasks.one_step(model, start_noisy, ts[args.i_start], prompt, guidance)[0]),
                          "one-step"),
                         (to_pil(gaussian_blur(start_noisy, **blur)[0]), "blur")])
    settings = dict(task="denoise", mirage=__version__, argv=args.argv, model=args.model, prompt=prompt, guidance=guidance, levels=levels,
                    i_start=args.i_start, timesteps=ts, image=args.image, seed=seed)
    out.add(dict(settings, file=out.save_image("denoised.png", final[0], settings)))
    save_sheet(out, contact_sheet(rows, title=f"denoising study: {args.image}"), "sheet.png")
    out.finish(sheet="sheet.png")
    if not args.quiet:
        print(f"wrote the denoising study to {out.path}")
    return 0


def embed_args(p):
    p.add_argument("prompts", nargs="+", help="prompts to encode and cache")
    p.add_argument("--model", default="DeepFloyd/IF-I-XL-v1.0", help="IF stage-I hub id or folder (its T5)")
    p.add_argument("--device", default="auto")


# ---- sheets -------------------------------------------------------------------------------------
def save_sheet(out: RunDir, picture, name: str) -> str:
    atomic_write(out.file(name), lambda tmp: picture.save(tmp, format="PNG"))
    out.extras.setdefault("sheets", []).append(name)
    return name


def _grid_sheet(images: Tensor, items: list[dict], job: Job):
    cols = min(8, len(items))
    cells = [(to_pil(img), f"seed {item['seed']}") for img, item in zip(images, items)]
    rows = [cells[i:i + cols] for i in range(0, len(cells), cols)]
    return contact_sheet(rows, title=_title(job))


def _series_sheet(images: Tensor, items: list[dict], job: Job):
    """SDEdit: one row per seed, the series by start index as the course labels it, then the original."""
    size = images.shape[-1]
    original = to_pil(load_image(job.settings["image"], size=size, channels=images.shape[1])[0])
    rows = []
    for seed in dict.fromkeys(item["seed"] for item in items):
        row = [(to_pil(img), f"i_start={item['start']}") for img, item in zip(images, items) if item["seed"] == seed]
        rows.append(row + [(original, "original")])
    return contact_sheet(rows, title=_title(job), row_labels=[f"seed {s}" for s in dict.fromkeys(seeds(items))])


def _illusion_sheet(images: Tensor, items: list[dict], job: Job):
    """Each view of each result under its prompt."""
    prompts = job.settings["prompts"]
    rows = [[(to_pil(v.view(img[None])[0]), f"{v.name}: {p}") for v, p in zip(job.views, prompts)]
            for img in images]
    return contact_sheet(rows, title=_title(job), row_labels=[f"seed {s}" for s in seeds(items)])


def _animations(out: RunDir, images: Tensor, job: Job) -> None:
    """For each illusion an animation turning from view to view (GIF, and MP4 where ffmpeg is)."""
    prompts = job.settings["prompts"]
    for entry, img in zip(out.entries, images):
        frames = illusion_animation(img, job.views, [f"{v.name}: {p}" for v, p in zip(job.views, prompts)])
        stem = entry["file"].removesuffix(".png")
        entry["animation"] = save_gif(out.file(f"{stem}.gif"), frames).name
        note = save_mp4(out.file(f"{stem}.mp4"), frames)
        if note is None:
            entry["video"] = f"{stem}.mp4"
        else:
            out.extras["mp4_note"] = note


def _hybrid_sheet(images: Tensor, items: list[dict], job: Job):
    """Each hybrid and each of its components as a viewer sees it: the full image (close up) and the other
    components alone (from afar: the low pass; without color: the gray part; ...)."""
    parts, prompts = job.settings["components"], job.settings["prompts"]
    components = make_components(job.settings["kind"], images.shape[-1], job.settings["sigma"])
    rows = []
    for img in images:
        row = [(to_pil(img), "the hybrid")]
        row += [(to_pil(c(img[None])[0].clamp(-1, 1)), f"{part}: {p or 'from the image'}")
                for c, part, p in zip(components, parts, prompts) if part not in ("high", "color", "still")]
        row.append((to_pil(img).resize((max(8, img.shape[-1] // 4),) * 2), "small (far away)"))
        rows.append(row)
    return contact_sheet(rows, title=_title(job), row_labels=[f"seed {s}" for s in seeds(items)])


def _title(job: Job) -> str:
    shown = {k: v for k, v in job.settings.items() if k in ("prompt", "prompts", "views", "kind")}
    return f"{job.task}: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def views_cmd(args) -> int:
    print("\n".join(VIEW_NAMES))
    return 0


def fetch_args(p):
    p.add_argument("models", nargs="+", help="hub ids to download once, e.g. DeepFloyd/IF-I-XL-v1.0")
    p.add_argument("--fp32", action="store_true", help="full-precision weights instead of the fp16 variant")


COMMANDS = [
    Command("sample", "generate images from a prompt", sample_args, sample_cmd),
    Command("denoise", "the denoising study on an image: noise levels, blur, one-step and iterative denoising",
            denoise_args, denoise_cmd),
    Command("edit", "SDEdit / text-guided image-to-image at several strengths", edit_args, edit_cmd),
    Command("inpaint", "regenerate the masked part of an image", inpaint_args, inpaint_cmd),
    Command("anagram", "visual anagram: an image that shows another prompt under each view", anagram_args,
            anagram_cmd),
    Command("hybrid", "hybrid image: each component (low/high pass, gray/color, ...) shows its own prompt",
            hybrid_args, hybrid_cmd),
    Command("views", "list the views anagrams can use", lambda p: None, views_cmd, common=False),
    Command("fetch", "download IF weights once (needs network and, for DeepFloyd, an accepted licence)",
            fetch_args, deepfloyd.fetch_command, common=False),
    Command("demo", "the course's deliverable set on the built-in models, as one HTML report",
            demo.add_arguments, demo.handler, common=False),
    Command("embed", "encode prompts with IF's T5 once and cache them on disk", embed_args,
            prompts.embed_command, common=False),
]
