"""Issue 4's quality targets for a small model, measured with a scoring classifier (mirage score's):

  - CFG samples, N per class: class accuracy and the Fréchet distance to the test set, over the reference
    distance of 1000 real training images (target: accuracy >= 99 %, ratio <= 2);
  - 2-view flip anagrams over every ordered pair of different classes: both views right (target >= 90 %);
  - low/high hybrids over every ordered pair: blurred image shows the low class, full image the high class
    (target >= 80 % each).

    python bench/small_quality.py --model fashion --classifier fashion --steps 30 --guidance 3
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from mirage.backends.load import load_model
from mirage.engine import tasks
from mirage.engine.guide import Guide
from mirage.engine.sample import Sampling
from mirage.illusions.filters import SIGMA
from mirage.illusions.views import make_view
from mirage.quality import classifier as shipped
from mirage.quality import metrics, selection


def chunked(fn, prompts: list, seeds: list[int], chunk: int) -> torch.Tensor:
    """fn(prompts, seeds) over chunks of images (prompts: one list per term, one entry per image)."""
    out = []
    for i in range(0, len(seeds), chunk):
        out.append(fn([p[i:i + chunk] for p in prompts], seeds[i:i + chunk]))
    return torch.cat(out).cpu()


def best_of(fn, prompts: list, chunk: int, candidates: int, ranker, model, maps, pick: str = "best",
            min_prob: float = 0.0) -> torch.Tensor:
    """One image per entry of prompts, made from K candidates and checked by the ranking classifier: "best"
    makes all K (seeds k*K .. k*K+K-1) and keeps the best, as `--pick best` over `--n K`; "first" keeps
    the first of K tries read right, as `--tries K`. The judges then score only the chosen images."""
    n, k = len(prompts[0]), candidates
    if pick == "first":
        items = [dict(seed=i, prompts=[p[i] for p in prompts]) for i in range(n)]

        def make(items):
            return chunked(fn, [list(ps) for ps in zip(*(it["prompts"] for it in items))],
                           [it["seed"] for it in items], chunk)

        def judge(images, items):
            return selection.candidate_scores(ranker, model, images, [it["prompts"] for it in items], maps, min_prob)

        return selection.first_right(make, judge, items, k)[0]
    wide = [[p for p in ps for _ in range(k)] for ps in prompts]
    images = chunked(fn, wide, list(range(n * k)), chunk)
    if k == 1:
        return images
    scores, _ = selection.candidate_scores(ranker, model, images, list(zip(*wide)), maps)
    return images.view(n, k, *images.shape[1:])[torch.arange(n), scores.view(n, k).argmax(1)]


def evaluate(model, judges: dict, task: str, steps: int, guidance: float, per_class: int, pair_seeds: int,
             chunk: int, interval: tuple[int, int] | None = None, sigma: float = SIGMA, reduce: str = "mean",
             resample: int = 1, candidates: int = 1, ranker=None, sampler=("ddpm", 0.0), pick: str = "best",
             min_prob: float = 0.0, guide=None) -> dict:
    """Scores by each judge (name: classifier) of images made for `task`, each the best of `candidates` by
    `ranker`: {judge name: scores}."""
    names = model.class_names
    run = Sampling.spaced(model.schedule, steps, guidance=guidance, guidance_interval=interval, sampler=sampler[0],
                          eta=sampler[1], guide=guide)
    kw = dict(resample=resample)
    pick = dict(chunk=chunk, candidates=candidates, ranker=ranker, model=model, pick=pick, min_prob=min_prob)
    if task == "samples":
        labels = torch.arange(10).repeat_interleave(per_class)
        images = best_of(lambda ps, s: tasks.sample(model, ps[0], s, run, **kw), [[names[k] for k in labels]],
                         maps=[metrics.identity], **pick)
        return {name: _sample_scores(clf, images, labels) for name, clf in judges.items()}
    pairs = [(a, b) for a, b in itertools.permutations(range(10), 2) for _ in range(pair_seeds)]
    first, second = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    prompts = [[names[a] for a, _ in pairs], [names[b] for _, b in pairs]]
    if task == "anagrams":
        views = [make_view("identity"), make_view("flip")]
        images = best_of(lambda ps, s: tasks.anagram(model, ps, views, s, run, reduce=reduce, **kw), prompts,
                         maps=[v.view for v in views], **pick)
        both = torch.stack([first, second], 1)
        return {name: dict(anagram_both=metrics.illusion_accuracy(clf, images, both, views)["all"])
                for name, clf in judges.items()}
    maps = metrics.hybrid_maps(model.size, sigma)
    images = best_of(lambda ps, s: tasks.hybrid(model, ps, s, run, kind="lowhigh", sigma=sigma, **kw), prompts,
                     maps=maps, **pick)
    each = {name: metrics.hybrid_accuracy(clf, images, first, second, maps[0])["each"] for name, clf in judges.items()}
    return {name: dict(hybrid_low=e[0], hybrid_high=e[1]) for name, e in each.items()}


def _sample_scores(clf, images: torch.Tensor, labels: torch.Tensor) -> dict:
    fd = metrics.frechet_distance(clf, images, shipped.test_stats(clf))
    return dict(accuracy=metrics.class_accuracy(clf, images, labels), fd=fd, fd_ratio=fd / shipped.reference_fd(clf))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["fashion"])
    p.add_argument("--classifier", nargs="+", default=None, help="the judges: classifier names or files "
                                                                 "(default: the model's data set's shipped one)")
    p.add_argument("--candidates", type=int, nargs="+", default=[1],
                   help="one of K candidates, chosen by the shipped classifier (as --pick), then judged")
    p.add_argument("--pick", nargs="+", choices=("best", "first"), default=["best"],
                   help="best of K made at once (--pick best), or the first of K tries read right (--tries K)")
    p.add_argument("--min-prob", type=float, nargs="+", default=[0.0],
                   help="with --pick first: read right also needs this probability of the prompt in every map")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="for the samples")
    p.add_argument("--illusion-guidance", type=float, nargs="+", default=[3.0], help="for anagrams and hybrids")
    p.add_argument("--interval", nargs="+", default=["none"],
                   help="guidance intervals (all tasks): none or LO-HI (timesteps), e.g. none 150-750")
    p.add_argument("--hybrid-sigma", type=float, nargs="+", default=[SIGMA], help="low/high split (at 64 px)")
    p.add_argument("--reduce", nargs="+", default=["mean"], help="anagram reductions: mean, alternate")
    p.add_argument("--eta", type=float, nargs="+", default=None,
                   help="DDIM with these etas (0: deterministic) instead of the DDPM step (all tasks)")
    p.add_argument("--classifier-guidance", type=float, nargs="+", default=[0.0],
                   help="strengths of classifier guidance (all tasks; 0 = off)")
    p.add_argument("--guide", default=None, help="the guide's file (default: the model's shipped one)")
    p.add_argument("--resample", type=int, default=1, help="RePaint-style repeats of each step (all tasks)")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--pair-seeds", type=int, default=2, help="seeds per ordered class pair (90 pairs)")
    p.add_argument("--chunk", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=("samples", "anagrams", "hybrids"), nargs="+",
                   default=["samples", "anagrams", "hybrids"])
    args = p.parse_args()

    for ref in args.model:
        model = load_model(ref, torch.device(args.device))
        judges = {str(c): shipped.load_classifier(c) for c in args.classifier or [model.data]}  # on the CPU
        ranker = shipped.classifier_for(model)
        guide_classifier = shipped.load_classifier(args.guide) if args.guide else shipped.guide_for(model)
        for (task, g, extra), (k, pick, min_prob), (sampler, rule), cg in itertools.product(
                settings(args), choices(args), samplers(args.eta), args.classifier_guidance):
            t0 = time.time()
            guide = Guide(guide_classifier, cg) if cg else None
            results = evaluate(model, judges, task, args.steps, g, args.per_class, args.pair_seeds, args.chunk,
                               resample=args.resample, candidates=k, ranker=ranker, sampler=rule, pick=pick,
                               min_prob=min_prob, guide=guide, **extra)
            for judge, result in results.items():
                row = dict(model=ref, judge=judge, task=task, sampler=sampler, steps=args.steps,
                           resample=args.resample, guidance=g, classifier_guidance=cg, candidates=k, pick=pick, min_prob=min_prob,
                           **extra, **result,
                           seconds=round(time.time() - t0, 1))
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)


def choices(args):
    """(K, pick rule, min_prob) triples; one candidate needs no rule, and only "first" reads min_prob."""
    rules = [(pick, p) for pick in args.pick for p in (args.min_prob if pick == "first" else [0.0])]
    return [(k, *rule) for k in args.candidates for rule in ([("-", 0.0)] if k == 1 else rules)]


def samplers(etas: list[float] | None):
    """(name, (sampler, eta)) pairs: the DDPM step, or DDIM at each eta."""
    if etas is None:
        return [("ddpm", ("ddpm", 0.0))]
    return [(f"ddim eta={eta:g}", ("ddim", eta)) for eta in etas]


def settings(args):
    """(task, guidance, extra options) for every measurement asked for."""
    intervals = [None if i == "none" else tuple(int(t) for t in i.split("-")) for i in args.interval]
    for task, i in itertools.product(args.only, intervals):
        for g in args.guidance if task == "samples" else args.illusion_guidance:
            if task == "samples":
                yield task, g, dict(interval=i)
            elif task == "hybrids":
                yield from ((task, g, dict(interval=i, sigma=s)) for s in args.hybrid_sigma)
            else:
                yield from ((task, g, dict(interval=i, reduce=r)) for r in args.reduce)


if __name__ == "__main__":
    main()
