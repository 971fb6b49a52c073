"""Stable Diffusion behind the Denoiser seam: mirage on a tiny random SD (and x4 upscaler) equals diffusers'
pipelines for the same seed, every task runs on latents, and what does not work there is refused in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_if
import tiny_sd
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from PIL import Image

from mirage.app.main import main
from mirage.backends.load import load_model
from mirage.backends.schedulers import Scheduler
from mirage.engine import tasks
from mirage.engine.combine import estimate
from mirage.engine.denoiser import space_shape
from mirage.engine.sample import Sampling
from mirage.illusions.views import make_view
from mirage.io import to_pil

PROMPT = "a red cat"
NO_EXTRAS = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd.build(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(str(tiny.sd), torch.device("cpu"))  # mirage's real loading code, from the folder


def _pipe(cls, folder, scheduler: Scheduler | None = None, **kw):
    pipe = cls.from_pretrained(folder, **NO_EXTRAS, **kw)
    if scheduler is not None:
        pipe.scheduler = scheduler.build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampling(model, name: str | None, steps: int, guidance: float = 7.5) -> Sampling:
    spec = Scheduler(name or model.scheduler_name, model.scheduler_config, steps)
    return Sampling(spec.timesteps(), guidance, scheduler=spec)


def _gen(seed: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed)]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def _not_trivial(images: torch.Tensor) -> None:  # random weights must still give a picture, not a flat clamp
    assert images.std() > 1e-3 and ((images > 0.01) & (images < 0.99)).float().mean() > 0.5


@pytest.mark.parametrize("scheduler", [None, "lms", "euler_a"])  # None: the folder's own (PNDM)
def test_sample_equals_stable_diffusion_pipeline(tiny, model, scheduler, tmp_path):
    spec = _sampling(model, scheduler, 4)
    pipe = _pipe(StableDiffusionPipeline, tiny.sd, spec.scheduler)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, output_type="pt", generator=_gen(5)).images
    _not_trivial(expected)
    got = (tasks.sample(model, PROMPT, [5], spec) + 1) / 2
    assert got.shape == expected.shape == (1, 3, model.size, model.size)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    # and `mirage sample` end to end: its PNG is the pipeline's image
    argv = ["sample", "--model", str(tiny.sd), "--steps", "4", "--prompt", PROMPT, "--seed", "5", "--quiet",
            "--out", str(tmp_path / "run")] + ([] if scheduler is None else ["--scheduler", scheduler])
    assert main(argv) == 0
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    png = _png(tmp_path / "run" / doc["images"][0]["file"])
    assert np.abs(png - np.asarray(to_pil(expected[0] * 2 - 1), np.int16)).max() <= 1


def test_batched_seeds_draw_their_own_noise(model):
    batch = tasks.sample(model, PROMPT, [3, 4], _sampling(model, "euler_a", 3))
    alone = tasks.sample(model, PROMPT, [4], _sampling(model, "euler_a", 3))
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


@pytest.mark.parametrize("scheduler", [None, "euler"])
def test_edit_equals_img2img_pipeline(tiny, model, scheduler):
    image = torch.rand(1, 3, model.size, model.size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    steps, strength = 5, 0.6
    sampling = _sampling(model, scheduler, steps)
    pipe = _pipe(StableDiffusionImg2ImgPipeline, tiny.sd, sampling.scheduler)
    expected = pipe(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                    output_type="pt", generator=_gen(2)).images
    start = steps - int(steps * strength)  # Img2Img's t_start
    got = (tasks.edit(model, image, PROMPT, [2], sampling, start=start) + 1) / 2
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_inpaint_keeps_every_pixel_outside_the_mask(model):
    image = torch.rand(1, 3, model.size, model.size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, model.size, model.size)
    mask[..., 3:9, 5:12] = 1  # not aligned to the 2-px latent cells
    out = tasks.inpaint(model, image, mask, PROMPT, [0, 1], _sampling(model, None, 4))
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], image.expand_as(out)[keep])
    assert (out - image).abs()[~keep].mean() > 0.05


def test_anagram_with_flip_on_latents_is_exactly_flip_symmetric(model):
    flip, ident = make_view("flip"), make_view("identity")
    x = torch.randn(1, *space_shape(model), generator=torch.Generator().manual_seed(0))
    ab = tasks.make_terms(model, ["a cat", "a dog"], 1, views=[ident, flip])
    ba = tasks.make_terms(model, ["a dog", "a cat"], 1, views=[ident, flip])
    eps, _ = estimate(model, x, 500, ab, 7.5)
    eps_flipped, _ = estimate(model, flip.view(x), 500, ba, 7.5)
    assert torch.equal(eps_flipped, flip.view(eps))
    out = tasks.anagram(model, ["a cat", "a dog"], [ident, flip], [0], _sampling(model, "dpm++2m", 3))
    assert out.shape == (1, 3, model.size, model.size) and torch.isfinite(out).all()


def test_lowhigh_hybrid_runs_on_latents(model):
    out = tasks.hybrid(model, ["a cat", "a dog"], [0], _sampling(model, "unipc", 3), kind="lowhigh")
    assert out.shape == (1, 3, model.size, model.size) and torch.isfinite(out).all()


def test_upscale_equals_upscale_pipeline(tiny, tmp_path):
    up = load_model(str(tiny.upscaler), torch.device("cpu"))
    side = space_shape(up)[-1]
    low = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(4))  # in [0, 1]
    pipe = _pipe(StableDiffusionUpscalePipeline, tiny.upscaler, watermarker=None)
    expected = pipe("a dog", image=low, num_inference_steps=4, guidance_scale=9.0, noise_level=20,
                    output_type="pt", generator=_gen(6)).images
    _not_trivial(expected)
    sampling = _sampling(up, None, 4, guidance=9.0)
    got = (tasks.upscale(up, low * 2 - 1, "a dog", [6], sampling, noise_level=20) + 1) / 2
    assert got.shape == expected.shape == (1, 3, up.size, up.size) and up.size == 2 * side
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    path = tmp_path / "low.png"
    to_pil(low[0] * 2 - 1).save(path)
    assert main(["upscale", "--model", str(tiny.upscaler), "--image", str(path), "--steps", "2", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["images"][0]["noise_level"] == 20


def _broken(tiny, tmp_path, what: str):
    folder = tmp_path / f"broken-{what}"
    shutil.copytree(tiny.sd, folder)
    if what == "vae":
        shutil.rmtree(folder / "vae")
    else:  # a text encoder of another width than the UNet attends to
        cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
        cfg["hidden_size"] = 48
        (folder / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case,message", [
    ("negate", "view 'negate' does not act on Stable Diffusion's latent grid"),
    ("graycolor", "a 'graycolor' hybrid does not work on Stable Diffusion's latent grid"),
    ("size", "--size 17 does not fit"),
    ("upscaler", "this model is an upscaler"),
    ("vae", "vae/config.json is missing"),
    ("width", "the parts do not match"),
])
def test_what_does_not_work_on_latents_is_refused_in_one_line(tiny, case, message, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--steps", "2", "--quiet", "--out", str(out)]
    argv = {
        "negate": ["anagram", "--model", str(tiny.sd), "--prompt", "a", "--prompt", "b", "--view", "identity",
                   "--view", "negate"],
        "graycolor": ["hybrid", "--model", str(tiny.sd), "--kind", "graycolor", "--gray", "a", "--color", "b"],
        "size": ["sample", "--model", str(tiny.sd), "--size", "17"],
        "upscaler": ["sample", "--model", str(tiny.upscaler)],
        "vae": ["sample", "--model", str(_broken(tiny, tmp_path, "vae"))],
        "width": ["sample", "--model", str(_broken(tiny, tmp_path, "width"))],
    }[case]
    assert main(argv + common) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_stage3_upscales_an_if_anagram_through_the_same_views(tiny, tiny_if_models, tmp_path):
    out = tmp_path / "run"
    assert main(["anagram", "--model", str(tiny_if_models.stage_1), "--upscaler", str(tiny_if_models.stage_2),
                 "--stage3", str(tiny.upscaler), "--prompt", "a cat", "--prompt", "a dog", "--view", "identity",
                 "--view", "flip", "--steps", "2", "--steps2", "2", "--quiet", "--out", str(out)]) == 0
    entry = json.loads((out / "result.json").read_text())["images"][0]
    assert [st["model"] for st in entry["stages"]] == [str(tiny_if_models.stage_1), str(tiny_if_models.stage_2),
                                                       str(tiny.upscaler)]
    assert entry["stages"][2]["steps"] == 20 and entry["stages"][2]["guidance"] == 9.0
    assert entry["stages"][2]["noise_level"] == 20 and entry["stages"][2]["size"] == 2 * tiny_if.STAGE_II_SIZE
    assert Image.open(out / entry["file"]).size == (2 * tiny_if.STAGE_II_SIZE,) * 2  # the tiny x4 is x2


def test_stage3_takes_its_own_settings_and_needs_stage_two(tiny, tiny_if_models, tmp_path, capsys):
    base = ["anagram", "--model", str(tiny_if_models.stage_1), "--stage3", str(tiny.upscaler), "--prompt", "a cat",
            "--prompt", "a dog", "--view", "identity", "--view", "flip", "--steps", "2", "--quiet"]
    out = tmp_path / "run"
    assert main(base + ["--upscaler", str(tiny_if_models.stage_2), "--steps2", "2", "--steps3", "3",
                        "--guidance3", "5", "--noise-level3", "40", "--out", str(out)]) == 0
    third = json.loads((out / "result.json").read_text())["images"][0]["stages"][2]
    assert (third["steps"], third["guidance"], third["noise_level"]) == (3, 5.0, 40)
    assert main(base + ["--upscaler", "none", "--out", str(tmp_path / "none")]) == 2
    assert "--stage3 upscales IF's stage-II images" in capsys.readouterr().err
    assert main(base + ["--upscaler", str(tiny_if_models.stage_2), "--noise-level3", "9999",
                        "--out", str(tmp_path / "bad")]) == 2
    assert "--noise-level3 must be between 0 and" in capsys.readouterr().err


def test_gpu_benchmark_runs_tiny_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "sd_gpu.py"), "--tiny", "--root", str(tmp_path),
                           "--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["max_abs_diff"] <= 1e-4 for r in rows)


def test_prompt_embeddings_are_cached_on_disk_and_clip_is_freed(tiny, tmp_path, monkeypatch):
    from mirage.backends import hub

    loads = []
    real = hub.load_clip_text

    def counted(*a):
        loads.append(1)
        return real(*a)

    monkeypatch.setattr(hub, "load_clip_text", counted)
    first = load_model(str(tiny.sd), torch.device("cpu")).encode([PROMPT, ""]).embeds
    again = load_model(str(tiny.sd), torch.device("cpu")).encode(["", PROMPT]).embeds  # a new model: the disk
    assert len(loads) == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])


def test_unet_runs_under_the_memory_plans_shared_with_if(tiny, model):
    """The streamed plan (half of the UNet's weights copied in block by block) gives the same latents as the
    resident one: SD's UNet goes through runtime.UNetRuntime as IF's do."""
    streamed = load_model(str(tiny.sd), torch.device("cpu"), memory="blocks")
    sampling = _sampling(model, None, 3)
    want = tasks.sample(model, PROMPT, [0], sampling)
    got = tasks.sample(streamed, PROMPT, [0], sampling)
    assert streamed.plan.name == "blocks" and model.plan.name == "cpu"
    assert torch.allclose(got, want, atol=1e-5)
    assert load_model(str(tiny.sd), torch.device("cpu"), compile=True).compile is not None


def test_denoise_study_runs_on_latents_and_shows_them_decoded(tiny, model, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    argv = ["denoise", "--model", str(tiny.sd), "--image", str(src), "--steps", "6", "--i-start", "2",
            "--levels", "300,600", "--quiet", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "run" / "result.json").read_text())
    final = _png(tmp_path / "run" / doc["images"][0]["file"])
    assert final.shape == (model.size, model.size, 3)  # decoded pixels, not the 4-channel latent grid
    assert Image.open(tmp_path / "run" / "sheet.png").width > 3 * model.size
