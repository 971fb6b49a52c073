"""CPU speed of a 2-view anagram on a built-in model (issue 4's target: <= 1 s of generation, <= 3 s for the
whole `mirage anagram` process on 2 cores), beside the plain course loop (300 steps, one UNet call per view
and per guidance branch).

    python bench/cpu_anagram.py [--model fashion] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mirage.backends.load import load_model
from mirage.engine import tasks
from mirage.engine.combine import cfg
from mirage.engine.guide import for_task
from mirage.engine.sample import Sampling
from mirage.engine.schedule import ddpm_step
from mirage.illusions.views import make_view
from mirage.quality.classifier import guide_for

PROMPTS = ["t-shirt", "trouser"]


def engine(model, steps: int, guidance: float, guide=None) -> float:
    views = [make_view("identity"), make_view("flip")]
    t0 = time.perf_counter()
    tasks.anagram(model, PROMPTS, views, [0], Sampling.spaced(model.schedule, steps, guidance=guidance, guide=guide))
    return time.perf_counter() - t0


@torch.inference_mode()
def course_loop(model, guidance: float) -> float:
    """Every timestep, each view and each branch a separate call, as the course's reference code does."""
    flip = make_view("flip")
    conds = [model.encode([p]) for p in PROMPTS]
    null = model.encode([""])
    s = model.schedule
    x = torch.randn(1, model.channels, model.size, model.size)
    ts = list(range(s.num_train_timesteps - 1, -1, -1))
    t0 = time.perf_counter()
    for i, t in enumerate(ts):
        estimates = []
        for view, cond in zip((None, flip), conds):
            xv = x if view is None else view.view(x)
            e = cfg(model(xv, t, cond)[0], model(xv, t, null)[0], guidance)
            estimates.append(e if view is None else view.inverse(e))
        eps = torch.stack(estimates).mean(0)
        x = ddpm_step(s, x, eps, None, t, ts[i + 1] if i + 1 < len(ts) else -1, torch.randn_like(x))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fashion")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-course", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = load_model(args.model, torch.device("cpu"))
    for guide in (None, for_task(guide_for(model), "anagram")):
        engine(model, args.steps, args.guidance, guide)  # warm-up
        times = [engine(model, args.steps, args.guidance, guide) for _ in range(args.repeats)]
        how = "" if guide is None else f", classifier guidance {guide.scale:g}"
        print(f"mirage engine, 2-view anagram, {args.steps} steps, batch 4 per step{how}: "
              f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mirage", "anagram", "--model", args.model, "--prompt", PROMPTS[0],
               "--prompt", PROMPTS[1], "--steps", str(args.steps), "--quiet"]
        for extra, how in ((["--tries", "1"], "one try"), ([], "its default tries, until the classifier is sure")):
            walls = []
            for k in range(3):
                out = f"{tmp}/{len(extra)}-{k}"
                t0 = time.perf_counter()
                subprocess.run([*cmd, *extra, "--out", out], check=True, stderr=subprocess.DEVNULL)
                walls.append(time.perf_counter() - t0)
            kept = json.loads(Path(out, "result.json").read_text())["images"][0]
            print(f"whole `mirage anagram` process, {how} (start-up, load, generate, check, PNGs, sheet, GIF, MP4): "
                  f"median {statistics.median(walls):.2f} s; kept try {kept.get('try', 0) + 1}, "
                  f"read right: {kept.get('right', '-')}")
    if not args.skip_course:
        print(f"course loop ({model.schedule.num_train_timesteps} steps, 4 separate calls each): "
              f"{course_loop(model, args.guidance):.2f} s")


if __name__ == "__main__":
    main()
