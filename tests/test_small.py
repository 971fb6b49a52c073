"""The small-UNet back end: the shipped built-ins, loading errors, and that it behaves as a Denoiser."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mirage.backends.small import builtin_path, load_builtin, load_small
from mirage.engine.denoiser import Cond, Denoiser
from mirage.engine.sample import Sampling
from mirage.engine.tasks import sample
from mirage.errors import MirageError, UsageError


@pytest.fixture(scope="module")
def fashion():
    return load_builtin("fashion")


@pytest.mark.parametrize("name", ["fashion", "digits"])
def test_builtins_are_small_fp16_and_load(name):
    path = builtin_path(name)
    assert path.stat().st_size <= 8 * 2**20
    assert all(v.dtype == torch.float16 for v in load_file(str(path)).values())
    model = load_builtin(name)
    assert isinstance(model, Denoiser)
    assert (model.size, model.channels, model.dtype) == (28, 1, torch.float32)
    assert len(model.class_names) == 10 and model.schedule.num_train_timesteps == 1000


def test_prompts_are_class_names(fashion):
    assert fashion.encode(["ankle boot", "a bag", "", "T-shirt/top"]).embeds.tolist() == [9, 8, -1, 0]
    with pytest.raises(UsageError, match="Sneaker"):
        fashion.encode(["zebra"])
    assert load_builtin("digits").encode(["7", "seven", ""]).embeds.tolist() == [7, 7, -1]


def test_call_returns_eps_and_no_variance(fashion):
    x = torch.randn(4, 1, 28, 28)
    eps, var = fashion(x, 500, fashion.encode(["bag", "coat", "", "dress"]))
    assert eps.shape == x.shape and eps.dtype == x.dtype and var is None and torch.isfinite(eps).all()
    # the class changes the estimate; the null class is its own estimate
    e_bag, _ = fashion(x[:1], 500, fashion.encode(["bag"]))
    e_null, _ = fashion(x[:1], 500, fashion.encode([""]))
    assert not torch.allclose(e_bag, e_null, atol=1e-3)


def test_denoises(fashion):
    """At a middle timestep the clean estimate of a noised model sample is much closer to it than the noisy
    image is: the weights do what a trained denoiser does (random weights fail this)."""
    clean = sample(fashion, ["trouser", "sneaker"], [0, 1], Sampling.spaced(fashion.schedule, 10, guidance=2.0))
    t = 400
    gen = torch.Generator().manual_seed(0)
    noisy = fashion.schedule.forward(clean, t, torch.randn(clean.shape, generator=gen))
    eps, _ = fashion(noisy, t, fashion.encode(["trouser", "sneaker"]))
    x0 = fashion.schedule.x0_from_eps(noisy, t, eps)
    assert ((x0 - clean) ** 2).mean() < 0.25 * ((noisy - clean) ** 2).mean()
    assert clean.min() >= -1 and clean.max() <= 1 and clean.std() > 0.3


def test_corrupt_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(builtin_path("fashion").read_bytes()[:5000])
    with pytest.raises(MirageError, match="not a readable safetensors") as e:
        load_small(path)
    assert "\n" not in str(e.value)
    with pytest.raises(MirageError, match="no model file"):
        load_small(tmp_path / "missing.safetensors")


def test_other_files_and_other_architectures(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(MirageError, match="not a mirage small-UNet"):
        load_small(plain)
    from safetensors import safe_open

    src = builtin_path("fashion")
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    config["widths"] = [16, 32, 64]
    other = tmp_path / "other.safetensors"
    save_file(load_file(str(src)), str(other), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(MirageError, match="do not fit the architecture") as e:
        load_small(other)
    assert "\n" not in str(e.value)


def test_to_returns_the_model(fashion):
    assert fashion.to("cpu") is fashion
    assert isinstance(fashion.encode([""]), Cond)
