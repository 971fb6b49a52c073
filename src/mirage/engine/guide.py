"""Classifier guidance (Dhariwal & Nichol 2021): a guide, a classifier of noised images (`mirage train
classifier --noisy`), pushes the noise estimate so that each prompt becomes more visible where it is seen:

    eps <- eps - scale * sqrt(1 - alpha_bar_t) * grad_x sum_k log p(class_k | sees_k(view_k(x_t)))

Term k (combine.Term) is read in its view (an anagram's view i shows prompt i) and through what it `sees`
(a hybrid's low prompt is seen blurred, from afar; its high prompt in the whole image), exactly as `mirage
score` checks the result, so the push serves the illusion rather than each prompt on its own. Terms of the
null class ("") are not pushed.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mirage.errors import UsageError


def check_strength(scale: float) -> None:
    if not scale >= 0:  # also rejects NaN
        raise UsageError(f"--classifier-guidance must be a number >= 0, got {scale!r}")


class Guide:
    """A guide classifier and the strength of its push."""

    def __init__(self, classifier: nn.Module, scale: float):
        check_strength(scale)
        self.classifier, self.scale = classifier.eval().requires_grad_(False), scale

    def push(self, x: Tensor, alpha_bar: Tensor, terms: list) -> Tensor:
        """What to add to the combined noise estimate of x, at noise level sqrt(1 - alpha_bar)."""
        level = (1 - alpha_bar).sqrt().to(x.device, torch.float32)
        # the loop runs in inference mode; this one gradient needs autograd, and weights moved to the GPU
        # in inference mode could not take part in it
        with torch.inference_mode(False), torch.enable_grad():
            self.classifier.to(x.device)
            x = x.float().clone().requires_grad_(True)  # a clone made outside inference mode can carry one
            seen = torch.cat([_seen(term, x) for term in terms])
            labels = torch.cat([term.cond.embeds.to(x.device) for term in terms]).clone()
            log_p = self.classifier(seen, level.expand(len(seen))).log_softmax(1)
            chosen = log_p.gather(1, labels.clamp(min=0).view(-1, 1))[:, 0]
            (grad,) = torch.autograd.grad(chosen[labels >= 0].sum(), x)
        return -self.scale * level * grad


def for_task(classifier: nn.Module | None, task: str) -> Guide | None:
    """The guide at the strength its file gives for `task` (anagram, hybrid: measured when it was shipped),
    or None where it gives none."""
    strength = 0.0 if classifier is None else classifier.info.get("strengths", {}).get(task, 0.0)
    return Guide(classifier, strength) if strength else None


def _seen(term, x: Tensor) -> Tensor:
    x = x if term.view is None else term.view.view(x)
    return x if term.sees is None else term.sees(x)
