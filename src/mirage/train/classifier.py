"""Training the classifiers and guides of quality.classifier.

`mirage train classifier --data fashion|digits --out RUN_DIR [--noisy]` trains one on a CPU in a few minutes
and writes RUN_DIR/classifier.safetensors; `measure` fills in its test accuracy, the test set's feature
statistics and the reference Fréchet distance (1000 real training images against the test set).

Under torchrun each rank trains a DistributedDataParallel copy on its share of every global batch (the
batch's augmentation and noise are drawn whole on every rank, so the random stream is one process's); the
BatchNorm statistics are each rank's own. Rank 0 alone measures and writes the classifier.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from mirage import parallel
from mirage.backends.classes import CLASS_NAMES, canonical
from mirage.engine.schedule import Schedule
from mirage.errors import UsageError
from mirage.quality.classifier import Classifier, ClassifierConfig, save
from mirage.quality.metrics import (
    class_accuracy,
    feature_stats,
    frechet_from_stats,
    prepare,
)
from mirage.train.data import load_dataset

REFERENCE_COUNT = 1000  # real training images in the reference Fréchet distance (as many as a scored run)
REFERENCE_DRAWS = 5  # disjoint draws of them, averaged
DEFAULT_EPOCHS = {"fashion": 12, "digits": 20}
COSINE = Schedule.cosine().alphas_cumprod
NOISY_CHECKS = (250, 500, 750)  # timesteps a guide's test accuracy is also measured at


# ---- data ---------------------------------------------------------------------------------------
def augment(x: Tensor, generator: torch.Generator, shift: float = 2.0, scale: float = 0.06) -> Tensor:
    """Random shifts (up to `shift` px) and zooms (+-scale) in one batched resampling: generated samples are
    seldom centred exactly like the data set's, and the scorer should not punish that."""
    n, _, h, _ = x.shape
    rand = torch.rand(n, 3, generator=generator) * 2 - 1
    zoom = 1 + scale * rand[:, 0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = rand[:, 1:] * (2 * shift / h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # resample x + 1 so that what comes in from outside the frame is background (-1), not grey (0)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def noised(x0: Tensor, generator: torch.Generator, t: int | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, noise level) at timestep t of the cosine schedule the built-ins are trained with (default: a
    uniform one per image); the guide takes the level itself, so it serves any variance-preserving schedule."""
    steps = torch.randint(0, len(COSINE), (len(x0),), generator=generator) if t is None else torch.full((len(x0),), t)
    alpha_bar = COSINE[steps].view(-1, 1, 1, 1)
    level = (1 - alpha_bar).sqrt()
    return alpha_bar.sqrt() * x0 + level * torch.randn(x0.shape, generator=generator), level.flatten()


# ---- training -----------------------------------------------------------------------------------
def train(model: Classifier, images: Tensor, labels: Tensor, epochs: int, batch_size: int = 128,
          lr: float = 3e-3, seed: int = 0, log=print, ctx: parallel.Context | None = None) -> Classifier:
    """AdamW with a one-cycle learning rate: the fastest route to a good accuracy in a few epochs. A guide
    sees every image at a random noise level. `ctx`: this rank's place under torchrun (none: one process)."""
    ctx = ctx or parallel.Context()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = prepare(images, model.config.size), labels
    steps = epochs * math.ceil(len(x) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net = DistributedDataParallel(model) if ctx.active else model
    model.train()
    for epoch in range(epochs):
        start, total, correct = time.time(), torch.zeros(2, dtype=torch.float64), 0
        for idx in torch.randperm(len(x), generator=generator).split(batch_size):
            batch = augment(x[idx], generator)
            inputs = noised(batch, generator) if model.config.noisy else (batch,)
            if ctx.active:  # the whole batch's draws are made above; this rank keeps its rows
                if len(idx) < ctx.world:
                    continue  # a last batch too small to share (on every rank alike)
                lo, hi = ctx.rank * len(idx) // ctx.world, (ctx.rank + 1) * len(idx) // ctx.world
                inputs, target = tuple(v[lo:hi] for v in inputs), y[idx][lo:hi]
                logits = net(*inputs)
                # DDP averages over ranks, so each rank's sum is weighted by the global batch's size
                loss = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum") * ctx.world / len(idx)
            else:
                target = y[idx]
                logits = net(*inputs)
                loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += torch.tensor([loss.item() * len(idx) / ctx.world, (logits.argmax(1) == target).sum().item()],
                                  dtype=torch.float64)
        total = ctx.total(total)
        correct = int(total[1])
        if ctx.main:
            log(f"epoch {epoch + 1}/{epochs}: loss {total[0] / len(x):.4f}, train accuracy {correct / len(x):.4f}, "
                f"{time.time() - start:.0f} s")
    return model.eval()


# ---- command ------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--data", required=True, choices=("fashion", "digits", "mnist"),
                   help="data set: fashion (Fashion-MNIST) or digits/mnist (MNIST)")
    p.add_argument("--root", default=None, help="folder with the data files (default: the usual places)")
    p.add_argument("--out", required=True, help="run folder; the classifier goes to OUT/classifier.safetensors")
    p.add_argument("--epochs", type=int, default=0, help="passes over the training images (default: 12 for "
                                                          "fashion, 20 for digits, which has 8,337)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--channels", default="32,64,128", help="conv widths, one stage each (default 32,64,128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noisy", action="store_true",
                   help="train a guide for --classifier-guidance: it learns the classes of noised images")


def run(args, ctx: parallel.Context | None = None) -> int:
    ctx = ctx or parallel.Context()
    data = canonical(args.data)
    channels = _parse_channels(args.channels)
    if args.epochs < 0 or args.batch_size < 1 or not args.lr > 0:
        raise UsageError("--epochs must be >= 0 (0: the default), --batch-size >= 1 and --lr > 0")
    parallel.check_batch(args.batch_size, ctx.world)
    target = Path(args.out) / "classifier.safetensors"
    if target.exists():
        raise UsageError(f"{target} exists; mirage never overwrites: give another --out")
    train_x, train_y = load_dataset(data, "train", args.root)
    test_x, test_y = load_dataset(data, "test", args.root)
    epochs = args.epochs or DEFAULT_EPOCHS[data]
    if ctx.main:
        ranks = f", on {ctx.world} ranks" if ctx.active else ""
        print(f"{data}: {len(train_x)} training and {len(test_x)} test images; {epochs} epochs, channels "
              f"{channels}{ranks}")
    torch.manual_seed(args.seed)
    model = Classifier(ClassifierConfig(channels=channels, data=data, class_names=list(CLASS_NAMES[data]),
                                        noisy=args.noisy))
    start = time.time()
    train(model, train_x, train_y, epochs, args.batch_size, args.lr, args.seed, ctx=ctx)
    seconds = time.time() - start
    if not ctx.main:
        return 0  # rank 0 measures and writes the classifier
    model.info = dict(measure(model, train_x, test_x, test_y, args.seed), train_images=len(train_x),
                      test_images=len(test_x), epochs=epochs, seconds=round(seconds, 1), seed=args.seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    save(model, target)
    info = model.info
    noisy = "".join(f", {info[f'test_accuracy_t{t}']:.4f} at t {t}" for t in NOISY_CHECKS if args.noisy)
    print(f"test accuracy {info['test_accuracy']:.4f}{noisy}; reference FD ({info['reference_images']} training "
          f"images vs the test set, mean of {REFERENCE_DRAWS} draws) {info['reference_fd']:.4f} "
          f"(+-{info['reference_fd_std']:.4f}); {seconds:.0f} s of training; wrote {target}")
    return 0


def measure(model: Classifier, train_x: Tensor, test_x: Tensor, test_y: Tensor, seed: int = 0) -> dict:
    """Stores the test set's feature statistics in the model and returns its test accuracy and the reference
    Fréchet distance: 1000 real training images against the test set (what good samples should come near),
    averaged over disjoint draws because one draw of 1000 varies by some 20 %."""
    accuracy = class_accuracy(model, test_x, test_y)
    noisy = {f"test_accuracy_t{t}": round(noisy_accuracy(model, test_x, test_y, t, seed), 5)
             for t in NOISY_CHECKS if model.config.noisy}
    mu, sigma = feature_stats(model, test_x)
    model.test_mu.copy_(mu)
    model.test_sigma.copy_(sigma)
    count = min(REFERENCE_COUNT, len(train_x) // REFERENCE_DRAWS)  # fewer only for toy data sets
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    draws = order[:count * REFERENCE_DRAWS].reshape(REFERENCE_DRAWS, count)
    fds = torch.tensor([frechet_from_stats(*feature_stats(model, train_x[d]), mu, sigma) for d in draws])
    return dict(test_accuracy=round(accuracy, 5), **noisy, reference_fd=round(fds.mean().item(), 5),
                reference_fd_std=round(fds.std().item(), 5), reference_images=count)


@torch.inference_mode()
def noisy_accuracy(model: Classifier, images: Tensor, labels: Tensor, t: int, seed: int = 0) -> float:
    """A guide's accuracy on images noised to timestep t of the cosine schedule."""
    x_t, level = noised(prepare(images, model.config.size), torch.Generator().manual_seed(seed), t)
    logits = torch.cat([model(x, lv) for x, lv in zip(x_t.split(1000), level.split(1000))])
    return (logits.argmax(1) == labels).float().mean().item()


def _parse_channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise UsageError(f"--channels takes positive widths like 32,64,128, got {text!r}")
    return channels
