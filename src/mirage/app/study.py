"""The denoising study of the course's Part A (1.1-1.4), made once for `mirage denoise` and for the demo:
an image noised to several levels, then denoised three ways (a Gaussian blur, one step of the model, the
model's iterative loop), each picture with the settings that made it. A latent model (Stable Diffusion) is
noised and denoised in its own space and every picture is shown decoded (denoiser.from_space); the blur then
acts on the decoded noisy picture, as it would on any photograph."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from mirage.engine import tasks
from mirage.engine.denoiser import from_space, to_space
from mirage.engine.sample import Noise, Sampling
from mirage.illusions.filters import BASE, SIGMA, lowpass


@dataclass
class Picture:
    name: str  # a file stem, unique within the study
    image: Tensor  # [C, H, W] in [-1, 1]
    label: str
    settings: dict = field(default_factory=dict)


@dataclass
class Row:
    heading: str
    note: str
    pictures: list[Picture]


def levels_for(schedule, levels: list[int]) -> list[int]:
    """Noise levels given out of 1000, as this schedule's timesteps."""
    T = schedule.num_train_timesteps
    return [min(T - 1, v * T // 1000) for v in levels]


def denoising(model, image: Tensor, source: str, prompt: str, seed: int, levels: list[int], sampling: Sampling,
              i_start: int, every: int) -> list[Row]:
    """`image` [1, C, H, W] at the model's size, read from the file `source`; `levels` are timesteps;
    `sampling` is the iterative loop's (its timesteps strided as the course does), entered at index
    `i_start`; every `every`-th step shown."""
    blur = lowpass(model.size)  # the hybrids' low pass: what a viewer far away sees
    blur_sigma = round(SIGMA * model.size / BASE, 3)
    guidance = sampling.guidance
    z = to_space(model, image.to(model.device))  # the image in the model's space: itself, or its latents

    def seen(x: Tensor) -> Tensor:  # a picture of x, in the model's space
        return from_space(model, x)[0]

    noise = Noise([seed], device=model.device)
    noisy = [(t, model.schedule.forward(z, t, noise.draw(z.shape[1:]))) for t in levels]
    rows = [Row("Noisy images (forward process)", "",
                [Picture("original", image[0], "original", dict(input=source))] +
                [Picture(f"noisy-t{t}", seen(x), f"noisy, t={t}", dict(t=t, seed=seed)) for t, x in noisy]),
            Row("Classical denoising: Gaussian blur", "",
                [Picture(f"blur-t{t}", blur(seen(x)[None])[0], f"blurred, t={t}", dict(t=t, blur_sigma=blur_sigma))
                 for t, x in noisy]),
            Row("One-step denoising", "The clean image one noise estimate implies: x0 = (x_t - sqrt(1-ab) eps) / "
                "sqrt(ab).", [Picture(f"onestep-t{t}", seen(tasks.one_step(model, x, t, prompt, guidance)),
                                      f"one-step, t={t}", dict(t=t, prompt=prompt, guidance=guidance))
                              for t, x in noisy])]
    ts = sampling.timesteps
    x_start = model.schedule.forward(z, ts[i_start], Noise([seed], model.device).draw(z.shape[1:]))
    shown: list[Picture] = []

    def keep(i: int, t: int, x: Tensor) -> None:
        if i % every == 0:
            shown.append(Picture(f"iter-{i:02d}", seen(x), f"iterative, step {i}", dict(t=max(t, 0), i_start=i_start,
                                                                                      seed=seed)))

    final = tasks.edit(model, image, prompt, [seed], sampling, start=i_start, callback=keep)
    shown += [Picture("iter-final", final[0], "iterative: final",
                      dict(i_start=i_start, t_start=ts[i_start], steps=len(ts) - i_start, seed=seed, prompt=prompt,
                           guidance=guidance)),
              Picture("iter-onestep", seen(tasks.one_step(model, x_start, ts[i_start], prompt, guidance)),
                      "one-step from the same start", dict(t=ts[i_start], seed=seed)),
              Picture("iter-blur", blur(seen(x_start)[None])[0], "blur of the same start",
                      dict(t=ts[i_start], seed=seed))]
    rows.append(Row("Iterative denoising", f"Strided timesteps {ts[0]}, {ts[1] if len(ts) > 1 else 0}, ... 0, "
                    f"starting at i_start={i_start} (t={ts[i_start]}); every {every} step(s) shown, then the three "
                    f"denoisers compared.", shown))
    return rows
