"""The bad-input sweep: each case is one line on stderr with the right exit code, and nothing is written."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mirage.app.main import main

PHOTO = str(Path(__file__).parents[1] / "src/mirage/assets/photo.png")
HYBRID = ["hybrid", "--low", "bag", "--high", "sneaker"]
CASES = [  # (arguments, exit code, what the line says)
    (["sample", "--steps", "1001"], 2, "--steps must be between 1 and 1000"),
    (["sample", "--steps", "1000000000"], 2, "--steps must be between 1 and 1000"),
    (["edit", "--image", PHOTO, "--prompt", "bag", "--start", "1,1,2"], 2, "more than once"),
    (["sample", "--seeds", "3,3,3"], 2, "seed 3 more than once"),
    (["sample", "--seeds", "5-2"], 2, "write 2-5"),
    (["sample", "--seeds", "0-"], 2, "ranges like 0-7,12"),
    ([*HYBRID, "--sigma", "nan"], 2, "finite positive"),
    ([*HYBRID, "--sigma", "inf"], 2, "finite positive"),
    ([*HYBRID, "--sigma", "-1"], 2, "finite positive"),
    (["sample", "--guidance", "inf"], 2, "finite number >= 0"),
    (["sample", "--guidance", "nan"], 2, "finite number >= 0"),
    (["sample", "--sampler", "ddim", "--eta", "nan"], 2, "--eta must be between 0"),
    (["sample", "--eta", "-1"], 2, "--eta must be between 0"),
    (["sample", "--memory", "bogus"], 2, "memory plan 'bogus' is not available"),
    (["denoise", "--image", PHOTO, "--levels", "-5"], 2, "each from 0 to 999"),
    (["denoise", "--image", PHOTO, "--levels", "2000"], 2, "each from 0 to 999"),
    (["denoise", "--image", PHOTO, "--every", "0"], 2, "--every must be at least 1"),
    (["denoise", "--image", PHOTO, "--every", "-1"], 2, "--every must be at least 1"),
    (["anagram", "--prompt", "bag", "--prompt", "sneaker", "--view-seed", "-1"], 2, "--view-seed must be >= 0"),
    (["sample", "--batch-size", "0"], 2, "--batch-size must be at least 1"),
    (["hybrid", "--kind", "graycolor", "--gray", "bag", "--color", "sneaker"], 2, "needs a color model"),
    (["sample", "--prompt", "bag", "--prompt", "sneaker"], 2, "--prompt was given twice"),
    ([*HYBRID, "--mid", "dress"], 2, "--mid is not a part of a lowhigh hybrid"),
    (["sample", "--device", "bogus"], 2, "unknown --device 'bogus'"),
    (["sample", "--device", "cuda:7"], 2, "--device cuda:7: this machine has"),
    (["inpaint", "--image", PHOTO, "--mask", "/nonexistent/mask.png"], 1, "mask not found: /nonexistent/mask.png"),
    (["sample", "--prompt", "x" * 10000], 2, "... (10000 characters)"),
    (["sample", "--prompt", "bag", "--confidence", "-0.5"], 2, "from 0 to below 1"),
    (["edit", "--image", PHOTO, "--start", "40"], 2, "--start 40 is out of range: use 0 to"),
]


@pytest.mark.parametrize("argv,code,says", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_value_is_one_line(argv, code, says, tmp_path, capsys):
    out = tmp_path / "out"
    assert _exit_code([*argv, "--out", str(out)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "internal error" not in err[0]
    assert not out.exists() or not any(out.iterdir())


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


def test_a_training_state_as_model_says_which_file_to_use(tmp_path, capsys):
    state = tmp_path / "state.safetensors"
    save_file({"raw.w": torch.zeros(1)}, str(state), metadata={"format": "mirage-small-unet", "config": "{}",
                                                                "optim": "{}"})
    assert main(["sample", "--model", str(state), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a training state" in err[0] and "model.safetensors" in err[0]


def test_out_dot_in_a_non_empty_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--out", ".", "--steps", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_an_unwritable_out_fails_before_any_model_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for where in ("/proc/mirage-x", str(afile / "sub")):
        assert main(["sample", "--out", where]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"mirage sample: error: cannot write to {where}:")


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_a_pickle_model_is_refused_without_unpickling(suffix, tmp_path, capsys):
    weights = tmp_path / f"model{suffix}"
    weights.write_bytes(b"not to be unpickled")
    assert main(["sample", "--model", str(weights), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors only and never unpickles" in err[0]
