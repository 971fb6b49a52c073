"""CLIP as a judge (quality.clip), `mirage score RUN_DIR --clip` and `mirage rank`, on a tiny random CLIP built
offline (tiny_clip) and run folders of the built-in fashion model made in a few steps."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import tiny_clip
import torch
import transformers
from transformers import CLIPModel, CLIPTokenizer

from mirage.app.main import main
from mirage.illusions.filters import lowpass
from mirage.illusions.views import make_view, parse_views
from mirage.io import load_image, to_pil
from mirage.quality import clip

PROMPTS = ["Bag", "Sneaker"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_clip.build(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def judge(tiny):
    with clip.ClipJudge.load(str(tiny)) as j:
        yield j


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An anagram run of 4 images and a low/high hybrid run of 2 (sigma 3), 3 steps each, made once."""
    root = tmp_path_factory.mktemp("runs")
    made = {"anagram": ["anagram", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "4"],
            "hybrid": ["hybrid", "--low", PROMPTS[0], "--high", PROMPTS[1], "--sigma", "3", "--n", "2"]}
    for name, argv in made.items():
        assert main([*argv, "--model", "fashion", "--steps", "3", "--tries", "1", "--out", str(root / name),
                     "--quiet"]) == 0
    return {name: root / name for name in made}


def copy_run(runs, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs[name], tmp_path / name))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- S, A and C ------------------------------------------------------------------------------------
def direct_similarity(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity as CLIP's own examples compute it: pictures through the CLIPImageProcessor, prompts
    through the tokenizer, CLIPModel.get_image_features / get_text_features."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    pixels = processor(images=[to_pil(x) for x in images], return_tensors="pt")["pixel_values"]
    text = tokenizer(prompts, padding=True, return_tensors="pt")

    def features(out):
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        return features(model.get_image_features(pixel_values=pixels)) @ features(model.get_text_features(**text)).T


@pytest.mark.parametrize("channels, size", [(3, 40), (1, 28), (3, 256)])
def test_similarity_is_clips_cosine_similarity(tiny, judge, channels, size):
    g = torch.Generator().manual_seed(size)
    images = torch.rand(3, channels, size, size, generator=g) * 2 - 1
    prompts = ["a photo of a bag", "Sneaker", "ankle boot", "a dog"]
    mine = judge.similarity(images, prompts)
    expected = direct_similarity(tiny, images, prompts)
    assert mine.shape == (3, 4)
    assert torch.allclose(mine, expected, atol=1e-5, rtol=0)
    assert (expected - expected.mean()).abs().max() > 1e-3  # the images and prompts are told apart at all
    if channels == 1:  # grey is expanded to RGB
        assert torch.equal(mine, judge.similarity(images.expand(-1, 3, -1, -1), prompts))


def test_view_similarity_scores_view_i_against_every_prompt(judge):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    views = parse_views(["identity", "flip", "rotate_cw"], 0)
    prompts = [["bag", "sneaker", "coat"], ["coat", "bag", "dress"], ["a cat", "a dog", "shirt"]]
    S = clip.view_similarity(judge, x, prompts, [v.view for v in views])
    assert S.shape == (3, 3, 3)
    for k in range(3):
        for i, v in enumerate(views):
            assert torch.allclose(S[k, i], judge.similarity(v.view(x[k:k + 1]), prompts[k])[0], atol=1e-6)
    shared = clip.view_similarity(judge, x, ["bag", "sneaker", "coat"], [v.view for v in views])
    assert torch.allclose(shared[0], S[0])


def by_hand(S: list[list[float]], tau: float) -> tuple[float, float]:
    n = len(S)
    row = [math.exp(S[i][i] / tau) / sum(math.exp(S[i][j] / tau) for j in range(n)) for i in range(n)]
    col = [math.exp(S[j][j] / tau) / sum(math.exp(S[i][j] / tau) for i in range(n)) for j in range(n)]
    return min(S[i][i] for i in range(n)), (sum(row) / n + sum(col) / n) / 2


@pytest.mark.parametrize("S, tau", [
    ([[0.30, 0.10], [0.20, 0.25]], 0.1),
    ([[0.30, 0.10, 0.05], [0.20, 0.28, 0.10], [0.00, 0.15, 0.22]], 0.05),  # 3 views
    ([[0.31, 0.33, 0.29], [0.30, 0.26, 0.35], [0.28, 0.27, 0.24]], 0.01),  # views that match others better
])
def test_alignment_and_concealment_follow_the_definitions(S, tau):
    a, c = by_hand(S, tau)
    m = torch.tensor(S, dtype=torch.float64)
    assert clip.alignment(m).item() == pytest.approx(a, abs=1e-12)
    assert clip.concealment(m, tau).item() == pytest.approx(c, abs=1e-12)
    batch = torch.stack([m, m.T])  # [n, V, V]; transposing swaps views and prompts, which C treats alike
    assert torch.allclose(clip.concealment(batch, tau), torch.tensor([c, c], dtype=torch.float64))
    assert torch.allclose(clip.alignment(batch), torch.tensor([a, a], dtype=torch.float64))


def test_concealment_runs_from_one_over_n_to_one():
    same = torch.full((3, 3), 0.25)
    assert clip.concealment(same, 0.01).item() == pytest.approx(1 / 3)
    assert clip.concealment(torch.eye(3), 0.01).item() == pytest.approx(1, abs=1e-30)
    one = torch.tensor([[0.27]])  # a plain sample: S is 1x1
    assert clip.alignment(one).item() == pytest.approx(0.27) and clip.concealment(one, 0.01).item() == 1


def test_rank_order_is_by_alignment_then_concealment():
    a = torch.tensor([0.2, 0.3, 0.3, 0.30001, 0.1])
    c = torch.tensor([0.9, 0.1, 0.5, 0.2, 1.0])
    assert clip.rank_order(a, c).tolist() == [2, 3, 1, 0, 4]  # 0.30001 ties 0.3 at 4 places
    assert clip.rank_order(a, c, decimals=6).tolist() == [3, 2, 1, 0, 4]


def test_judge_scores_and_candidate_scores_agree(judge):
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    maps = [v.view for v in parse_views(["identity", "flip"], 0)]
    S = clip.view_similarity(judge, x, PROMPTS, maps)
    a, c = clip.judge_scores(judge, x, PROMPTS, maps)
    assert torch.equal(a, clip.alignment(S)) and torch.equal(c, clip.concealment(S, judge.tau))
    score, right = clip.candidate_scores(judge, x, PROMPTS, maps)
    assert torch.equal(score, clip.rank_keys(a, c)) and torch.equal(right, clip.reads_right(S))
    assert score[:, 0].tolist() == [round(v, 4) for v in a.tolist()] and torch.allclose(score[:, 1], c.double())
    assert judge.tau == pytest.approx(1 / math.exp(2.6592), rel=1e-4)  # CLIP's initial temperature


# ---- mirage score --clip, mirage rank --------------------------------------------------------------------
def test_score_writes_s_a_and_c_per_image(runs, tiny, tmp_path, capsys):
    run = copy_run(runs, "anagram", tmp_path)
    assert main(["score", str(run), "--clip", str(tiny)]) == 0
    out = capsys.readouterr().out
    report = read(run / "score.json")
    files = [e["file"] for e in read(run / "result.json")["images"]]
    assert [i["file"] for i in report["images"]] == files
    for i in report["images"]:
        s = torch.tensor(i["clip"]["similarity"])
        assert s.shape == (2, 2) and i["prompts"] == PROMPTS and i["checks"] == ["identity", "flip"]
        assert i["clip"]["alignment"] == pytest.approx(clip.alignment(s).item(), abs=1e-6)
        assert i["clip"]["concealment"] == pytest.approx(clip.concealment(s, report["clip"]["tau"]).item(), abs=1e-5)
        assert i["file"] in out
    assert "alignment" in out and "concealment" in out


def test_rank_writes_the_order_that_score_computes(runs, tiny, tmp_path):
    run = copy_run(runs, "anagram", tmp_path)
    pictures = sorted(p.name for p in run.iterdir())
    made = [e["file"] for e in read(run / "result.json")["images"]]
    assert main(["score", str(run), "--clip", str(tiny), "--quiet"]) == 0
    scored = read(run / "score.json")["images"]
    best_first = [i["file"] for i in sorted(scored, key=lambda i: (-i["clip"]["alignment"],
                                                                   -i["clip"]["concealment"]))]
    assert best_first != made  # the ranking changes something

    assert main(["rank", str(run), "--clip", str(tiny), "--quiet"]) == 0
    doc = read(run / "result.json")
    assert [e["file"] for e in doc["images"]] == best_first
    assert [e["rank"] for e in doc["images"]] == [1, 2, 3, 4]
    assert [e["clip"] for e in doc["images"]] == [next(i["clip"] for i in scored if i["file"] == f)
                                                  for f in best_first]
    assert doc["ranking"]["by"] == "clip" and "sheet-ranked.png" in doc["sheets"]
    assert set(pictures) <= {p.name for p in run.iterdir()}  # nothing deleted
    assert (run / "sheet-ranked.png").is_file()

    assert main(["rank", str(run), "--clip", str(tiny), "--keep", "2", "--quiet"]) == 0
    doc = read(run / "result.json")
    assert [e["file"] for e in doc["images"]] == best_first  # the same order again
    assert [e["kept"] for e in doc["images"]] == [True, True, False, False]
    assert all((run / f).is_file() for f in made) and (run / "sheet-ranked-2.png").is_file()
    assert main(["score", str(run), "--clip", str(tiny), "--quiet"]) == 0  # the new sheets are known pictures


def test_a_hybrids_low_prompt_is_scored_through_its_blur(runs, tiny, judge, tmp_path):
    run = copy_run(runs, "hybrid", tmp_path)
    assert main(["score", str(run), "--clip", str(tiny), "--quiet"]) == 0
    assert main(["score", str(run), "--clip", str(tiny), "--blur", "1", "--quiet"]) == 0
    made, told = read(run / "score.json")["images"], read(run / "score-2.json")["images"]
    for i, j in zip(made, told):
        x = load_image(run / i["file"], 28, channels=3)
        assert i["checks"] == ["low (blurred)", "high (full image)"] and i["prompts"] == PROMPTS
        low, high = torch.tensor(i["clip"]["similarity"])
        assert torch.allclose(low, judge.similarity(lowpass(28, 3.0)(x), PROMPTS)[0], atol=1e-5)
        assert torch.allclose(high, judge.similarity(x, PROMPTS)[0], atol=1e-5)
        assert not torch.allclose(low, high, atol=1e-3)  # the blur makes a difference
        assert torch.allclose(torch.tensor(j["clip"]["similarity"][0]),
                              judge.similarity(lowpass(28, 1.0)(x), PROMPTS)[0], atol=1e-5)  # --blur overrides


# ---- bad input: one line, exit 2, no score.json -----------------------------------------------------------
def refused(capsys, run: Path, argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not list(run.glob("score*.json"))


def test_a_folder_without_result_json(tiny, tmp_path, capsys):
    refused(capsys, tmp_path, ["score", str(tmp_path), "--clip", str(tiny)], str(tmp_path), "no result.json")


def test_a_result_json_whose_images_are_missing(runs, tiny, tmp_path, capsys):
    run = copy_run(runs, "anagram", tmp_path)
    gone = read(run / "result.json")["images"][1]["file"]
    (run / gone).unlink()
    refused(capsys, run, ["score", str(run), "--clip", str(tiny)], gone, "missing")
    refused(capsys, run, ["rank", str(run), "--clip", str(tiny)], gone, "missing")


@pytest.mark.parametrize("config, words", [
    (None, ["no config.json"]),
    ({"model_type": "t5", "d_model": 32}, ["not a CLIP model", "'t5'"]),
])
def test_a_clip_folder_that_is_not_a_clip_model(runs, tmp_path, capsys, config, words):
    run = copy_run(runs, "anagram", tmp_path)
    folder = tmp_path / "not-clip"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    refused(capsys, run, ["score", str(run), "--clip", str(folder)], str(folder), *words)


def test_an_incomplete_clip_folder(runs, tiny, tmp_path, capsys):
    run = copy_run(runs, "anagram", tmp_path)
    folder = Path(shutil.copytree(tiny, tmp_path / "half-clip"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    refused(capsys, run, ["score", str(run), "--clip", str(folder)], "pickle", "model.safetensors")


def test_an_image_with_no_result_json_entry(runs, tiny, tmp_path, capsys):
    run = copy_run(runs, "anagram", tmp_path)
    shutil.copy(run / read(run / "result.json")["images"][0]["file"], run / "stray.png")
    refused(capsys, run, ["score", str(run), "--clip", str(tiny)], "stray.png", "prompts are unknown")
    before = (run / "result.json").read_text()
    refused(capsys, run, ["rank", str(run), "--clip", str(tiny)], "stray.png")
    assert (run / "result.json").read_text() == before


def test_a_run_without_prompts_says_there_is_nothing_to_score(runs, tiny, tmp_path, capsys):
    run = copy_run(runs, "anagram", tmp_path)
    doc = read(run / "result.json")
    doc["images"] = [{"task": "sample", "prompt": "", "seed": e["seed"], "file": e["file"]} for e in doc["images"]]
    (run / "result.json").write_text(json.dumps(doc))
    refused(capsys, run, ["score", str(run), "--clip", str(tiny)], "nothing", "no image has prompts")


def test_pick_best_on_if_ranks_the_candidates_by_clip_alignment(tiny, tiny_if_models, tmp_path):
    out = tmp_path / "o"
    assert main(["anagram", "--prompt", "a cat", "--prompt", "a dog", "--model", str(tiny_if_models.stage_1),
                 "--upscaler", "none", "--steps", "2", "--n", "3", "--pick", "best", "--clip", str(tiny),
                 "--out", str(out), "--quiet"]) == 0
    images = json.loads((out / "result.json").read_text())["images"]
    assert [e["rank"] for e in images] == [1, 2, 3] and images[0]["scorer"] == f"clip {tiny}"
    scores = [e["score"] for e in images]
    assert scores == sorted(scores, reverse=True)
    # each score is the alignment CLIP gives the saved image, views and prompts as made
    views = [make_view("identity"), make_view("flip")]
    for e in images:
        png = load_image(out / e["file"], size=e["stages"][0]["size"], channels=3)
        S = clip.view_similarity(judge_of(tiny), png, ["a cat", "a dog"], [v.view for v in views])
        assert abs(float(clip.alignment(S)[0]) - e["score"]) < 1e-3


def judge_of(tiny):
    return clip.ClipJudge.load(str(tiny))
