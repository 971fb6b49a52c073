"""How one step's noise estimate is assembled from several UNet evaluations.

A `Term` is one (view, condition) pair: the model sees view(x) under `cond` (and `uncond` for guidance), and
the guided estimate is mapped back with the view's inverse. Terms are then reduced: averaged (visual
anagrams, with plain sampling as the one-term case), one per step in turn ("alternate"), or summed through
complementary filters (factorized diffusion: hybrid images). All terms and guidance branches of a step go
through the model as one batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mirage.engine.denoiser import Cond, Denoiser
from mirage.errors import UsageError

REDUCTIONS = ("mean", "alternate", "sum")


@dataclass(frozen=True)
class Term:
    cond: Cond
    uncond: Cond | None = None  # the null condition for classifier-free guidance (same image, if any)
    view: object | None = None  # a views.View; None is the identity
    component: Callable[[Tensor], Tensor] | None = None  # with reduce="sum": the part of eps this term gives
    sees: Callable[[Tensor], Tensor] | None = None  # what of view(x) shows the prompt (a hybrid's low: the blur)


def cfg(eps_c: Tensor, eps_u: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance (A.4)."""
    return eps_u + guidance * (eps_c - eps_u)


def _apply(view, x: Tensor) -> Tensor:
    return x if view is None else view.view(x)


def _invert(view, x: Tensor) -> Tensor:
    return x if view is None else view.inverse(x)


def _invert_variance(view, v: Tensor) -> Tensor:
    # IF's variance code is not a signed image: negate maps it back unchanged
    return v if view is None else view.inverse_variance(v)


def estimate(model: Denoiser, x: Tensor, t: int, terms: list[Term], guidance: float,
             reduce: str = "mean", step_index: int = 0, guide=None) -> tuple[Tensor, Tensor | None]:
    """The combined (eps, variance) for x at timestep t; the variance comes from the conditional branches.
    A `guide` (guide.Guide) adds its classifier's push for the terms."""
    if reduce == "alternate":
        terms = [terms[step_index % len(terms)]]
    guided = guidance != 1 and all(term.uncond is not None for term in terms)
    # diffusers batches [uncond, cond]; keep that order so IF's results match its pipelines'.
    branches = [[term.uncond for term in terms]] if guided else []
    branches.append([term.cond for term in terms])
    xs = [_apply(term.view, x) for term in terms] * len(branches)
    conds = [c.map_image(lambda im, v=term.view: _apply(v, im))
             for branch in branches for term, c in zip(terms, branch)]
    eps, var = model(torch.cat(xs), t, Cond.cat(conds).to(x.device))
    eps = eps.unflatten(0, (len(branches), len(terms), x.shape[0]))
    var = None if var is None else var.unflatten(0, (len(branches), len(terms), x.shape[0]))[-1]
    per_term = cfg(eps[-1], eps[0], guidance) if guided else eps[-1]
    epss = [_invert(term.view, e) for term, e in zip(terms, per_term)]
    vars_ = None if var is None else [_invert_variance(term.view, v) for term, v in zip(terms, var)]
    if reduce == "sum":
        combined = sum(term.component(e) for term, e in zip(terms, epss))
    else:
        combined = torch.stack(epss).mean(0)
    if guide is not None:
        combined = combined + guide.push(x, model.schedule.alpha_bar(t), terms)
    return combined, None if vars_ is None else torch.stack(vars_).mean(0)


def check_reduce(reduce: str, terms: list[Term]) -> None:
    if reduce not in REDUCTIONS:
        raise UsageError(f"unknown reduction {reduce!r}; choose one of: {', '.join(REDUCTIONS)}")
    if reduce == "sum" and any(term.component is None for term in terms):
        raise UsageError("reduce='sum' needs a filter component for every term")
