"""The schedule, the loop and the combiners, on a small analytic denoiser (no weights needed)."""
import math

import pytest
import torch
from diffusers import DDPMScheduler

from mirage.engine import tasks
from mirage.engine.combine import cfg, estimate
from mirage.engine.denoiser import Cond
from mirage.engine.sample import Noise, Sampling, diffuse
from mirage.engine.schedule import CLEAN, Schedule, ddim_step, ddpm_step
from mirage.errors import UsageError

IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                    beta_end=0.02, clip_sample=True, clip_sample_range=1.0, dynamic_thresholding_ratio=0.95,
                    prediction_type="epsilon", sample_max_value=1.5, thresholding=True,
                    variance_type="learned_range")


class ToyDenoiser:
    """eps depends on x, t, the prompt (a number) and position, so views and guidance matter."""

    def __init__(self, size=8, channels=3, learned_variance=True):
        self.schedule = Schedule.from_config(IF_SCHEDULER)
        self.size, self.channels, self.learned = size, channels, learned_variance
        self.calls = []
        ramp = torch.linspace(-1, 1, size)
        self.position = (ramp[:, None] * 0.3 + ramp[None, :] ** 2 * 0.2).expand(channels, size, size)

    device = torch.device("cpu")
    dtype = torch.float32

    def encode(self, prompts):
        return Cond(embeds=torch.tensor([float(len(p)) for p in prompts]))

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        scale = cond.embeds.to(x).view(-1, 1, 1, 1)
        eps = 0.5 * x + 0.1 * scale * self.position + 0.001 * t
        var = torch.tanh(x.mean(1, keepdim=True)).expand_as(x) if self.learned else None
        return eps, var



def spaced(model, steps: int, **settings) -> Sampling:
    return Sampling.spaced(model.schedule, steps, **settings)

def test_forward_has_the_right_mean_and_variance():
    s = Schedule.cosine()
    x0 = torch.full((20000, 1), 0.7)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    for t in (0, 250, 500, 999):
        xt = s.forward(x0, t, noise)
        a = s.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - a, abs=0.03)
    assert torch.equal(s.forward(x0, CLEAN, noise), x0)


def test_x0_from_eps_inverts_forward():
    s = Schedule.linear(300)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(s.x0_from_eps(s.forward(x0, 123, eps), 123, eps), x0, atol=1e-5)


def test_schedule_matches_diffusers_betas():
    for config in (IF_SCHEDULER, dict(beta_schedule="linear", num_train_timesteps=300)):
        ours = Schedule.from_config(config)
        theirs = DDPMScheduler.from_config(config)
        assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-7)


def test_timesteps_space_like_diffusers():
    s = Schedule.from_config(IF_SCHEDULER)
    ref = DDPMScheduler.from_config(IF_SCHEDULER)
    for steps in (100, 50, 27):
        ref.set_timesteps(steps)
        assert s.timesteps(steps) == ref.timesteps.tolist()
    assert s.strided() == list(range(990, -1, -30))
    with pytest.raises(ValueError):
        s.timesteps(0)


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
def test_strided_step_equals_ddpm_scheduler_step(variance_type):
    config = dict(IF_SCHEDULER, variance_type=variance_type)
    ours = Schedule.from_config(config)
    ref = DDPMScheduler.from_config(config)
    timesteps = ours.strided()
    ref.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    for i, t in enumerate(timesteps):
        eps, var = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
        noise = torch.randn(2, 3, 8, 8, generator=g)
        model_output = torch.cat([eps, var], 1) if variance_type == "learned_range" else eps
        expected = ref.step(model_output, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        drawn = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i))
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        got = ddpm_step(ours, x, eps, var if variance_type == "learned_range" else None, t, t_prev, drawn)
        assert torch.allclose(got, expected, atol=1e-5), t
        x = expected + 0 * noise


def test_ddim_with_eta_zero_is_deterministic_and_ends_clean():
    s = Schedule.linear(1000)
    x0 = torch.rand(1, 1, 4, 4) - 0.5
    eps = torch.randn(1, 1, 4, 4)
    x = s.forward(x0, 500, eps)
    # with the true eps, DDIM lands exactly on x0 at the end, whatever the stride
    out = ddim_step(s, x, eps, None, 500, CLEAN, torch.randn(1, 1, 4, 4), eta=0.0)
    assert torch.allclose(out, x0, atol=1e-5)


def test_each_image_depends_on_its_own_seed_alone():
    model = ToyDenoiser()
    run = spaced(model, 10, guidance=3.0)
    together = tasks.sample(model, "cat", [5, 9, 11], run)
    alone = tasks.sample(model, "cat", [9], run)
    assert torch.allclose(together[1:2], alone, atol=1e-6)
    assert not torch.allclose(together[0], together[1])


def test_all_terms_and_branches_go_through_the_model_as_one_batch():
    model = ToyDenoiser()
    from mirage.illusions.views import make_view
    tasks.anagram(model, ["a", "bb"], [make_view("identity"), make_view("flip")], [0, 1], spaced(model, 4, guidance=5.0))
    assert model.calls == [2 * 2 * 2] * 4  # images x views x (cond, uncond), one call per step


def test_cfg_matches_a4_and_guidance_one_skips_the_null_branch():
    model = ToyDenoiser()
    x = torch.randn(2, 3, 8, 8)
    terms = tasks.make_terms(model, ["abc"], 2)
    eps, var = estimate(model, x, 500, terms, 4.0)
    eps_c, var_c = model(x, 500, model.encode(["abc", "abc"]))
    eps_u, _ = model(x, 500, model.encode(["", ""]))
    assert torch.allclose(eps, eps_u + 4.0 * (eps_c - eps_u))
    assert torch.allclose(var, var_c)  # the variance comes from the conditional branch
    model.calls.clear()
    estimate(model, x, 500, tasks.make_terms(model, ["abc"], 2, guided=False), 1.0)
    assert model.calls == [2]


def test_guidance_interval_guides_only_inside_it():
    model = ToyDenoiser()
    ts = [900, 600, 300, 0]
    inside = tasks.sample(model, "abc", [0, 1], Sampling(ts, guidance=4.0, guidance_interval=(300, 600)))
    assert model.calls == [2, 4, 4, 2]  # the null branch runs only at t = 600 and 300
    everywhere = tasks.sample(model, "abc", [0, 1], Sampling(ts, guidance=4.0, guidance_interval=(0, 1000)))
    assert torch.equal(everywhere, tasks.sample(model, "abc", [0, 1], Sampling(ts, guidance=4.0)))
    assert not torch.allclose(inside, everywhere)


def test_two_view_mean_step_is_the_published_formula():
    from mirage.illusions.views import make_view
    model = ToyDenoiser()
    flip = make_view("flip")
    x = torch.randn(1, 3, 8, 8)
    terms = tasks.make_terms(model, ["p1", "p22"], 1, views=[None, flip])
    eps, var = estimate(model, x, 300, terms, 7.0)
    e1c, v1 = model(x, 300, model.encode(["p1"]))
    e1u, _ = model(x, 300, model.encode([""]))
    e2c, v2 = model(flip.view(x), 300, model.encode(["p22"]))
    e2u, _ = model(flip.view(x), 300, model.encode([""]))
    by_hand = (cfg(e1c, e1u, 7.0) + flip.inverse(cfg(e2c, e2u, 7.0))) / 2
    assert torch.allclose(eps, by_hand, atol=1e-6)
    assert torch.allclose(var, (v1 + flip.inverse(v2)) / 2, atol=1e-6)


def test_inpainting_keeps_every_unmasked_pixel():
    model = ToyDenoiser()
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    out = tasks.inpaint(model, image, mask, "x", [0, 1], spaced(model, 8, guidance=2.0))
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], image.expand_as(out)[keep])
    assert not torch.allclose(out[~keep], image.expand_as(out)[~keep])
    resampled = tasks.inpaint(model, image, mask, "x", [0], spaced(model, 4, guidance=2.0), resample=3)
    assert torch.equal(resampled[keep[:1]], image[keep[:1]])


def test_hybrid_components_add_up_to_the_full_estimate_for_equal_prompts():
    from mirage.illusions.filters import make_components
    model = ToyDenoiser()
    x = torch.randn(2, 3, 8, 8)
    comps = make_components("lowhigh", model.size)
    terms = tasks.make_terms(model, ["same", "same"], 2, components=comps)
    eps, _ = estimate(model, x, 400, terms, 5.0, reduce="sum")
    plain, _ = estimate(model, x, 400, tasks.make_terms(model, ["same"], 2), 5.0)
    assert torch.allclose(eps, plain, atol=1e-5)


def test_sdedit_starts_from_the_noised_image():
    model = ToyDenoiser()
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    seen = []
    tasks.edit(model, image, "x", [3], spaced(model, 10, guidance=1.0), start=len(model.schedule.timesteps(10)) - 1,
               callback=lambda i, t, x: seen.append((i, t)))
    assert seen == [(0, CLEAN)]  # only the last step is left
    with pytest.raises(UsageError, match="out of range"):
        tasks.edit(model, image, "x", [3], spaced(model, 10), start=10)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(guidance=float("nan")),
                                 dict(guidance=-1.0)])
def test_bad_settings_are_usage_errors(bad):
    with pytest.raises(UsageError):
        model = ToyDenoiser()
        settings = {"steps": 5, **bad}
        tasks.sample(model, "x", [0], spaced(model, settings.pop("steps"), **settings))


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_seed_out_of_range(seed):
    with pytest.raises(UsageError, match="seed"):
        Noise([seed])


def test_loop_reaches_clean_image_with_exact_eps():
    """With the true noise as the estimate, DDPM lands on x0 (thresholding off, no clipping needed)."""
    s = Schedule.linear(1000)
    x0 = torch.rand(1, 1, 4, 4) - 0.5
    eps = torch.randn(1, 1, 4, 4)

    class Oracle(ToyDenoiser):
        def __call__(self, x, t, cond):
            a = self.schedule.alpha_bar(t)
            return (x - a.sqrt() * x0) / (1 - a).sqrt(), None

    model = Oracle(size=4, channels=1)
    model.schedule = s
    ts = s.timesteps(20)
    x = s.forward(x0, ts[0], eps)
    out = diffuse(model, x, tasks.make_terms(model, ["a"], 1, guided=False), Noise([0]), Sampling(ts, guidance=1.0))
    assert torch.allclose(out, x0, atol=1e-4)
