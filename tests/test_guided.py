"""Classifier guidance: the guide (a classifier of noised images), the `ClassifierGuided` wrapper in the
sampling loop, `--classifier-guidance` on the command line, and the shipped guides."""
import json

import pytest
import torch
from test_score import quadrants

from mirage.app.main import main
from mirage.backends.load import load_model
from mirage.backends.small import builtin_path
from mirage.engine import tasks
from mirage.engine.combine import Term
from mirage.engine.denoiser import Cond
from mirage.engine.guide import Guide
from mirage.engine.sample import Sampling
from mirage.engine.schedule import Schedule
from mirage.illusions.filters import lowpass, make_components
from mirage.illusions.views import make_view
from mirage.quality import classifier as shipped
from mirage.train import classifier as clf


def tiny_guide(seed: int = 0) -> clf.Classifier:
    torch.manual_seed(seed)
    return clf.Classifier(clf.ClassifierConfig(channels=(8, 16), classes=4, noisy=True)).eval()


def test_a_guide_learns_noised_images_and_reads_its_noise_level(tmp_path):
    x, y = quadrants(600)
    tx, ty = quadrants(200, seed=1)
    guide = clf.train(tiny_guide(), x, y, epochs=4, batch_size=50, lr=1e-2, log=lambda s: None)
    info = clf.measure(guide, x, tx, ty)
    assert info["test_accuracy"] >= 0.9 and info["test_accuracy_t500"] >= 0.8
    assert info["test_accuracy_t250"] >= info["test_accuracy_t750"] - 0.05
    clf.save(guide, tmp_path / "g.safetensors")
    back = shipped.load_classifier(tmp_path / "g.safetensors")
    assert back.config.noisy
    im = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(back(im), guide(im, torch.zeros(3)))  # no level given: a clean image
    assert not torch.allclose(back(im, torch.full((3,), 0.9)), back(im))


def _log_p(guide, x, level, labels, sees=lambda x: x):
    return guide(sees(x), level.expand(len(x))).log_softmax(1).gather(1, labels.clamp(min=0).view(-1, 1))[:, 0]


@pytest.mark.parametrize("view,sees", [(None, None), ("flip", None), (None, "blur")])
def test_the_push_raises_each_prompt_where_it_is_seen_and_leaves_null_prompts_alone(view, sees):
    guide = tiny_guide()
    x = torch.randn(3, 1, 28, 28)
    labels = torch.tensor([2, -1, 0])
    v = None if view is None else make_view(view)
    blur = None if sees is None else lowpass(28, 3.0)
    term = Term(cond=Cond(embeds=labels), view=v, sees=blur)
    alpha_bar = Schedule.cosine().alpha_bar(400)
    push = Guide(guide, 0.5).push(x, alpha_bar, [term])
    assert torch.equal(push[1], torch.zeros_like(push[1]))
    # the push enters the noise estimate: the clean image it implies moves by -level * push
    level = (1 - alpha_bar).sqrt()
    seen = lambda im: (im if v is None else v.view(im)) if blur is None else blur(im)  # noqa: E731
    before = _log_p(guide, x, level, labels, seen)
    after = _log_p(guide, x - level * push, level, labels, seen)
    assert (after > before)[[0, 2]].all()
    assert torch.equal(Guide(guide, 0.0).push(x, alpha_bar, [term]), torch.zeros_like(x))


def test_hybrid_prompts_are_seen_in_partial_sums_of_the_components():
    low, high = make_components("lowhigh", 28, 3.0)
    x = torch.randn(2, 1, 28, 28)
    seen = tasks._partial_sum([low, high])(x)
    assert torch.allclose(seen, x, atol=1e-5) and torch.equal(tasks._partial_sum([low])(x), low(x))


def test_guidance_runs_in_the_loop_for_anagrams_and_hybrids():
    model = load_model("fashion", torch.device("cpu"))
    guide = Guide(shipped.guide_for(model), 100.0)
    views = [make_view("identity"), make_view("flip")]
    for make in (lambda s: tasks.anagram(model, ["trouser", "bag"], views, [0, 1], s),
                 lambda s: tasks.hybrid(model, ["trouser", "bag"], [0, 1], s)):
        plain = make(Sampling.spaced(model.schedule, 4, guidance=3.0))
        guided = make(Sampling.spaced(model.schedule, 4, guidance=3.0, guide=guide))
        assert guided.isfinite().all() and (guided - plain).abs().max() > 0.1


def test_cli_records_classifier_guidance_and_refuses_it_without_a_guide(tiny_if_models, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["anagram", "--prompt", "bag", "--prompt", "trouser", "--steps", "3", "--classifier-guidance",
                 "5", "--out", str(out), "--quiet"]) == 0
    entry = json.loads((out / "result.json").read_text())["images"][0]
    assert entry["classifier_guidance"] == 5
    assert main(["sample", "--prompt", "bag", "--classifier-guidance", "-1", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 2
    assert "--classifier-guidance" in capsys.readouterr().err
    assert main(["sample", "--prompt", "a cat", "--model", str(tiny_if_models.stage_1), "--upscaler", "none",
                 "--steps", "2", "--classifier-guidance", "5", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has none" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["fashion", "digits"])
def test_shipped_guides_know_noised_test_images(name):
    guide = shipped.load_classifier(builtin_path(name, "guide"))
    assert guide.config.noisy and guide.config.data == name
    assert guide.info["test_accuracy"] > 0.85 and guide.info["test_accuracy_t500"] > 0.5


def test_train_classifier_noisy_writes_a_guide(tmp_path, capsys):
    from test_train import make_idx

    make_idx(tmp_path / "idx")
    out = tmp_path / "g"
    assert main(["train", "classifier", "--noisy", "--data", "fashion", "--root", str(tmp_path / "idx"),
                 "--epochs", "1", "--channels", "8,16", "--out", str(out)]) == 0
    guide = shipped.load_classifier(out / "classifier.safetensors")
    assert guide.config.noisy and {"test_accuracy_t250", "test_accuracy_t750"} <= set(guide.info)
    assert "at t 500" in capsys.readouterr().out
