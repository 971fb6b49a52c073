"""mirage's loop on the tiny IF equals diffusers' IF pipelines for the same seed and settings."""
import json

import numpy as np
import pytest
import torch
from diffusers import IFPipeline, IFSuperResolutionPipeline
from diffusers.pipelines.deepfloyd_if import timesteps as published

from mirage.app.main import main
from mirage.backends.deepfloyd import SCHEDULES, named_timesteps
from mirage.engine import tasks
from mirage.engine.sample import Sampling
from mirage.engine.tasks import LowRes
from mirage.illusions.views import make_view
from mirage.io import to_pil

NO_EXTRAS = dict(safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)


def _pipe(cls, folder, **kw):
    pipe = cls.from_pretrained(folder, dtype=torch.float32, **NO_EXTRAS, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _spaced(model, steps: int, guidance: float) -> Sampling:
    return Sampling.spaced(model.schedule, steps, guidance=guidance)


@pytest.mark.parametrize("seed,steps,guidance", [(0, 6, 7.0), (42, 4, 1.0)])
def test_stage_one_equals_if_pipeline(tiny_if_models, stages, seed, steps, guidance):
    pipe = _pipe(IFPipeline, tiny_if_models.stage_1)
    expected = pipe(prompt="A red Cat", num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(seed), clean_caption=False).images
    got = tasks.sample(stages[0], "A red Cat", [seed], _spaced(stages[0], steps, guidance))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.float(), atol=1e-4), (got - expected).abs().max()


def test_stage_two_equals_superresolution_pipeline(tiny_if_models, stages):
    low = torch.rand(1, 3, stages[0].size, stages[0].size) * 2 - 1
    pipe = _pipe(IFSuperResolutionPipeline, tiny_if_models.stage_2, text_encoder=None, tokenizer=None)
    embeds = stages[1].encode(["a dog", ""]).embeds
    expected = pipe(image=low, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:],
                    num_inference_steps=5, guidance_scale=4.0, noise_level=250, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(7)).images
    got = tasks.sample(stages[1], "a dog", [7], _spaced(stages[1], 5, 4.0), low_res=LowRes(low, 250))
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.float(), atol=1e-4), (got - expected).abs().max()


def test_batched_seeds_equal_single_runs(stages):
    batch = tasks.sample(stages[0], "a boat", [3, 4], _spaced(stages[0], 3, 5.0))
    alone = tasks.sample(stages[0], "a boat", [4], _spaced(stages[0], 3, 5.0))
    # the contract: equal to float rounding, which batching may reorder (and which differs by CPU and thread
    # count); once written as 8-bit pixels, no pixel may differ by more than one level
    assert np.abs(np.asarray(to_pil(batch[1]), np.int16) - np.asarray(to_pil(alone[0]), np.int16)).max() <= 1


def test_two_view_anagram_runs_through_both_stages(stages):
    views = [make_view("identity"), make_view("flip")]
    low = tasks.anagram(stages[0], ["a cat", "a dog"], views, [0, 1], _spaced(stages[0], 3, 10.0))
    high = tasks.anagram(stages[1], ["a cat", "a dog"], views, [0, 1], _spaced(stages[1], 3, 10.0),
                         low_res=LowRes(low))
    assert low.shape == (2, 3, stages[0].size, stages[0].size)
    assert high.shape == (2, 3, stages[1].size, stages[1].size)
    assert torch.isfinite(high).all()


def test_two_view_mean_step_by_hand_on_tiny_if(stages):
    from mirage.engine.combine import cfg, estimate

    model, flip = stages[0], make_view("flip")
    x = torch.randn(1, 3, model.size, model.size, generator=torch.Generator().manual_seed(0))
    terms = tasks.make_terms(model, ["a cat", "a dog"], 1, views=[make_view("identity"), flip])
    eps, var = estimate(model, x, 500, terms, 10.0)
    cat, dog, null = (model.encode([p]) for p in ("a cat", "a dog", ""))
    e1c, v1 = model(x, 500, cat)
    e1u, _ = model(x, 500, null)
    e2c, v2 = model(flip.view(x), 500, dog)
    e2u, _ = model(flip.view(x), 500, null)
    assert torch.allclose(eps, (cfg(e1c, e1u, 10.0) + flip.inverse(cfg(e2c, e2u, 10.0))) / 2, atol=1e-4)  # x10 guidance
    assert torch.allclose(var, (v1 + flip.inverse(v2)) / 2, atol=1e-4)


@pytest.mark.parametrize("name", ["fast27", "smart27", "super40"])
def test_named_schedules_equal_if_pipeline_given_those_timesteps(tiny_if_models, stages, name):
    pipe = _pipe(IFPipeline, tiny_if_models.stage_1)
    timesteps = list(named_timesteps(name, stages[0].schedule))
    expected = pipe(prompt="a red cat", timesteps=timesteps, guidance_scale=7.0, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(3), clean_caption=False).images
    got = tasks.sample(stages[0], "a red cat", [3], Sampling(timesteps, guidance=7.0))
    assert torch.allclose(got, expected.float(), atol=1e-4), (got - expected).abs().max()


def test_schedule_is_recorded_and_checked(tiny_if_models, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sample", "--prompt", "a cat", "--model", str(tiny_if_models.stage_1), "--upscaler", "none",
                 "--schedule", "fast27", "--out", str(out), "--quiet"]) == 0
    stage = json.loads((out / "result.json").read_text())["images"][0]["stages"][0]
    assert stage["timesteps"] == list(published.fast27_timesteps) and stage["steps"] == 27
    assert main(["sample", "--schedule", "smart27", "--steps", "5", "--out", str(tmp_path / "b")]) == 2
    assert "drop --steps" in capsys.readouterr().err
    assert main(["sample", "--schedule", "bogus", "--out", str(tmp_path / "b")]) == 2
    assert "unknown --schedule 'bogus'" in capsys.readouterr().err


def test_the_schedule_names_are_those_diffusers_ships():
    assert sorted(SCHEDULES) == sorted(n.removesuffix("_timesteps") for n in dir(published) if n.endswith("_timesteps"))
