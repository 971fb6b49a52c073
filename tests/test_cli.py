"""`mirage` end to end on the tiny IF and on a built-in model, and its one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mirage.app.args import parse_interval, parse_seeds
from mirage.app.main import main
from mirage.errors import UsageError
from mirage.io import read_settings


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)  # not square: cropped
    return path


def _if_args(tiny):
    return ["--model", str(tiny.stage_1), "--upscaler", str(tiny.stage_2), "--steps", "2", "--steps2", "2",
            "--quiet"]


def _result(folder):
    doc = json.loads((folder / "result.json").read_text())
    for entry in doc["images"]:
        assert (folder / entry["file"]).exists()
    return doc


def test_sample_on_tiny_if_writes_images_sheet_and_result(tiny_if_models, tmp_path):
    out = tmp_path / "run"
    assert main(["sample", *_if_args(tiny_if_models), "--prompt", "a cat", "--seeds", "3-4",
                 "--out", str(out)]) == 0
    doc = _result(out)
    assert [e["seed"] for e in doc["images"]] == [3, 4]
    first = doc["images"][0]
    assert Image.open(out / first["file"]).size == (32, 32)  # the upscaler's resolution
    assert Image.open(out / first["stage1_file"]).size == (16, 16)
    assert read_settings(out / first["file"])["prompt"] == "a cat"
    assert (out / "sheet.png").exists()
    # the same --out again never overwrites: a numbered sibling
    assert main(["sample", *_if_args(tiny_if_models), "--prompt", "a cat", "--out", str(out)]) == 0
    assert (tmp_path / "run-2" / "result.json").exists()


@pytest.mark.parametrize("command", [
    ["anagram", "--prompt", "a cat", "--prompt", "a dog", "--view", "identity", "--view", "rotate_cw"],
    ["hybrid", "--low", "a cat", "--high", "a dog"],
    ["edit", "--start", "0,1"],
    ["inpaint", "--box", "2,2,9,9"],
])
def test_tasks_on_tiny_if(tiny_if_models, tmp_path, photo, command):
    extra = ["--image", str(photo)] if command[0] in ("edit", "inpaint") else []
    assert main([*command, *extra, *_if_args(tiny_if_models), "--out", str(tmp_path / "r")]) == 0
    doc = _result(tmp_path / "r")
    assert doc["task"] == command[0]
    if command[0] == "anagram":
        assert (tmp_path / "r" / doc["images"][0]["animation"]).exists()


def test_denoise_study_on_builtin(tmp_path, photo):
    assert main(["denoise", "--image", str(photo), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert (tmp_path / "d" / "sheet.png").exists()
    _result(tmp_path / "d")


def test_inpaint_keeps_pixels_outside_the_box_on_builtin(tmp_path, photo):
    from mirage.io import load_image, load_mask
    assert main(["inpaint", "--image", str(photo), "--box", "5,5,20,20", "--prompt", "bag", "--steps", "4",
                 "--out", str(tmp_path / "i"), "--quiet"]) == 0
    doc = _result(tmp_path / "i")
    got = np.asarray(Image.open(tmp_path / "i" / doc["images"][0]["file"]).convert("L"), dtype=np.int16)
    original = load_image(photo, size=28, channels=1)[0, 0].numpy()
    expected = np.round((original + 1) * 127.5).astype(np.int16)
    box = load_mask(None, "5,5,20,20", photo, 28)[0, 0].numpy().astype(bool)
    assert 0 < box.sum() < 28 * 28
    assert np.abs(got[~box] - expected[~box]).max() <= 1


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(UsageError):
        parse_seeds("a-b")


@pytest.mark.parametrize("argv,message,code", [
    (["sample", "--steps", "0"], "--steps", 2),
    (["sample", "--guidance", "nan"], "--guidance", 2),
    (["sample", "--seed", "-5"], "seed", 2),
    (["sample", "--model", "/nonexistent/folder"], "", 1),
    (["anagram", "--prompt", "a", "--prompt", "b", "--view", "identity", "--view", "upsidedown"], "flip", 2),
    (["anagram", "--prompt", "a", "--view", "identity", "--view", "flip"], "need 2 prompts", 2),
    (["edit", "--image", "/no/such.png"], "", 1),
    (["edit", "--image", "PHOTO", "--start", "99"], "out of range", 2),
    (["inpaint", "--image", "PHOTO"], "--mask", 2),
    (["sample", "--prompt", "spaceship"], "known", 2),
    (["sample", "--guidance-interval", "800-100"], "--guidance-interval", 2),
    (["hybrid", "--low", "bag", "--high", "coat", "--sigma", "0"], "--sigma", 2),
])
def test_bad_input_is_one_line(argv, message, code, photo, tmp_path, capsys):
    argv = [str(photo) if a == "PHOTO" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_parse_interval():
    assert parse_interval("150-850") == (150, 850)
    assert parse_interval("none") is None and parse_interval(None) is None
    for bad in ("150", "a-b", "-5-3"):
        with pytest.raises(UsageError):
            parse_interval(bad)


def test_builtin_defaults_are_per_task_and_recorded(tmp_path):
    assert main(["sample", "--prompt", "bag", "--n", "2", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    entry = _result(tmp_path / "s")["images"][0]
    stage = entry["stages"][0]
    assert (stage["steps"], stage["guidance"], stage["guidance_interval"]) == (100, 1.5, [150, 850])
    assert (entry["tries"], entry["confidence"]) == (3, 0.5)
    assert all("right" in e and "try" in e for e in _result(tmp_path / "s")["images"])
    assert main(["sample", "--prompt", "bag", "--steps", "3", "--guidance-interval", "none",
                 "--out", str(tmp_path / "n"), "--quiet"]) == 0
    assert "guidance_interval" not in _result(tmp_path / "n")["images"][0]["stages"][0]
    assert main(["hybrid", "--low", "bag", "--high", "coat", "--steps", "3", "--sigma", "3",
                 "--out", str(tmp_path / "h"), "--quiet"]) == 0
    entry = _result(tmp_path / "h")["images"][0]
    assert entry["sigma"] == 3 and entry["stages"][0]["guidance"] == 5.0
    assert "guidance_interval" not in entry["stages"][0]
    # illusions: 8 tries at 90 %, classifier guidance at the strength the guide's file gives for the task
    assert (entry["tries"], entry["confidence"], entry["classifier_guidance"]) == (8, 0.9, 300)
    assert main(["hybrid", "--low", "bag", "--high", "coat", "--steps", "3", "--classifier-guidance", "0",
                 "--out", str(tmp_path / "h0"), "--quiet"]) == 0
    entry = _result(tmp_path / "h0")["images"][0]
    assert entry["sigma"] == 3.5 and "classifier_guidance" not in entry
    assert main(["anagram", "--prompt", "7", "--prompt", "1", "--model", "digits", "--steps", "3", "--tries", "1",
                 "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert _result(tmp_path / "d")["images"][0]["classifier_guidance"] == 100


def test_default_tries_only_where_the_classifier_can_check(tmp_path, capsys):
    assert main(["sample", "--steps", "3", "--out", str(tmp_path / "u"), "--quiet"]) == 0  # "" is no class
    assert "tries" not in _result(tmp_path / "u")["images"][0]
    assert main(["sample", "--steps", "3", "--tries", "2", "--out", str(tmp_path / "v"), "--quiet"]) == 2
    assert "not \"\"" in capsys.readouterr().err
    assert main(["sample", "--prompt", "bag", "--tries", "0", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["sample", "--prompt", "bag", "--confidence", "1", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    assert "probability below 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["sample", "--out", str(target), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_console_script_exit_code_for_usage():
    proc = subprocess.run([sys.executable, "-m", "mirage", "sample", "--steps", "-1"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [["sample", "--prompt", "bag"],
                                  ["anagram", "--prompt", "bag", "--prompt", "trouser"],
                                  ["hybrid", "--low", "bag", "--high", "trouser"]])
def test_pick_best_lists_candidates_best_first(argv, tmp_path):
    import torch

    from mirage.backends.load import load_model
    from mirage.io import load_image
    from mirage.quality import classifier as shipped
    from mirage.quality import selection

    out = tmp_path / "p"
    assert main([*argv, "--n", "5", "--steps", "4", "--pick", "best", "--out", str(out), "--quiet"]) == 0
    entries = _result(out)["images"]
    assert [e["rank"] for e in entries] == [1, 2, 3, 4, 5]
    assert sorted(e["seed"] for e in entries) == [0, 1, 2, 3, 4]
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)
    if argv[0] == "sample":  # the recorded score is the classifier's, recomputed from the written files
        images = torch.cat([load_image(out / e["file"], 28, channels=1) for e in entries])
        clf, model = shipped.load_classifier("fashion"), load_model("fashion", torch.device("cpu"))
        again = selection.candidate_scores(clf, model, images, [["bag"]] * 5, [lambda x: x])[0]
        assert torch.allclose(again, torch.tensor(scores), atol=0.05)
    assert Image.open(out / "sheet.png").height > 0


def test_tries_remakes_only_the_images_the_classifier_reads_wrong(tmp_path):
    from mirage.quality import selection

    def run(*extra):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        assert main(["sample", "--prompt", "coat", "--seeds", "0-5", "--steps", "4", "--guidance", "1", *extra,
                     "--out", str(out), "--quiet"]) == 0
        return out, {e["seed"]: e for e in _result(out)["images"]}

    once_dir, once = run("--tries", "1", "--pick", "best")
    again_dir, again = run("--tries", "3")
    wrong = [s for s, e in once.items() if not e["right"]]
    assert 0 < len(wrong) < 6, "4 unguided steps should make some coats that do not read as coats"
    for s, e in again.items():
        if s not in wrong:  # right the first time: the same image, try 0
            assert e["try"] == 0 and _same_file(once_dir / once[s]["file"], again_dir / e["file"])
        else:
            assert e["try"] > 0 or not e["right"]
    assert sum(e["right"] for e in again.values()) > 6 - len(wrong)
    # try j of seed s is the plain image of seed candidate_seed(s, j)
    s = next(s for s in wrong if again[s]["try"] > 0)
    plain_dir, plain = run("--seeds", str(selection.candidate_seed(s, again[s]["try"])))
    assert _same_file(again_dir / again[s]["file"], plain_dir / next(iter(plain.values()))["file"])


def _same_file(a, b) -> bool:
    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_pick_best_needs_a_classifier(tiny_if_models, tmp_path, capsys):
    assert main(["sample", "--prompt", "a cat", *_if_args(tiny_if_models), "--pick", "best", "--scorer",
                 "classifier", "--out", str(tmp_path / "o")]) == 2
    assert "built-in model's classifier" in capsys.readouterr().err
    assert main(["hybrid", "--kind", "graycolor", "--gray", "bag", "--color", "coat", "--pick", "best",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()
