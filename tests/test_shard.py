"""Sharded generation under torchrun: 2 gloo ranks make the same images, byte for byte, and the same
result.json as one process; a failing rank ends both with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from ranks import ENV, run_by_hand
from PIL import Image

from mirage.app.main import main
from mirage.io import read_settings



def torchrun(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mirage", *argv], env=ENV, capture_output=True, text=True, timeout=240)


def _images(folder: Path) -> dict[str, tuple]:
    """Each image's pixels and settings (its --out aside), each animation's bytes."""
    def seen(p: Path):
        if p.suffix == ".gif":
            return p.read_bytes()
        settings = json.loads(json.dumps(read_settings(p)).replace(str(folder), "OUT"))
        return np.asarray(Image.open(p)).tobytes(), settings
    return {p.name: seen(p) for p in folder.iterdir() if p.suffix in (".png", ".gif") and p.name != "sheet.png"}


def _doc(folder: Path) -> dict:
    text = (folder / "result.json").read_text().replace(str(folder), "OUT")
    return json.loads(text)


def _same_run(argv: list[str], tmp_path: Path) -> tuple[dict, dict]:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*argv, "--out", str(one), "--quiet"]) == 0
    ran = torchrun(*argv, "--out", str(two), "--quiet")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert _images(one) == _images(two)  # every image's pixels and settings, every animation byte for byte
    a, b = _doc(one), _doc(two)
    assert a == b
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no journal left
    return a, b


def test_two_ranks_make_the_anagrams_of_one_process(tmp_path):
    doc, _ = _same_run(["anagram", "--prompt", "bag", "--prompt", "sneaker", "--seeds", "0-5", "--steps", "3",
                        "--tries", "2", "--device", "cpu"], tmp_path)
    assert [e["seed"] for e in doc["images"]] == [0, 1, 2, 3, 4, 5]


def test_ranking_spans_the_ranks(tmp_path):
    doc, _ = _same_run(["sample", "--prompt", "bag", "--seeds", "0-4", "--steps", "3", "--pick", "best", "--device",
                        "cpu"], tmp_path)
    assert [e["rank"] for e in doc["images"]] == [1, 2, 3, 4, 5]


FAILING_RANK = """
import os, sys
from mirage.app import pipeline
from mirage.app.main import main

real = pipeline._write
def write(out, *a):
    if os.environ["RANK"] == "1":
        raise OSError(28, "No space left on device")
    return real(out, *a)
pipeline._write = write
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_both_with_one_line(tmp_path):
    out = tmp_path / "o"
    argv = ["sample", "--prompt", "bag", "--seeds", "0-3", "--steps", "2", "--tries", "1", "--device", "cpu", "--quiet",
            "--out", str(out)]
    codes, errs = run_by_hand(FAILING_RANK, argv)
    assert all(code != 0 for code in codes), errs
    lines = [line for err in errs for line in err.splitlines() if line.startswith("mirage")]
    assert len(lines) == 1 and "rank 1 of 2" in lines[0] and "no space left" in lines[0].lower(), errs
    assert "Traceback" not in errs[0] + errs[1]
    doc = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {"complete": False}
    assert doc.get("complete") is False  # never a result.json that says the run is whole


def test_a_rank_with_no_share_still_joins_the_ranking(tmp_path):
    _same_run(["sample", "--prompt", "bag", "--seeds", "7", "--steps", "2", "--pick", "best", "--device", "cpu"],
              tmp_path)
