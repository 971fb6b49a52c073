"""Data-parallel training through torchrun (gloo on the CPU): 2 ranks take the steps of one process at the same
global batch, a run resumes with another number of ranks, and a failed or killed rank ends the job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from ranks import ENV, run_by_hand
from test_train import TINY, make_idx

from mirage import parallel
from mirage.app.main import main
from mirage.train import loop, runs

STEPS = 8  # 64 images, 16 a step, 2 epochs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    make_idx(root)
    return root


def args(data_root: Path, *more) -> list[str]:
    return ["ddpm", "--classes", "--root", str(data_root), "--epochs", "2", "--sample-steps", "1", "--seed", "3",
            "--device", "cpu", *TINY, *more]  # gloo on the CPU, also where there is a GPU


def torchrun(*argv, nproc: int = 2, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mirage", "train", *argv]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, check=False)


def mirage_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("mirage train")]  # not torchrun's "mirage FAILED"


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> Path:
    """The single-process run that every data-parallel one is compared with."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", *args(data_root), "--out", str(out)]) == 0
    return out


def assert_same_training(run: Path, reference: Path) -> None:
    """Same loss curve and same final weights (raw, EMA, Adam's moments), within float tolerance."""
    rows, ref = runs.read_metrics(run), runs.read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]  # nothing logged twice (or by two ranks)
    assert torch.allclose(torch.tensor([r["loss"] for r in rows]), torch.tensor([r["loss"] for r in ref]),
                          rtol=1e-5, atol=1e-6)
    for name in (runs.STATE, runs.MODEL):
        a, b = load_file(str(run / name)), load_file(str(reference / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=2e-5), (name, k)
    assert runs.load_state(run)["step"] == STEPS


def test_two_ranks_take_the_steps_of_one_process(data_root, reference, tmp_path):
    out = tmp_path / "two"
    done = torchrun(*args(data_root), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_training(out, reference)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(reference)
                                                                       for p in reference.rglob("*"))
    assert mirage_lines(done.stderr) == []  # --quiet: rank 0 says nothing, and the others never do


def test_one_process_run_resumed_on_two_ranks(data_root, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def stop(self, epoch):  # as if killed after the first epoch's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Trainer, "epoch_outputs", stop)
    assert main(["train", *args(data_root), "--out", str(out)]) == 130
    assert runs.load_state(out)["step"] == STEPS // 2 and not (out / runs.LOCK).exists()
    done = torchrun("ddpm", "--resume", str(out), "--device", "cpu", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_training(out, reference)


def rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (its child whose environment says RANK=rank)."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def test_sigkill_of_one_rank_ends_the_job_and_one_process_resumes(data_root, reference, tmp_path):
    out = tmp_path / "killed"
    job = torchrun(*args(data_root, "--checkpoint-every", "0"), "--out", str(out), wait=False)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (out / runs.STATE).exists() and job.poll() is None:
        time.sleep(0.01)
    victim = rank_pid(job.pid, 1)
    assert victim is not None and job.poll() is None, "the job should be killed mid-way"
    os.kill(victim, signal.SIGKILL)
    try:
        _, err = job.communicate(timeout=60)  # torchrun ends the other rank and the job
    finally:
        job.kill()
    assert job.returncode != 0
    assert len(mirage_lines(err)) <= 1, err[-2000:]
    state = runs.load_state(out)
    logged = max((r["step"] for r in runs.read_metrics(out)), default=0)
    assert 0 < state["step"] < STEPS and state["step"] >= logged - 1  # at most one checkpoint interval lost
    # 1 process; the lock the killed job left is taken over
    assert main(["train", "ddpm", "--resume", str(out), "--device", "cpu", "--quiet"]) == 0
    assert_same_training(out, reference)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file of the killed write is left


FAILING_RANK = """
import os, sys
from mirage.app.main import main
from mirage.errors import MirageError
from mirage.train import loop

real = loop.Trainer.train_step
def train_step(self, epoch, index):
    if self.step == 3 and os.environ["RANK"] == "1":
        raise MirageError("cannot write /data/x: no space left on device")
    return real(self, epoch, index)
loop.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_failure_on_one_rank_ends_both_with_one_line(data_root, tmp_path):
    """Two ranks started by hand (what torchrun sets up, without its agent ending the survivors)."""
    out = tmp_path / "run"
    codes, errs = run_by_hand(FAILING_RANK, ["train", *args(data_root), "--out", str(out)], timeout=90)
    assert codes == [1, 1], errs
    lines = mirage_lines(errs[0] + errs[1])
    assert lines == ["mirage train: error: rank 1 of 2: cannot write /data/x: no space left on device"], errs
    assert "Traceback" not in errs[0] + errs[1]
    assert not (out / runs.LOCK).exists()


def test_batch_must_split_over_the_ranks(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["train", *args(data_root), "--batch-size", "15", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 15 does not split over 2 ranks" in err[0]
    monkeypatch.setenv("RANK", "1")  # the other ranks find the same and say nothing
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == ""
    assert not (tmp_path / "run").exists()


def test_single_process_context_is_the_identity():
    ctx = parallel.Context()
    x = torch.arange(4.0)
    assert not ctx.active and ctx.main and ctx.shard(16) == slice(0, 16)
    assert ctx.mean(x) is x and ctx.decide(True) and not ctx.decide(False) and ctx.broadcast_object([1]) == [1]
    # a rank's share of the draws is the same rows of the whole batch's draws
    g = torch.Generator()
    whole = loop.ddpm_draws(torch.zeros(8, 1, 4, 4), torch.arange(8), 100, 0.5, g.manual_seed(1))
    half = loop.ddpm_draws(torch.zeros(4, 1, 4, 4), torch.arange(4, 8), 100, 0.5, g.manual_seed(1), part=(1, 2))
    assert all(torch.equal(w[4:], h) for w, h in zip(whole, half))
