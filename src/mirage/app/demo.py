"""`mirage demo`: the course's whole deliverable set, Part A then Part B, made with one model and written as a
numbered run folder with one HTML page (report.html), every image captioned with the settings that made it.

With a built-in model (fashion, digits) it runs offline on a laptop CPU; with an IF stage-I model (on a GPU)
the same page is made at 64 px from the test photo and the hand drawing in mirage/assets/. Work is batched:
all SDEdit inputs of one start index in one call, all anagram (and hybrid) candidates in one call, ranked by
the built-in classifier where one is shipped.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from mirage.app import sheets, study
from mirage.app.defaults import task_defaults
from mirage.app.report import Block, Figure, Section, line_chart, scores_line, write
from mirage.app.rundir import RunDir
from mirage.backends.load import is_small, load_model, resolve_device
from mirage.engine import tasks
from mirage.engine.guide import for_task
from mirage.engine.sample import Noise, Sampling
from mirage.illusions.animate import illusion_animation, save_gif
from mirage.illusions.views import parse_views
from mirage.io import load_image
from mirage.quality.classifier import classifier_for, guide_for
from mirage.quality.metrics import hybrid_maps
from mirage.quality.selection import best_first, candidate_scores

SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)  # the course's one-step denoiser sheet
LEVELS = (250, 500, 750)  # noise levels out of 1000 (course 1.1)


@dataclass(frozen=True)
class Plan:
    """What the demo shows with one kind of model: its inputs (files in mirage/assets) and prompts."""

    test_image: str
    sketch: str
    image_prompt: str  # SDEdit / inpainting of the test image
    sketch_prompt: str
    edit_prompts: tuple[str, ...]  # text-guided image-to-image targets
    inpaint_box: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the side
    sample_prompts: tuple[str, ...]
    anagrams: tuple[tuple[str, str], ...]  # (upright, flipped)
    hybrids: tuple[tuple[str, str], ...]  # (low: seen from afar, high: seen close up)
    classes: bool = True  # prompts are class names: samples per class and candidate ranking make sense


PLANS = {
    "fashion": Plan("fashion_test.png", "fashion_sketch.png", "", "T-shirt/top", ("Sneaker", "Bag"),
                    (0.0, 0.0, 0.55, 0.6),
                    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
                    (("Ankle boot", "Bag"), ("Trouser", "Dress"), ("T-shirt/top", "Sandal")),
                    (("Bag", "Sneaker"), ("Trouser", "Pullover"), ("Dress", "Ankle boot"))),
    "digits": Plan("digits_test.png", "digits_sketch.png", "", "4", ("6", "9"), (0.0, 0.0, 1.0, 0.5),
                   tuple("0123456789"), (("6", "9"), ("1", "7"), ("2", "5")), (("0", "8"), ("1", "7"), ("3", "5"))),
    "if": Plan("photo.png", "sketch64.png", "a high quality photo", "a high quality photo of a house",
               ("a photo of a tiger", "a pencil drawing of a cat"), (0.2, 0.45, 0.8, 1.0),
               ("a high quality photo", "an oil painting of a snowy mountain village", "a photo of a red bicycle",
                "a watercolor of a lighthouse"),
               (("an oil painting of people around a campfire", "an oil painting of an old man"),
                ("a lithograph of waterfalls", "a lithograph of a skull"),
                ("a painting of a snowy mountain village", "a painting of a horse")),
               (("a lithograph of a skull", "a lithograph of waterfalls"),
                ("a photo of the Eiffel tower", "a photo of a dog"),
                ("an oil painting of an old man", "an oil painting of a landscape")), classes=False),
}


@dataclass(frozen=True)
class Size:
    """How much the demo makes: the full set, or a quick one for tests."""

    steps: int = 30  # sampling steps (diffusers spacing)
    stride: int = 30  # SDEdit / iterative denoising: the course's strided timesteps, per 1000
    starts: tuple[int, ...] = (1, 3, 5, 7, 10, 20)
    i_start: int = 10
    every: int = 5
    samples: int = 10
    candidates: int = 8
    per_class: int = 4
    inpaints: int = 3
    frames: int = 24  # animation frames per move


FULL = Size()
QUICK = Size(steps=4, stride=150, starts=(1, 3), i_start=3, every=1, samples=3, candidates=2, per_class=1,
             inpaints=1, frames=4)


def asset(name: str) -> Path:
    return Path(str(resources.files("mirage") / "assets" / name))


@dataclass
class Demo:
    """The model, the plan, and the page being built: every image is saved as a PNG with its settings (and
    listed in result.json) as it is added to the page."""

    model: object
    name: str
    plan: Plan
    size: Size
    out: RunDir
    guidance: float
    classifier: object | None = None
    guide: object | None = None  # the model's guide classifier, for classifier guidance of the illusions
    sections: list[Section] = field(default_factory=list)

    def figure(self, name: str, image: Tensor, title: str, **settings) -> Figure:
        full = dict(model=self.name, **settings)
        self.out.add(dict(full, title=title, file=self.out.save_image(name, image, full)))
        return Figure(name, title, settings)

    def load(self, name: str) -> Tensor:
        return load_image(asset(name), self.model.size, self.model.channels).to(self.model.device)

    def sampling(self, guidance: float | None = None, guide=None) -> Sampling:
        """The demo's sampling loop: its steps spaced as diffusers does, at its guidance unless given."""
        return Sampling.spaced(self.model.schedule, self.size.steps,
                               guidance=self.guidance if guidance is None else guidance, guide=guide)

    def edit_timesteps(self) -> list[int]:
        T = self.model.schedule.num_train_timesteps
        return self.model.schedule.strided(stride=max(1, self.size.stride * T // 1000))

    def levels(self) -> list[int]:
        return study.levels_for(self.model.schedule, list(LEVELS))


# ---- Part A ---------------------------------------------------------------------------------------
def denoising(d: Demo) -> Section:
    """1.1-1.4: the forward process, classical (blur), one-step and iterative denoising of the test image."""
    image = d.load(d.plan.test_image)
    ts = d.edit_timesteps()
    rows = study.denoising(d.model, image, d.plan.test_image, d.plan.image_prompt, 0, d.levels(), Sampling(ts, guidance=1.0),
                           min(d.size.i_start, len(ts) - 1), d.size.every)
    return Section("denoising", "Part A 1.1–1.4 · Forward process and denoising", [
        Block(row.heading, row.note, [d.figure(f"a-{p.name}.png", p.image, p.label, **p.settings)
                                      for p in row.pictures]) for row in rows])


def sampling(d: Demo) -> Section:
    """1.5-1.6: the same seeds and prompts without and with classifier-free guidance."""
    prompts = list(d.plan.sample_prompts[:d.size.samples])
    prompts += [prompts[-1]] * (d.size.samples - len(prompts))
    seeds = list(range(len(prompts)))
    blocks = []
    for g, label in ((1.0, "without CFG (guidance 1)"), (d.guidance, f"with CFG (guidance {d.guidance:g})")):
        images = tasks.sample(d.model, prompts, seeds, d.sampling(g))
        blocks.append(Block(f"Samples {label}", "", [
            d.figure(f"a-sample-g{g:g}-{s}.png", x, p or "(unconditional)", prompt=p, seed=s, steps=d.size.steps,
                     guidance=g) for x, p, s in zip(images, prompts, seeds)], cell=110))
    return Section("sampling", "Part A 1.5–1.6 · Sampling, and classifier-free guidance", blocks)


def edits(d: Demo) -> Section:
    """1.7: SDEdit of the test image and of the hand drawing, and text-guided edits, each over the start
    indices; all inputs of one start index go through the model as one batch."""
    test, sketch = d.load(d.plan.test_image), d.load(d.plan.sketch)
    rows = [("test image", d.plan.test_image, test, d.plan.image_prompt),
            ("hand drawing", d.plan.sketch, sketch, d.plan.sketch_prompt)]
    rows += [(f"text-guided: {p}", d.plan.test_image, test, p) for p in d.plan.edit_prompts]
    ts = d.edit_timesteps()
    starts = [s for s in d.size.starts if s < len(ts)]
    inits = torch.cat([r[2] for r in rows])
    results = {s: tasks.edit(d.model, inits, [r[3] for r in rows], [0] * len(rows),
                             Sampling(ts, guidance=d.guidance), start=s) for s in starts}
    blocks = []
    for k, (label, file, image, prompt) in enumerate(rows):
        figs = [d.figure(f"a-edit{k}-i{s}.png", results[s][k], f"i_start={s}", i_start=s, t=ts[s], prompt=prompt,
                         guidance=d.guidance, seed=0) for s in starts]
        figs.append(d.figure(f"a-edit{k}-input.png", image[0], "input", input=file))
        note = "Larger i_start keeps more of the input." if k == 0 else ""
        blocks.append(Block(f"SDEdit, {label}" if k < 2 else label, note, figs, cell=110))
    return Section("edits", "Part A 1.7 · Image-to-image translation (SDEdit), hand drawings, text-guided edits",
                   blocks + [inpainting(d, test)])


def inpainting(d: Demo, image: Tensor) -> Block:
    """1.7.2: regenerate inside the box, keep the rest exactly."""
    side = d.model.size
    x0, y0, x1, y1 = (round(f * side) for f in d.plan.inpaint_box)
    mask = torch.zeros(1, 1, side, side, device=d.model.device)
    mask[..., y0:y1, x0:x1] = 1
    seeds = list(range(d.size.inpaints))
    out = tasks.inpaint(d.model, image, mask, d.plan.image_prompt, seeds, d.sampling())
    box = [x0, y0, x1, y1]
    figs = [d.figure("a-inpaint-input.png", image[0], "input", input=d.plan.test_image),
            d.figure("a-inpaint-mask.png", mask[0] * 2 - 1, "mask (white = regenerate)", box=box)]
    figs += [d.figure(f"a-inpaint-{s}.png", x, f"inpainted, seed {s}", prompt=d.plan.image_prompt, box=box, seed=s,
                      steps=d.size.steps, guidance=d.guidance) for x, s in zip(out, seeds)]
    return Block("Inpainting", "Outside the mask the result equals the input exactly.", figs, cell=110)


def _best(d: Demo, images: Tensor, labels: list[list[str]], maps) -> tuple[Tensor, list[float] | None, str]:
    """Candidates best first by the built-in classifier's score (seed order where there is none)."""
    if d.classifier is None or not d.plan.classes:
        return torch.arange(len(images)), None, "in seed order (no classifier to rank them with this model)"
    scores = candidate_scores(d.classifier, d.model, images, labels, maps)[0]
    return best_first(scores), scores.tolist(), "best first by the built-in classifier's score"


def _candidate_sheet(d: Demo, file: str, c: "Picked", title: str) -> Figure:
    order = c.order.tolist()
    items = [dict(seed=c.seeds[k], rank=r + 1, **({} if c.scores is None else dict(score=c.scores[k])))
             for r, k in enumerate(order)]
    sheet = sheets.candidates(c.images[order], items, "", cols=4, cell=4 * d.model.size)
    d.out.save_image(file, sheet, dict(title=title))
    return Figure(file, f"all {len(c.images)} candidates", dict(order="best first", seeds=[c.seeds[k] for k in order]),
                  smooth=True)


@dataclass
class Picked:
    """The candidates of one prompt pair, best first by `order`."""
    pair: tuple[str, str]
    images: Tensor
    order: Tensor
    how: str  # how they were ranked, for the caption
    seeds: list[int]
    scores: list[float] | None

    @property
    def best(self) -> Tensor:
        return self.images[self.order[0]]

    @property
    def seed(self) -> int:
        return self.seeds[self.order[0]]

    def scored(self, figure: Figure) -> Figure:
        """`figure` (of the best candidate) with the best's score under it, where the classifier ranked them."""
        if self.scores is None:
            return figure
        line, legend = scores_line({"score": self.scores[int(self.order[0])]})
        return replace(figure, scores=line, legend=legend)


def _best_of_pairs(d: Demo, pairs: Sequence[tuple[str, str]], make, maps) -> list[Picked]:
    """All candidates of every prompt pair made in one call, `make(prompts, seeds)`, and ranked per pair."""
    n = d.size.candidates
    seeds = list(range(n))
    images = make([[p[i] for p in pairs for _ in seeds] for i in range(2)], seeds * len(pairs))
    picked = []
    for k, pair in enumerate(pairs):
        group = images[k * n:(k + 1) * n]
        order, scores, how = _best(d, group, [list(pair)] * n, maps)
        picked.append(Picked(tuple(pair), group, order, how, seeds, scores))
    return picked


def anagrams(d: Demo) -> Section:
    """1.8: three flip anagrams; all candidates of all three in one batch, the best of each kept."""
    views, n = parse_views(["identity", "flip"]), d.size.candidates

    guide = for_task(d.guide, "anagram")

    def make(prompts, seeds):
        return tasks.anagram(d.model, prompts, views, seeds, d.sampling(guide=guide))

    blocks = []
    for k, c in enumerate(_best_of_pairs(d, d.plan.anagrams, make, [v.view for v in views])):
        settings = dict(prompts=list(c.pair), views=["identity", "flip"], seed=c.seed, steps=d.size.steps,
                        guidance=d.guidance, candidates=n, **_guide_setting(guide))
        figs = [d.figure(f"a-anagram{k}-{v.name}.png", v.view(c.best[None])[0], f"{v.name}: {p}", **settings)
                for v, p in zip(views, c.pair)]
        figs[0] = c.scored(figs[0])
        frames = illusion_animation(c.best, views, list(c.pair), size=192, steps=d.size.frames,
                                    hold=max(2, d.size.frames // 2))
        gif = save_gif(d.out.file(f"a-anagram{k}.gif"), frames).name
        figs.append(Figure(gif, "animation", dict(views="identity → flip", seed=c.seed), smooth=True))
        figs.append(_candidate_sheet(d, f"a-anagram{k}-candidates.png", c, f"anagram {c.pair}"))
        blocks.append(Block(f"{c.pair[0]} / upside down: {c.pair[1]}", f"Best of {n} candidates, {c.how}.", figs,
                            cell=170))
    return Section("anagrams", "Part A 1.8 · Visual anagrams", blocks)


def hybrids(d: Demo) -> Section:
    """1.9: three low/high-pass hybrids (factorized diffusion), candidates ranked like the anagrams'."""
    sigma = task_defaults(is_small(d.name), "hybrid")["sigma"]
    n, maps, guide = d.size.candidates, hybrid_maps(d.model.size, sigma), for_task(d.guide, "hybrid")
    low = maps[0]

    def make(prompts, seeds):
        return tasks.hybrid(d.model, prompts, seeds, d.sampling(guide=guide), kind="lowhigh", sigma=sigma)

    blocks = []
    for k, c in enumerate(_best_of_pairs(d, d.plan.hybrids, make, maps)):
        (lo, hi), best = c.pair, c.best
        settings = dict(low=lo, high=hi, kind="lowhigh", sigma=sigma, seed=c.seed, steps=d.size.steps,
                        guidance=d.guidance, **_guide_setting(guide))
        figs = [c.scored(d.figure(f"a-hybrid{k}.png", best, f"close up: {hi}", **settings)),
                d.figure(f"a-hybrid{k}-low.png", low(best[None])[0].clamp(-1, 1), f"low pass (from afar): {lo}",
                         **settings),
                Figure(f"a-hybrid{k}.png", f"small (from afar): {lo}", dict(settings, shown_at=f"{d.model.size} px"),
                       smooth=True, width=d.model.size),
                _candidate_sheet(d, f"a-hybrid{k}-candidates.png", c, f"hybrid {lo}/{hi}")]
        blocks.append(Block(f"{lo} from afar, {hi} close up", f"Best of {n} candidates, {c.how}.", figs, cell=150))
    return Section("hybrids", "Part A 1.9 · Hybrid images", blocks)


def _guide_setting(guide) -> dict:
    return {} if guide is None else dict(classifier_guidance=guide.scale)


# ---- Part B ---------------------------------------------------------------------------------------
def one_step_sigmas(d: Demo) -> list[Block]:
    """The course's one-step denoiser sheet (z = x + sigma eps). No dedicated sigma = 0.5 denoiser is
    shipped, so the diffusion model stands in at the timestep whose noise matches sigma:
    x_t = sqrt(ab) z with ab = 1 / (1 + sigma^2)."""
    image = d.load(d.plan.test_image)
    eps = Noise([0], device=d.model.device).draw(image.shape[1:])
    ab = d.model.schedule.alphas_cumprod.to(image.device)
    noisy, denoised = [], []
    for sigma in SIGMAS:
        z = image + sigma * eps
        if sigma == 0:
            t = 0
        else:
            t = int((ab - 1 / (1 + sigma ** 2)).abs().argmin())
        x0 = tasks.one_step(d.model, ab[t].sqrt() * z, t)
        noisy.append(d.figure(f"b-sigma{sigma:g}-noisy.png", z[0].clamp(-1, 1), f"noisy, sigma={sigma:g}",
                              sigma=sigma, seed=0))
        denoised.append(d.figure(f"b-sigma{sigma:g}-denoised.png", x0[0], f"denoised, sigma={sigma:g}",
                                 sigma=sigma, t=t))
    return [Block("The one-step denoiser across noise levels",
                 "No one-step denoiser (course 1.2, trained at sigma = 0.5) is shipped with mirage, so the built-in "
                 "diffusion model stands in: each noisy image x + sigma·eps is denoised in one step at the "
                 "timestep whose noise level matches sigma. Train the course's own with `mirage train denoiser`.",
                  noisy, cell=90), Block("", "", denoised, cell=90)]


def per_class(d: Demo) -> Block:
    names = list(d.model.class_names)
    seeds = list(range(d.size.per_class))
    prompts = [c for c in names for _ in seeds]
    images = tasks.sample(d.model, prompts, seeds * len(names), d.sampling())
    return Block("Samples per class", f"Class-conditioned sampling with CFG, {len(seeds)} seed(s) per class.", [
        d.figure(f"b-class{k // len(seeds)}-seed{s}.png", x, p, prompt=p, seed=s, steps=d.size.steps,
                 guidance=d.guidance) for k, (x, p, s) in enumerate(zip(images, prompts, seeds * len(names)))],
        cell=80)


def training(d: Demo, name: str) -> Block:
    """The training curve of a shipped model, from the metrics its training wrote (src/mirage/builtin/logs)."""
    logs = Path(str(resources.files("mirage") / "builtin" / "logs" / name))
    metrics = logs / "metrics.jsonl"
    if not metrics.is_file():
        return Block("Training curve", f"No training log is installed for {name!r} (expected {metrics}).")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r and not r.get("epoch_end")]
    epochs = [r for r in rows if r.get("epoch_end")]
    config = json.loads((logs / "config.json").read_text()) if (logs / "config.json").is_file() else {}
    shown = {k: config[k] for k in ("data", "epochs", "batch_size", "lr", "lr_schedule", "ema", "p_uncond")
             if k in config}
    note = (f"The built-in {name!r} model's training loss by step (log scale), from {metrics.name}; "
            + ", ".join(f"{k}={v}" for k, v in shown.items())
            + (f"; {epochs[-1]['train_s']} s of training, final loss {epochs[-1]['loss']:.4f}." if epochs and
               "train_s" in epochs[-1] else "."))
    figs = []
    if (logs / "samples.gif").is_file():
        gif = d.out.file(f"b-{name}-epochs.gif")
        gif.write_bytes((logs / "samples.gif").read_bytes())
        figs.append(Figure(gif.name, "samples after each epoch", dict(model=name, epochs=config.get("epochs"),
                                                                      guidance=config.get("guidance")), smooth=True))
    chart = line_chart({"loss": steps}, "step", "loss", log_y=True)
    return Block(f"Training curve of the shipped {name!r} model", note, figs, cell=320, raw=chart)


def part_b(d: Demo) -> Section:
    if d.plan.classes:
        blocks = [*one_step_sigmas(d), per_class(d), training(d, d.name)]
    else:
        blocks = [Block("", "Part B trains mirage's own small UNets; run `mirage demo --model fashion` for its "
                            "one-step denoiser and per-class samples. The built-in model's training:"),
                  training(d, "fashion")]
    return Section("part-b", "Part B · Diffusion models trained from scratch", blocks)


# ---- the whole page -------------------------------------------------------------------------------
PARTS = (denoising, sampling, edits, anagrams, hybrids, part_b)


def _plan_for(name: str, model) -> Plan:
    if not is_small(name):
        return PLANS["if"]
    data = getattr(model, "data", None) or name
    return PLANS.get("digits" if data in ("digits", "mnist") else "fashion")


def run_demo(out: str | Path, model: str = "fashion", device: str = "cpu", quick: bool = False,
             progress: bool = True) -> Path:
    """Makes the whole demo into a new numbered run folder beside/at `out`; returns its report.html."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    dev = resolve_device(device)
    denoiser = load_model(model, dev)
    size = QUICK if quick else FULL
    plan = _plan_for(model, denoiser)
    run = RunDir(out, "demo", command=shlex.join(["mirage", "demo", *sys.argv[2:]]) if progress else "")
    d = Demo(denoiser, model, plan, size, run, guidance=5.0 if is_small(model) else 7.0,
             classifier=classifier_for(denoiser), guide=guide_for(denoiser))
    with torch.inference_mode():
        for part in tqdm(PARTS, disable=not progress, unit="part", desc="mirage demo"):
            d.sections.append(part(d))
    seconds = time.perf_counter() - start
    meta = (f"model {model} ({denoiser.size} px, {denoiser.channels} channel(s)) on {dev}; "
            f"{'quick' if quick else 'full'} set: {size.steps} sampling steps, guidance {d.guidance:g}; "
            f"made in {seconds:.0f} s.")
    page = write(run.file("report.html"), "mirage demo", d.sections, meta=meta,
                 footer="Every image is a PNG in this folder with its settings in its text chunk "
                        "(`parameters`); result.json lists them all.")
    run.finish(report=page.name, model=model, quick=quick, seconds=round(seconds, 1))
    return page


# ---- the command --------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo; an existing, non-empty "
                                                     "one gets a numbered sibling)")
    p.add_argument("--model", default="fashion", help="built-in model (fashion, digits), a mirage .safetensors, "
                                                      "or an IF stage-I hub id or folder (needs a GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a reduced set in a few seconds (few steps and images)")
    p.add_argument("--quiet", action="store_true", help="print only errors")


def handler(args) -> int:
    page = run_demo(Path(args.out), model=args.model, device=args.device, quick=args.quick,
                    progress=not args.quiet)
    if not args.quiet:
        print(f"wrote the demo to {page.parent}; open {page}")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="mirage demo")
    add_arguments(parser)
    return handler(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_main())
