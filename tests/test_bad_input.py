"""The bad-input sweep: each case is one line on stderr with the right exit code, and nothing is written."""
from pathlib import Path

import pytest

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
]


@pytest.mark.parametrize("argv,code,says", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_value_is_one_line(argv, code, says, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "internal error" not in err[0]
    assert not out.exists() or not any(out.iterdir())


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
