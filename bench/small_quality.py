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

from mirage import score, tasks
from mirage.filters import SIGMA, lowpass
from mirage.models import load_model
from mirage.views import make_view


def chunked(fn, prompts: list, seeds: list[int], chunk: int) -> torch.Tensor:
    """fn(prompts, seeds) over chunks of images (prompts: one list per term, one entry per image)."""
    out = []
    for i in range(0, len(seeds), chunk):
        out.append(fn([p[i:i + chunk] for p in prompts], seeds[i:i + chunk]))
    return torch.cat(out).cpu()


def evaluate(model, clf, task: str, steps: int, guidance: float, per_class: int, pair_seeds: int,
             chunk: int, interval: tuple[int, int] | None = None, sigma: float = SIGMA, reduce: str = "mean",
             resample: int = 1) -> dict:
    names = model.class_names
    kw = dict(steps=steps, guidance=guidance, guidance_interval=interval, resample=resample)
    if task == "samples":
        labels = torch.arange(10).repeat_interleave(per_class)
        images = chunked(lambda ps, s: tasks.sample(model, ps[0], s, **kw), [[names[k] for k in labels]],
                         list(range(len(labels))), chunk)
        fd = score.frechet_distance(clf, images, score.test_stats(clf))
        return dict(accuracy=score.class_accuracy(clf, images, labels), fd=fd, fd_ratio=fd / score.reference_fd(clf))
    pairs = [(a, b) for a, b in itertools.permutations(range(10), 2) for _ in range(pair_seeds)]
    first, second = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    prompts = [[names[a] for a, _ in pairs], [names[b] for _, b in pairs]]
    seeds = list(range(len(pairs)))
    if task == "anagrams":
        views = [make_view("identity"), make_view("flip")]
        images = chunked(lambda ps, s: tasks.anagram(model, ps, views, s, reduce=reduce, **kw), prompts, seeds,
                         chunk)
        return dict(anagram_both=score.illusion_accuracy(clf, images, torch.stack([first, second], 1), views)["all"])
    images = chunked(lambda ps, s: tasks.hybrid(model, ps, s, kind="lowhigh", sigma=sigma, **kw), prompts, seeds,
                     chunk)
    each = score.hybrid_accuracy(clf, images, first, second, lowpass(model.size, sigma))["each"]
    return dict(hybrid_low=each[0], hybrid_high=each[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["fashion"])
    p.add_argument("--classifier", default=None, help="classifier name or file (default: the model's data set)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="for the samples")
    p.add_argument("--illusion-guidance", type=float, nargs="+", default=[3.0], help="for anagrams and hybrids")
    p.add_argument("--interval", nargs="+", default=["none"],
                   help="guidance intervals for the samples: none or LO-HI (timesteps), e.g. none 150-750")
    p.add_argument("--hybrid-sigma", type=float, nargs="+", default=[SIGMA], help="low/high split (at 64 px)")
    p.add_argument("--reduce", nargs="+", default=["mean"], help="anagram reductions: mean, alternate")
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
        clf = score.load_classifier(args.classifier or model.data)  # scores on the CPU
        for task, g, extra in settings(args):
            t0 = time.time()
            result = evaluate(model, clf, task, args.steps, g, args.per_class, args.pair_seeds, args.chunk,
                              resample=args.resample, **extra)
            row = dict(model=ref, task=task, steps=args.steps, resample=args.resample, guidance=g, **extra, **result,
                       seconds=round(time.time() - t0, 1))
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def settings(args):
    """(task, guidance, extra options) for every measurement asked for."""
    intervals = [None if i == "none" else tuple(int(t) for t in i.split("-")) for i in args.interval]
    for task in args.only:
        for g in args.guidance if task == "samples" else args.illusion_guidance:
            if task == "samples":
                yield from ((task, g, dict(interval=i)) for i in intervals)
            elif task == "hybrids":
                yield from ((task, g, dict(sigma=s)) for s in args.hybrid_sigma)
            else:
                yield from ((task, g, dict(reduce=r)) for r in args.reduce)


if __name__ == "__main__":
    main()
