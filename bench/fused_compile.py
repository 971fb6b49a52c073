"""What the fused compile scope costs a fresh process, on a CPU: IF's two UNets (if_arch.NARROW: the published
structure at narrow widths) compiled on an empty and then on a warm inductor cache, against an eager process.

    python bench/fused_compile.py [--root DIR]

Compiling is CPU work (dynamo's tracing, inductor's code generation, the compilers), and what dynamo traces
depends on the UNets' structure, not their widths: the graph count, the backend compiles (more than graphs
when a trace restarts) and dynamo's timers here are what a GPU's fresh process pays, up to the compiler.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import if_arch
from if_gpu import _compile_phases, _unique_graphs, unet_inputs
from mirage.backends.deepfloyd import load_stage
from mirage.backends.runtime import compile_regions

BATCHES = (4, 16)  # an anagram's CFG batch, then candidates'


def _calls(stage):
    embeds = torch.randn(2, 77, if_arch.NARROW.stage_1["encoder_hid_dim"], generator=torch.Generator().manual_seed(0))
    for n in BATCHES:
        x, cond = unet_inputs(stage, n, embeds)
        yield x.contiguous(memory_format=torch.channels_last), 500, cond


def child(root: Path, eager: bool) -> None:
    """The first calls of both stages, in NHWC as on a GPU under the fused scope (runtime.py lays them out so);
    prints one JSON line."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(2)
    s1, s2 = if_arch.build(root, if_arch.NARROW, torch.device("cpu"), torch.float32)
    one = load_stage(str(s1), device="cpu", dtype=torch.float32)
    two = load_stage(str(s2), device="cpu", dtype=torch.float32, text_encoder_from=str(s1))
    for stage in (one, two):
        stage.unet().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for stage in (one, two):
            if not eager:
                compile_regions(stage.unet(), backend="inductor", scope="fused")
            for call in _calls(stage):
                stage(*call)
    print(json.dumps(dict(seconds=time.perf_counter() - start, graphs=_unique_graphs(),
                          backend_compiles=int(counters["aot_autograd"]["total"]), phases=_compile_phases())))


def run(root: Path, cache: Path, eager: bool) -> dict:
    env = dict(os.environ, MIRAGE_CACHE=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # mirage places it, under MIRAGE_CACHE
    cmd = [sys.executable, __file__, "--child", "--root", str(root)] + (["--eager"] if eager else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"the fresh process failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="where the narrow models and the cache go (default: a temp folder)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.root = args.root or Path(tempfile.mkdtemp(prefix="mirage-fused-compile-"))
    if args.child:
        return child(args.root, args.eager)
    print(f"fused scope's first calls in fresh processes (IF's structure, narrow widths, CPU, torch "
          f"{torch.__version__}; both stages at batch {' then '.join(map(str, BATCHES))}):", flush=True)
    if_arch.build(args.root, if_arch.NARROW, torch.device("cpu"), torch.float32)
    cache = args.root / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {label: run(args.root, cache, label == "eager") for label in ("cold cache", "warm cache", "eager")}
    for label, r in runs.items():
        compiling = r["seconds"] - runs["eager"]["seconds"]
        print(f"  {label:<10}: first calls {r['seconds']:6.2f} s, compiling {compiling:6.2f} s; graphs {r['graphs']}, "
              f"backend compiles {r['backend_compiles']}; dynamo's timers (s) {r['phases']}", flush=True)


if __name__ == "__main__":
    main()
