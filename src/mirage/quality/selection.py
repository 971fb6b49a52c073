"""Choosing among candidates: a score per candidate from the judge, and rejection sampling (`--tries`): each
image remade with new noise until the judge reads it right."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mirage.quality.metrics import Filter, map_log_probs


def candidate_scores(classifier: nn.Module, model, images: Tensor, prompts: Sequence[Sequence[str]],
                     maps: Sequence[Filter], min_prob: float = 0.0) -> tuple[Tensor, Tensor]:
    """(score, right) per candidate: `rank_maps`'s score and whether the classifier reads every map as its
    prompt, with at least `min_prob`; prompts[k][i] is what maps[i] of image k should show, given as the
    model's class names."""
    labels = torch.tensor([[model.class_index(p) for p in row] for row in prompts])
    chosen, right = map_log_probs(classifier, images, labels, maps)
    return chosen.mean(1), (right & (chosen.exp() >= min_prob)).all(1)


def best_first(scores: Tensor) -> Tensor:
    """The order of candidates by score, best first: scores [n], or [n, K] compared column by column (each
    breaks the ties of the one before, as CLIP's concealment breaks those of its alignment:
    quality.clip.rank_keys); candidates equal in every column keep their order. The one ordering of
    candidates: `--pick best`, `--tries`, `mirage rank` and `mirage score` all rank through it."""
    keys = _rows(scores)
    return torch.tensor(sorted(range(len(keys)), key=lambda k: [-v for v in keys[k]]), dtype=torch.long)


def better(new: Tensor, old: Tensor) -> Tensor:
    """[n] whether each new candidate comes before the old one in `best_first`'s order."""
    return torch.tensor([a > b for a, b in zip(_rows(new), _rows(old))], dtype=torch.bool)


def _rows(scores: Tensor) -> list[list[float]]:
    return (scores[:, None] if scores.dim() == 1 else scores).tolist()


def candidate_seed(seed: int, j: int) -> int:
    """The noise seed of try j of the image with seed `seed` (`--tries`): the seed itself first, then steps
    of 2**32 / golden ratio, far from the small seeds people pick. Modulo 2**32: torch's CPU generator, which
    draws every image's noise, reads only a seed's low 32 bits."""
    return (seed + j * 0x9E3779B9) % 2**32


def first_right(make: Callable, judge: Callable, items: list[dict], tries: int):
    """Rejection sampling: each item's first try (seeds `candidate_seed(seed, 0..tries-1)`) that `judge`
    reads right, or its best-scoring try where none is. It keeps the model's own variety, where ranking
    candidates keeps the most typical ones. Only the items still wrong are made again.
    make(items) -> images; judge(images, items) -> (scores, right), scores as `best_first` takes them.
    Returns (images, items with `try`, scores, right)."""
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
        take = new_right | better(new_scores, scores[todo])
        for i in take.nonzero()[:, 0].tolist():
            k = int(todo[i])
            images[k], scores[k], right[k] = new[i], new_scores[i], new_right[i]
            chosen[k] = dict(items[k], **{"try": j})
    return images, chosen, scores, right
