"""Every task as a short composition over the one loop: which terms, where to start, what to keep fixed.

All functions take a `Denoiser`, per-image seeds and the loop's `Sampling`, and return images in [-1, 1] at
the model's resolution, [n, C, H, W]. Passing `low_res` runs a super-resolution stage (IF stage II)
conditioned on those images, with the same views and components as the stage before.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.engine.combine import Term, estimate
from mirage.engine.denoiser import Denoiser, from_space, space_shape, to_space
from mirage.engine.sample import Noise, Sampling, diffuse
from mirage.engine.schedule import CLEAN, Schedule
from mirage.errors import UsageError
from mirage.illusions.filters import SIGMA, make_components

Prompt = str | Sequence[str]  # one prompt for every image, or one per image
Filter = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LowRes:
    """What a super-resolution stage is conditioned on: the stage before's images, noised to `noise_level`."""

    images: Tensor
    noise_level: int = 250


def make_terms(model: Denoiser, prompts: Sequence[Prompt], n: int, views: Sequence | None = None,
               components: Sequence[Filter] | None = None, guided: bool = True,
               sees: Sequence[Filter | None] | None = None) -> list[Term]:
    """One term per prompt; all prompts (and the null prompt "") are encoded in one call."""
    per_term = [[p] * n if isinstance(p, str) else list(p) for p in prompts]
    if any(len(p) != n for p in per_term):
        raise UsageError(f"give one prompt for all images or exactly one per image ({n})")
    if views is not None and len(views) != len(prompts):
        raise UsageError(f"{len(views)} views need {len(views)} prompts, got {len(prompts)}")
    if components is not None and len(components) != len(prompts):
        raise UsageError(f"{len(components)} components need {len(components)} prompts, got {len(prompts)}")
    unique = sorted({p for ps in per_term for p in ps} | {""})
    encoded = model.encode(unique)
    null = encoded.take([unique.index("")] * n) if guided else None
    return [Term(cond=encoded.take([unique.index(p) for p in ps]), uncond=null,
                 view=None if views is None else views[k],
                 component=None if components is None else components[k], sees=None if sees is None else sees[k])
            for k, ps in enumerate(per_term)]


def generate(model: Denoiser, seeds: Sequence[int], prompts: Sequence[Prompt], sampling: Sampling, *,
             views: Sequence | None = None, components: Sequence[Filter] | None = None,
             sees: Sequence[Filter | None] | None = None, reduce: str = "mean", init: Tensor | None = None,
             start: int = 0, keep: tuple[Filter, Tensor] | None = None, low_res: LowRes | None = None,
             resample: int = 1, callback=None) -> Tensor:
    """The general task, run as `sampling` says: start from noise (or from `init` noised to the timestep at
    index `start`: SDEdit), guide by the terms, and optionally keep the part `keep = (F, reference)` of the
    image equal to the reference's (x <- x - F(x) + F(q(reference, t)): inpainting, or a hybrid component
    taken from a photo). `sees` says through what a classifier guide reads each prompt."""
    run = sampling.starting_at(start)
    noise = Noise(seeds, device=model.device)
    shape = (model.channels, model.size, model.size)  # the images': init, reference and result
    if low_res is None and getattr(model, "is_upscaler", False):
        raise UsageError("this model is an upscaler: it needs a low-resolution image (mirage upscale, --stage3)")
    check_views(model, views)
    stepper = run.stepper(model)
    forward = stepper.add_noise
    # into the model's space first: a VAE draws its sample from each image's generator before the noise
    start_x = None if init is None else to_space(model, _to_batch(init, len(noise), shape, "init"), noise)
    # the conditioning image's noise first where the model's pipeline draws it first (SD's x4 upscaler)
    early = _noised(model, low_res, noise) if low_res is not None and getattr(model, "draws_condition_first",
                                                                               False) else None
    x = noise.draw(space_shape(model))  # drawn first in every other case, as diffusers' pipelines do
    if start_x is not None:
        x = forward(start_x, run.timesteps[0], x)
    elif stepper.init_noise_sigma != 1:
        x = x * stepper.init_noise_sigma
    terms = make_terms(model, prompts, len(noise), views, components, guided=sampling.guidance != 1, sees=sees)
    if low_res is not None:
        terms = _condition_on(terms, early or _noised(model, low_res, noise))
    constrain = None
    if keep is not None:
        filt, ref = keep
        constrain = project(forward, filt, to_space(model, _to_batch(ref, len(noise), shape, "reference")), noise)
    return from_space(model, diffuse(model, x, terms, noise, run, reduce=reduce, constrain=constrain,
                                     resample=resample, callback=callback, stepper=stepper))


def project(schedule: Schedule | Callable, filt: Filter, reference: Tensor, noise: Noise):
    """A constraint keeping filt(x_t) equal to filt of the reference noised to the same t (by the schedule's
    forward process, or by `schedule` itself where it is a step rule's add_noise)."""
    forward = schedule.forward if isinstance(schedule, Schedule) else schedule

    def constrain(x: Tensor, t: int) -> Tensor:
        ref_t = reference if t == CLEAN else forward(reference, t, noise.draw(x.shape[1:]))
        return x - filt(x) + filt(ref_t)
    return constrain


def check_views(model: Denoiser, views: Sequence | None) -> None:
    """Refuses, in one line, a view that does not act on the grid of the model's space."""
    allowed = getattr(model, "view_names", None)
    bad = [v.name for v in views or () if v is not None and allowed is not None and v.name not in allowed]
    if bad:
        raise UsageError(f"view {bad[0]!r} does not act on {getattr(model, 'space_name', 'this model')}; "
                         f"the views that do: {', '.join(allowed)}")


def check_kind(model: Denoiser, kind: str) -> None:
    """Refuses, in one line, a hybrid kind whose filters do not work in the model's space."""
    kinds = getattr(model, "hybrid_kinds", None)
    if kinds is not None and kind not in kinds:
        raise UsageError(f"a {kind!r} hybrid does not work on {getattr(model, 'space_name', 'this model')}: "
                         f"use --kind {' or '.join(kinds)}")


def _to_batch(image: Tensor, n: int, shape: tuple, what: str) -> Tensor:
    if tuple(image.shape[1:]) != tuple(shape):
        raise UsageError(f"the {what} image is {tuple(image.shape[1:])} but the model works at {tuple(shape)}")
    return image.expand(n, *shape) if image.shape[0] == 1 else image


def _noised(model: Denoiser, low_res: LowRes, noise: Noise) -> tuple[Tensor, Tensor]:
    if not hasattr(model, "noised_condition"):
        raise UsageError("this model is not a super-resolution model: it takes no low-resolution image")
    shape = (low_res.images.shape[1], *space_shape(model)[1:])
    return model.noised_condition(low_res.images.to(noise.device), noise.draw(shape), low_res.noise_level)


def _condition_on(terms: list[Term], noised: tuple[Tensor, Tensor]) -> list[Term]:
    image, levels = noised
    return [replace(term, cond=term.cond.with_image(image, levels),
                    uncond=None if term.uncond is None else term.uncond.with_image(image, levels))
            for term in terms]


# ---- named tasks: each one line over `generate` -------------------------------------------------
def sample(model: Denoiser, prompt: Prompt, seeds: Sequence[int], sampling: Sampling, **kw) -> Tensor:
    return generate(model, seeds, [prompt], sampling, **kw)


def upscale(model: Denoiser, image: Tensor, prompt: Prompt, seeds: Sequence[int], sampling: Sampling,
            noise_level: int = 20, **kw) -> Tensor:
    """A super-resolution model's sample conditioned on `image` (one for all, or one per seed)."""
    images = image.expand(len(seeds), *image.shape[1:]) if image.shape[0] == 1 else image
    return generate(model, seeds, [prompt], sampling, low_res=LowRes(images, noise_level), **kw)


def edit(model: Denoiser, image: Tensor, prompt: Prompt, seeds: Sequence[int], sampling: Sampling, start: int,
         **kw) -> Tensor:
    """SDEdit / text-guided image-to-image: noise the image to the timestep at index `start`, then denoise."""
    return generate(model, seeds, [prompt], sampling, init=image, start=start, **kw)


def inpaint(model: Denoiser, image: Tensor, mask: Tensor, prompt: Prompt, seeds: Sequence[int], sampling: Sampling,
            **kw) -> Tensor:
    """Regenerate where mask = 1, keep the image exactly where mask = 0 (RePaint with `resample` > 1)."""
    mask = mask.to(image)

    def outside(x: Tensor) -> Tensor:  # at the resolution of x: a latent cell with any masked pixel is redone
        m = mask if mask.shape[-2:] == x.shape[-2:] else F.adaptive_max_pool2d(mask, x.shape[-2:])
        return (1 - m) * x

    out = generate(model, seeds, [prompt], sampling, keep=(outside, image), **kw)
    # in pixels, the image exactly outside the mask whatever space the model denoised in (a no-op for pixel
    # models, whose constraint already left it so)
    return out - outside(out) + outside(image.to(out))


def anagram(model: Denoiser, prompts: Sequence[Prompt], views: Sequence, seeds: Sequence[int], sampling: Sampling,
            **kw) -> Tensor:
    """Visual anagram: view i of the result shows prompt i (views from views.make_view)."""
    if len(prompts) < 2:
        raise UsageError("an anagram needs at least two prompts, one per view")
    return generate(model, seeds, prompts, sampling, views=views, **kw)


def hybrid(model: Denoiser, prompts: Sequence[Prompt], seeds: Sequence[int], sampling: Sampling, kind: str = "lowhigh",
           image: Tensor | None = None, image_component: int | None = None, sigma: float = SIGMA,
           **kw) -> Tensor:
    """Factorized diffusion: component i of the result (low/high pass, gray/color, ...) shows prompt i.

    With `image`, component `image_component` is taken from that image instead (its prompt is ignored):
    a photo as the low pass of a hybrid, or a grayscale photo colorized. `sigma` (given at 64 px) splits low
    from high. Component i is seen in the sum of components 0..i: the low prompt blurred (from afar), the
    high one in the whole image; a guide reads each prompt there.
    """
    check_kind(model, kind)
    components = make_components(kind, space_shape(model)[-1], sigma)
    if len(prompts) != len(components):
        raise UsageError(f"a {kind!r} hybrid needs {len(components)} prompts, got {len(prompts)}")
    keep = None
    if image is not None:
        keep = (components[image_component], image)
    sees = [_partial_sum(components[:i + 1]) for i in range(len(components) - 1)] + [None]
    return generate(model, seeds, prompts, sampling, components=components, sees=sees, reduce="sum", keep=keep,
                    **kw)


def _partial_sum(parts: Sequence[Filter]) -> Filter:
    return lambda x: sum(part(x) for part in parts)


def one_step(model: Denoiser, noisy: Tensor, t: int, prompt: str = "", guidance: float = 1.0) -> Tensor:
    """The clean image one noise estimate implies (course 1.4)."""
    n = noisy.shape[0]

    terms = make_terms(model, [prompt], n, guided=guidance != 1)
    with torch.inference_mode():
        eps, _ = estimate(model, noisy.to(model.device), t, terms, guidance)
    return model.schedule.x0_from_eps(noisy.to(model.device), t, eps)
