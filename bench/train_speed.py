"""Speed of the small UNets: training throughput (images/s, on the GPU if there is one) and inference
latency of one UNet call at batch 4 on 2 CPU threads (what a 2-view anagram step with CFG costs).

    python bench/train_speed.py train --data fashion --root .data/fashion --widths 32,64,128 --batch 512 1024 \
        --variants eager graph compile+graph
    python bench/train_speed.py cpu --widths 32,64,128 24,48,96
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mirage.train.loop import TrainConfig, Trainer, make_model_config


def _widths(text: str) -> list[int]:
    return [int(w) for w in text.split(",")]


def train_speed(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for widths in args.widths:
        for batch in args.batch:
            for variant in args.variants:
                cfg = TrainConfig(kind="ddpm", data=args.data, root=args.root, classes=True, batch_size=batch,
                                  epochs=100, compile="compile" in variant, graph="graph" in variant)
                cfg.model = make_model_config(cfg, widths=_widths(widths))
                trainer = Trainer(cfg, Path("/nonexistent"), device, quiet=True)
                t0 = time.perf_counter()
                for i in range(args.warmup):
                    trainer.train_step(0, i % trainer.steps_per_epoch)
                _sync(device)
                warm = time.perf_counter() - t0
                t0 = time.perf_counter()
                for i in range(args.steps):
                    trainer.train_step(0, i % trainer.steps_per_epoch)
                _sync(device)
                dt = time.perf_counter() - t0
                print(f"train widths={widths} batch={batch} {variant}: {args.steps * batch / dt:,.0f} img/s, "
                      f"{dt / args.steps * 1e3:.2f} ms/step (warm-up {warm:.1f} s) on {device}", flush=True)


def cpu_latency(args) -> None:
    from mirage.backends.small import SmallUNet
    from mirage.backends.unet import UNet
    from mirage.engine.denoiser import Cond

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(kind="ddpm", classes=True)
    models = {}
    for widths in args.widths:
        config = make_model_config(cfg, widths=_widths(widths))
        models[widths] = SmallUNet(UNet(config), config)
    x = torch.randn(args.batch_size, 1, 28, 28)
    cond = Cond(embeds=torch.arange(args.batch_size) % 10)
    times = {w: [] for w in models}
    for r in range(args.repeats + 5):  # interleaved, so a busy machine slows all variants alike
        for w, m in models.items():
            t0 = time.perf_counter()
            m(x, 500, cond)
            if r >= 5:
                times[w].append(time.perf_counter() - t0)
    for w, ts in times.items():
        n = sum(p.numel() for p in models[w].net.parameters())
        print(f"cpu widths={w} ({n / 1e6:.2f}M params) batch={args.batch_size} threads={args.threads}: "
              f"median {statistics.median(ts) * 1e3:.1f} ms, min {min(ts) * 1e3:.1f} ms", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", default="fashion")
    t.add_argument("--root")
    t.add_argument("--widths", nargs="+", default=["32,64,128"])
    t.add_argument("--batch", nargs="+", type=int, default=[512])
    t.add_argument("--steps", type=int, default=100)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--variants", nargs="+", default=["eager", "graph"],
                   choices=("eager", "graph", "compile", "compile+graph"),
                   help="plain steps, steps replayed from a CUDA graph, torch.compile, or both")
    c = sub.add_parser("cpu")
    c.add_argument("--widths", nargs="+", default=["32,64,128"])
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--repeats", type=int, default=40)
    args = p.parse_args()
    (train_speed if args.what == "train" else cpu_latency)(args)


if __name__ == "__main__":
    main()
