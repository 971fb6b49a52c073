"""`mirage again` makes a recorded result again, bit for bit, for every command on the built-in model."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mirage.app.main import main

PHOTO = str(Path(__file__).parents[1] / "src/mirage/assets/fashion_test.png")
COMMANDS = {
    "sample": ["sample", "--prompt", "bag", "--steps", "3", "--tries", "2"],
    "edit": ["edit", "--image", PHOTO, "--prompt", "bag", "--start", "20,30"],
    "inpaint": ["inpaint", "--image", PHOTO, "--box", "4,4,20,20", "--prompt", "bag", "--steps", "3"],
    "anagram": ["anagram", "--prompt", "bag", "--prompt", "sneaker", "--steps", "3", "--tries", "2"],
    "hybrid": ["hybrid", "--low", "bag", "--high", "sneaker", "--steps", "3", "--tries", "1"],
    "denoise": ["denoise", "--image", PHOTO, "--i-start", "30", "--every", "2"],
}


def pixels(run: Path) -> dict[str, np.ndarray]:
    doc = json.loads((run / "result.json").read_text())
    return {e["file"]: np.asarray(Image.open(run / e["file"])) for e in doc["images"]}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_again_from_result_json_remakes_every_image(name, tmp_path):
    first = tmp_path / "first"
    assert main([*COMMANDS[name], "--seeds", "4,9", "--quiet", "--out", str(first)]) == 0
    assert main(["again", str(first / "result.json"), "--out", str(tmp_path / "again")]) == 0
    a, b = pixels(first), pixels(tmp_path / "again")
    assert a.keys() == b.keys() and len(a) >= 1
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["sample", "anagram", "edit"])
def test_again_from_one_png_remakes_that_image(name, tmp_path):
    first = tmp_path / "first"
    assert main([*COMMANDS[name], "--seeds", "7", "--quiet", "--out", str(first)]) == 0
    doc = json.loads((first / "result.json").read_text())
    png = first / doc["images"][-1]["file"]
    assert main(["again", str(png), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())["images"]
    assert len(again) == 1
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "again" / again[0]["file"])))


def test_records_say_what_ran(tmp_path):
    assert main([*COMMANDS["edit"], "--seeds", "1", "--quiet", "--out", str(tmp_path / "e")]) == 0
    entry = json.loads((tmp_path / "e" / "result.json").read_text())["images"][0]
    stage = entry["stages"][0]
    assert stage["timesteps"][0] == 990 and stage["steps"] == len(stage["timesteps"])  # the strided list ran
    assert entry["mirage"] and entry["argv"][0] == "edit"


def test_again_of_something_mirage_did_not_write_is_one_line(tmp_path, capsys):
    assert main(["again", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
