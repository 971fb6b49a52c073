"""What each `mirage` subcommand does: its arguments, and the `Job` it hands to the pipeline (which images,
how to make them on one model, how to show them)."""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import product
from typing import Iterator

import torch
from torch import Tensor

from mirage.app import demo, sheets
from mirage.app.args import Command, Once, seeds_of
from mirage.app.defaults import SMALL_DEFAULTS, task_defaults
from mirage.app.pipeline import Job, execute
from mirage.app.rundir import RunDir
from mirage.app.settings import resolve
from mirage.app.study import denoising, levels_for
from mirage.backends import deepfloyd
from mirage.backends.load import is_small, load_model, resolve_device
from mirage.engine import tasks
from mirage.engine.denoiser import space_shape
from mirage.errors import UsageError
from mirage.illusions.filters import PARTS, SIGMA
from mirage.illusions.views import VIEW_NAMES, parse_views
from mirage.io import contact_sheet, load_image, load_mask, to_pil
from mirage.quality.metrics import hybrid_maps, identity

seeds = sheets.seeds


def per_seed(args) -> tuple[Iterator[dict], int]:
    """One item per seed, made lazily (--seeds 0-100000000 is never listed), and how many."""
    chosen = seeds_of(args)
    return (dict(seed=s) for s in chosen), len(chosen)


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
                   help="how sure the classifier must be of each prompt for an image to pass, from 0 to below 1 "
                        "(default 0.5 for samples, 0.9 for illusions, whose views are far from what it was "
                        "trained on)")
    p.add_argument("--scorer", choices=("classifier", "clip"), default=None,
                   help="what checks and ranks candidates: a built-in model's classifier (its default) or CLIP "
                        "(the default for IF and Stable Diffusion)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="the CLIP model that scores with --scorer clip: a hub id or folder (default "
                        "openai/clip-vit-base-patch32)")


# ---- sample -------------------------------------------------------------------------------------
def sample_args(p):
    p.add_argument("--prompt", default=None, action=Once, help='what to draw ("" = unconditional)')
    pick_args(p)


def sample_cmd(args) -> int:
    prompt = "" if args.prompt is None else args.prompt

    def run(model, items, sampling, low_res):
        return tasks.sample(model, prompt, seeds(items), sampling, low_res=low_res)

    items, total = per_seed(args)
    return execute(args, Job("sample", items, total, run, settings=dict(prompt=prompt), sheet=sheets.grid,
                             checks=lambda size: ([prompt], [identity])))


# ---- edits --------------------------------------------------------------------------------------
def image_args(p, prompt_default="a high quality photo"):
    p.add_argument("--image", required=True, help="input image (any size or mode: center-cropped and resized)")
    p.add_argument("--prompt", default=None, help=f'text guidance (default "{prompt_default}" for IF, '
                                                  '"" for built-in models)')


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    return "" if is_small(args.model) else "a high quality photo"


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


def parse_starts(text: str) -> list[int]:
    try:
        starts = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--start takes comma-separated whole numbers, got {text!r}") from None
    if len(set(starts)) < len(starts):
        raise UsageError(f"--start names a start step more than once ({text}): each makes one image")
    if min(starts) < 0:
        raise UsageError(f"--start indices must be >= 0, got {min(starts)}")
    return starts


def edit_cmd(args) -> int:
    starts = parse_starts(args.start)
    prompt = _prompt(args)

    def run(model, items, sampling, low_res):
        if low_res is not None:  # stage II upscales the edit, guided by the prompt
            return tasks.sample(model, prompt, seeds(items), sampling, low_res=low_res)
        out = torch.empty(len(items), model.channels, model.size, model.size)
        for start in sorted({item["start"] for item in items}):
            idx = [k for k, item in enumerate(items) if item["start"] == start]
            out[idx] = tasks.edit(model, image_for(model, args), prompt, [items[k]["seed"] for k in idx], sampling,
                                  start=start).float().cpu()
        return out

    def fits(model, sampling):  # a bad image or start is found before any sampling
        image_for(model, args)
        if max(starts) >= sampling.steps:
            raise UsageError(f"--start {max(starts)} is out of range: use 0 to {sampling.steps - 1} (the run's "
                             f"timesteps)")

    chosen = seeds_of(args)
    items = (dict(seed=s, start=i) for s, i in product(chosen, starts))
    return execute(args, Job("edit", items, len(chosen) * len(starts), run, sheet=sheets.series, fits=fits,
                             settings=dict(prompt=prompt, image=args.image)))


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

    def run(model, items, sampling, low_res):
        if low_res is not None:
            return tasks.sample(model, prompt, seeds(items), sampling, low_res=low_res)
        return tasks.inpaint(model, image_for(model, args), mask_for(model, args), prompt, seeds(items), sampling,
                             resample=args.resample)

    def fits(model, sampling):  # a bad image or mask is found before any sampling
        image_for(model, args)
        mask_for(model, args)

    items, total = per_seed(args)
    return execute(args, Job("inpaint", items, total, run, sheet=sheets.grid, fits=fits,
                             settings=dict(prompt=prompt, image=args.image, mask=args.mask, box=args.box,
                                           resample=args.resample)))


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
    if args.view_seed < 0:
        raise UsageError(f"--view-seed must be >= 0, got {args.view_seed}")
    views = parse_views(names, args.view_seed)

    def run(model, items, sampling, low_res):
        return tasks.anagram(model, args.prompt, views, seeds(items), sampling, reduce=args.reduce, low_res=low_res)

    items, total = per_seed(args)
    return execute(args, Job("anagram", items, total, run, views=views, sheet=sheets.illusion(views),
                             fits=lambda model, sampling: tasks.check_views(model, views),
                             settings=dict(prompts=args.prompt, views=names, view_seed=args.view_seed,
                                           reduce=args.reduce),
                             checks=lambda size: (args.prompt, [v.view for v in views])))


def hybrid_args(p):
    p.add_argument("--kind", choices=sorted(PARTS), default="lowhigh",
                   help="which factorization: low/high pass (default), low/mid/high, gray/color, motion")
    for part in dict.fromkeys(part for parts in PARTS.values() for part in parts):
        p.add_argument(f"--{part}", help=f"prompt for the {part} component")
    p.add_argument("--sigma", type=float, default=None,
                   help=f"low/high split: Gaussian sigma in px at 64 px, scaled with the resolution (default {SIGMA:g} "
                        f"for IF, {SMALL_DEFAULTS['sigma_hybrid']:g} for built-in models)")
    p.add_argument("--image", help="take one component from this image instead of a prompt (inverse problem)")
    p.add_argument("--image-component", help="which component the image gives (default: the first, e.g. low "
                                             "or gray)")
    pick_args(p)


def hybrid_cmd(args) -> int:
    parts = PARTS[args.kind]
    others = [f"--{part}" for kind, ps in PARTS.items() for part in ps
              if part not in parts and getattr(args, part) is not None]
    if others:
        raise UsageError(f"{', '.join(dict.fromkeys(others))} is not a part of a {args.kind} hybrid, whose parts "
                         f"are {', '.join(parts)}: drop it, or pick the --kind it belongs to")
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

    def run(model, items, sampling, low_res):
        photo = {} if from_image is None else dict(image=image_for(model, args),
                                                   image_component=parts.index(from_image))
        return tasks.hybrid(model, prompts, seeds(items), sampling, kind=args.kind, sigma=sigma, low_res=low_res,
                            **photo)

    def fits(model, sampling):
        tasks.check_kind(model, args.kind)
        if from_image is not None:
            image_for(model, args)
        if args.kind == "graycolor" and model.channels == 1:
            raise UsageError(f"a gray/color hybrid needs a color model, and {args.model} makes grayscale "
                             f"images: use --kind lowhigh or lowmidhigh")

    items, total = per_seed(args)
    job = Job("hybrid", items, total, run, sheet=sheets.hybrid, fits=fits,
              settings=dict(kind=args.kind, sigma=sigma, prompts=prompts, components=list(parts),
                            image=args.image, image_component=from_image),
              checks=(lambda size: (prompts, hybrid_maps(size, sigma)))
              if args.kind == "lowhigh" and from_image is None else None)
    return execute(args, job)


# ---- upscale: Stable Diffusion's x4 upscaler ------------------------------------------------------
def upscale_args(p):
    p.add_argument("--image", required=True, help="the low-resolution image (center-cropped and resized to the "
                                                  "output side / the upscaler's factor)")
    p.add_argument("--prompt", default="", help='what the image shows (default "")')


def upscale_input(model, args) -> Tensor:
    side = space_shape(model)[-1]  # the upscaler's latents are at the low-res image's side
    return _load(args.image, side, model.channels).to(model.device)


def upscale_cmd(args) -> int:
    args.upscaler = "none"

    def run(model, items, sampling, low_res):
        return tasks.upscale(model, upscale_input(model, args), args.prompt, seeds(items), sampling,
                             noise_level=level)

    def fits(model, sampling):
        if not getattr(model, "is_upscaler", False):
            raise UsageError(f"{args.model} is not an upscaler: give --model {sd_upscaler}")
        upscale_input(model, args)

    level = args.noise_level if args.noise_level is not None else 20
    items, total = per_seed(args)
    return execute(args, Job("upscale", items, total, run, sheet=sheets.grid, fits=fits,
                             settings=dict(prompt=args.prompt, image=args.image, noise_level=level)))


sd_upscaler = "stabilityai/stable-diffusion-x4-upscaler"


# ---- the denoising study (course Part A 1.1-1.6) ------------------------------------------------
def denoise_args(p):
    image_args(p)
    p.add_argument("--levels", default="250,500,750", help="noise levels out of 1000, each 0 to 999 (default "
                                                          "250,500,750)")
    p.add_argument("--i-start", type=int, default=10, help="start index of iterative denoising (default 10)")
    p.add_argument("--every", type=int, default=5, help="show every k-th iterative step, k >= 1 (default 5)")


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--levels takes comma-separated whole numbers, got {text!r}") from None
    bad = [v for v in levels if not 0 <= v < 1000]
    if bad:
        raise UsageError(f"--levels are out of 1000: each from 0 to 999, got {bad[0]}")
    return levels


def denoise_cmd(args) -> int:
    levels = parse_levels(args.levels)
    if args.every < 1:
        raise UsageError(f"--every must be at least 1, got {args.every}")
    settings = resolve(args, "denoise")
    seed = seeds_of(args)[0]
    with RunDir(settings.out, "denoise", command=settings.command) as out:
        model = load_model(settings.model, resolve_device(settings.device), settings.memory)
        sampling = settings.sampling(model)
        if not 0 <= args.i_start < sampling.steps:
            raise UsageError(f"--i-start {args.i_start} is out of range: use 0 to {sampling.steps - 1}")
        image = image_for(model, args)
        rows = denoising(model, image, args.image, _prompt(args), seed, levels_for(model.schedule, levels), sampling,
                         args.i_start, args.every)
        final = next(p for p in rows[-1].pictures if p.name == "iter-final")
        record = dict(settings.record(), model=settings.model, image=args.image,
                      levels=levels_for(model.schedule, levels), **final.settings,
                      timesteps=list(sampling.timesteps))
        out.add(dict(record, file=out.save_image("denoised.png", final.image, record)))
        pictures = [[(to_pil(p.image), p.label) for p in row.pictures] for row in rows]
        sheets.save_sheet(out, contact_sheet(pictures, title=f"denoising study: {args.image}"), "sheet.png")
        out.finish(sheet="sheet.png")
    if not settings.quiet:
        print(f"wrote the denoising study to {out.path}")
    return 0


# ---- the rest ----------------------------------------------------------------------------------------
def embed_args(p):
    p.add_argument("prompts", nargs="+", help="prompts to encode and cache")
    p.add_argument("--model", default="DeepFloyd/IF-I-XL-v1.0", help="IF stage-I hub id or folder (its T5)")
    p.add_argument("--device", default="auto")


def embed_cmd(args) -> int:
    """Encode prompts into the cache ahead of time, in the precision `mirage sample` will use on that device."""
    encoder = getattr(load_model(args.model, resolve_device(args.device)), "text", None)
    if encoder is None:
        raise UsageError(f"{args.model} encodes no prompts into the cache: `mirage embed` is for DeepFloyd IF and "
                         f"Stable Diffusion models")
    cached = sum(encoder.is_cached(p) for p in dict.fromkeys(args.prompts))
    encoder.encode(list(args.prompts))
    print(f"{len(set(args.prompts)) - cached} prompt(s) encoded, {cached} already cached, in {encoder.cache_dir}")
    return 0


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
    Command("upscale", "upscale an image with Stable Diffusion's x4 upscaler (--model, default "
            "stabilityai/stable-diffusion-x4-upscaler)", upscale_args, upscale_cmd),
    Command("views", "list the views anagrams can use", lambda p: None, views_cmd, common=False),
    Command("fetch", "download IF weights once (needs network and, for DeepFloyd, an accepted licence)",
            fetch_args, deepfloyd.fetch_command, common=False),
    Command("demo", "the course's deliverable set on the built-in models, as one HTML report",
            demo.add_arguments, demo.handler, common=False),
    Command("embed", "encode prompts once (IF's T5, Stable Diffusion's CLIP) and cache them on disk", embed_args,
            embed_cmd, common=False),
]
