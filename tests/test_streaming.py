"""Long runs stream and nothing made is lost: chunk by chunk, result.json valid after Ctrl-C, a full disk or
a kill, run folders claimed so that two runs never share one."""
import errno
import json
import subprocess
import sys

from mirage.app import pipeline, rundir
from mirage.app.args import parse_seeds
from mirage.app.main import main
from mirage.app.rundir import CLAIM, JOURNAL, RunDir
from mirage.app.settings import CHUNK

FAST = ["--steps", "2", "--quiet"]


def _result(folder):
    return json.loads((folder / "result.json").read_text())


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_seeds_are_ranges_never_listed():
    seeds = parse_seeds("0-100000000,200000005")
    assert len(seeds) == 100000002 and seeds[0] == 0 and seeds[-1] == 200000005 and seeds[100000000] == 100000000
    assert len(seeds.ranges) == 2  # nothing is listed: the ranges are all it holds
    assert list(parse_seeds("3-5,9")) == [3, 4, 5, 9]


def test_a_long_run_is_written_chunk_by_chunk(tmp_path, monkeypatch):
    written = []
    real = pipeline._write
    monkeypatch.setattr(pipeline, "_write", lambda out, job, record, images, *a: (
        written.append(len(images)), real(out, job, record, images, *a))[1])
    out = tmp_path / "o"
    assert main(["sample", "--prompt", "bag", "--n", str(CHUNK + 6), "--tries", "1", *FAST, "--out", str(out)]) == 0
    assert written == [CHUNK, 6]
    doc = _result(out)
    assert [e["seed"] for e in doc["images"]] == list(range(CHUNK + 6)) and "complete" not in doc
    assert _hidden(out) == []  # no journal, claim or temporary file is left


def test_ctrl_c_keeps_what_was_made_listed(tmp_path, monkeypatch, capsys):
    calls = []
    real = pipeline._write

    def write_then_stop(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a)

    monkeypatch.setattr(pipeline, "_write", write_then_stop)
    out = tmp_path / "o"
    assert main(["sample", "--prompt", "bag", "--n", str(2 * CHUNK), "--tries", "1", *FAST, "--out", str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    doc = _result(out)
    assert doc["complete"] is False and doc["stopped"] == "interrupted"
    assert [e["seed"] for e in doc["images"]] == list(range(CHUNK))
    assert all((out / e["file"]).is_file() for e in doc["images"]) and _hidden(out) == []


def test_a_full_disk_keeps_the_complete_images_and_says_so(tmp_path, monkeypatch, capsys):
    saved = []
    real = rundir.save_png

    def fill_up(path, image, settings=None):
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real(path, image, settings)

    monkeypatch.setattr(rundir, "save_png", fill_up)
    out = tmp_path / "o"
    assert main(["sample", "--prompt", "bag", "--n", "6", "--tries", "1", *FAST, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no space left on {out}" in err[0] and "internal error" not in err[0]
    doc = _result(out)
    assert doc["complete"] is False and [e["seed"] for e in doc["images"]] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in saved)


def test_a_failure_before_any_image_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "deep"
    assert main(["edit", "--image", "/nonexistent.png", *FAST, "--out", str(out)]) == 1
    assert not (tmp_path / "new").exists()


def test_a_killed_run_is_recovered_by_the_next_one(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / "o"
    old.mkdir()
    (old / CLAIM).write_text(f"{dead.pid}\n")
    (old / JOURNAL.format(rank=0)).write_text(json.dumps({"seed": 4, "file": "sample-seed4.png"}) + "\n")
    (old / ".tmp-sample-seed5.abc.png").write_bytes(b"half")
    run = RunDir(old, "sample")
    assert run.path == tmp_path / "o-2"
    doc = _result(old)
    assert doc["complete"] is False and "was killed" in doc["stopped"] and doc["images"][0]["seed"] == 4
    assert _hidden(old) == []


def test_a_folder_claimed_by_a_live_run_is_not_shared(tmp_path):
    first = RunDir(tmp_path / "o", "sample")
    second = RunDir(tmp_path / "o", "sample")
    assert first.path != second.path and (first.path / CLAIM).is_file()


def test_two_runs_started_together_on_one_out_take_two_folders(tmp_path):
    out = tmp_path / "cc"
    runs = [subprocess.Popen([sys.executable, "-m", "mirage", "sample", "--prompt", p, "--n", "4", "--seed", str(s),
                              "--tries", "1", *FAST, "--out", str(out)], stderr=subprocess.PIPE, text=True)
            for p, s in (("bag", 0), ("sneaker", 100))]
    assert [r.wait(timeout=300) for r in runs] == [0, 0], [r.stderr.read() for r in runs]
    folders = sorted(tmp_path.iterdir())
    assert [f.name for f in folders] == ["cc", "cc-2"]
    for folder in folders:
        doc = _result(folder)
        files = sorted(p.name for p in folder.glob("*.png") if p.name != "sheet.png")
        assert sorted(e["file"] for e in doc["images"]) == files and len(files) == 4
        assert len({e["prompt"] for e in doc["images"]}) == 1
