"""Each task's default settings, per model family: what a command uses where the user gave nothing."""
from __future__ import annotations

from mirage.illusions.filters import SIGMA

# IFPipeline's own; no classifier checks IF images, so one try (confidence is then unused); sigma None is
# filters.SIGMA
IF_DEFAULTS = dict(steps=100, guidance=7.0, guidance_interval=None, tries=1, confidence=0.5, sigma=None,
                   spacing="diffusers", spacing_edit="strided", spacing_denoise="strided", guidance_denoise=1.0)
# built-ins, per task where "<setting>_<task>" is given (measured in experiments/builtin/README.md): samples guided only at
# timesteps 150-850 keep both class accuracy and diversity (Frechet distance), and each is remade (up to 3
# tries) where the classifier is not at least 50 % sure of its class; illusions, steered by classifier guidance
# at the strength their guide's file gives, are remade (up to 8 tries) until it is 90 % sure of every prompt;
# hybrids split low from high at sigma 3.5 and take 100 steps (their low prompt gains most from them).
SMALL_DEFAULTS = dict(steps=30, guidance=2.0, guidance_interval=None, tries=8, confidence=0.9, sigma=None,
                      steps_sample=100, guidance_sample=1.5, guidance_interval_sample=(150, 850), tries_sample=3,
                      confidence_sample=0.5, guidance_anagram=5.0, guidance_hybrid=5.0, sigma_hybrid=3.5,
                      steps_hybrid=100, spacing="diffusers", spacing_edit="strided", spacing_denoise="strided", guidance_denoise=1.0)


# the x4 upscaler's published recipe: `mirage upscale`'s defaults, and IF's stage III's (--steps3, --guidance3,
# --noise-level3)
X4_RECIPE = dict(steps=20, guidance=9.0, noise_level=20)
# StableDiffusionPipeline's own (50 steps, guidance 7.5), the x4 upscaler's
SD_DEFAULTS = dict(steps=50, guidance=7.5, guidance_interval=None, tries=1, confidence=0.5, sigma=None,
                   spacing="diffusers", guidance_denoise=1.0, steps_upscale=X4_RECIPE["steps"],
                   guidance_upscale=X4_RECIPE["guidance"])


def task_defaults(small: bool, task: str, family: str | None = None) -> dict:
    """steps and their spacing (edits and the denoising study take the course's strided list unless --steps
    is given), guidance, guidance interval, tries, confidence and hybrid sigma for one task: the task's own
    where given, then the general ones."""
    defaults = SMALL_DEFAULTS if small else SD_DEFAULTS if family == "sd" else IF_DEFAULTS
    keys = ("steps", "spacing", "guidance", "guidance_interval", "tries", "confidence", "sigma")
    chosen = {k: defaults.get(f"{k}_{task}", defaults[k]) for k in keys}
    if chosen["sigma"] is None:
        chosen["sigma"] = SIGMA
    return chosen
