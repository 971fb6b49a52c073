"""Where IF's UNet time goes, what torch.compile changes, and T5 in 8 bits: the measurements behind the
choices in deepfloyd.py (CUDA graphs, layouts, compile mode) and memory.py (the 8bit plan).

    python bench/if_profile.py [--root DIR] [--modes default max-autotune-no-cudagraphs] [--budget 420]
    python bench/if_profile.py --tiny      # the same steps on tiny models, on the CPU (a test of this script)

For stage I at batch 4, 16 and 32 and stage II at batch 4 it prints: the call as mirage makes it (CUDA graphs,
eager kernels) with its TFLOP/s, the share of GPU time by kernel family (convolutions, matrix products,
attention, normalization, the rest) from torch.profiler, and the same call with the UNet compiled in each
mode (with the compile time), while `--budget` seconds last. Then T5 loaded in int8 by bitsandbytes: load
time, encode time, GPU memory, and how close its embeddings are to fp16's.
"""
from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
import if_arch  # noqa: E402
from if_gpu import PROMPTS, Bench, count_flops, direct_call, rate_text, unet_inputs  # noqa: E402

from mirage.backends import hub, memory  # noqa: E402
from mirage.backends.deepfloyd import load_stage  # noqa: E402
from mirage.backends.runtime import _Graphs  # noqa: E402
from mirage.backends.prompts import _embed, preprocess  # noqa: E402

FAMILIES = (("attention", ("fmha", "flash", "attention", "softmax")), ("normalization", ("norm",)),
            ("convolution", ("conv", "implicit", "cudnn", "xmma", "sm90_xmma", "nchw", "nhwc")),
            ("matrix product", ("gemm", "cutlass", "nvjet", "sm90", "cublas")))


def family(kernel: str) -> str:
    name = kernel.lower()
    return next((f for f, keys in FAMILIES if any(k in name for k in keys)), "other")


def kernel_shares(fn) -> dict[str, float]:
    """Share of GPU kernel time per family for one eager call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = collections.Counter()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            times[family(e.key)] += e.device_time_total
    total = sum(times.values()) or 1.0
    return {f: t / total for f, t in sorted(times.items(), key=lambda kv: -kv[1])}


def calls(b: Bench, stages: dict, embeds, modes: list[str], budget: float, start: float) -> None:
    shapes = [("I", n) for n in ((2, 4) if b.tiny else (4, 16, 32))] + [("II", 2 if b.tiny else 4)]
    inputs, flops = {}, {}
    for name, batch in shapes:  # first the calls as they are, then compiled ones while the budget lasts
        stage = stages[name]
        x, cond = inputs[name, batch] = unet_inputs(stage, batch, embeds)
        flops[name, batch] = count_flops(direct_call(stage.unet(), x, cond, stage.dtype, stage.device))
        with torch.no_grad():
            seconds = b.latency(lambda: stage(x, 500, cond))
        print(f"stage {name:<2} batch {batch:>2} mirage: {rate_text(seconds, flops[name, batch])}", flush=True)
        if not b.tiny:
            shares = kernel_shares(direct_call(stage.unet(), x, cond, stage.dtype, stage.device))
            print("    GPU time: " + ", ".join(f"{f} {100 * s:.0f} %" for f, s in shares.items()), flush=True)
    for mode in [] if b.tiny else modes:  # compiling takes minutes on a CPU
        for name, batch in shapes:
            if time.perf_counter() - start > budget:
                print(f"stage {name:<2} batch {batch:>2} compiled ({mode}): skipped (past the {budget:.0f} s "
                      f"budget)", flush=True)
                continue
            stage, (x, cond) = stages[name], inputs[name, batch]
            saved = stage._graphs
            stage._graphs = _Graphs(torch.compile(stage.unet(), mode=mode, dynamic=False))  # the whole model
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    stage(x, 500, cond)
                    b.sync()
                    warm = time.perf_counter() - t0
                    seconds = b.latency(lambda: stage(x, 500, cond))
                print(f"stage {name:<2} batch {batch:>2} compiled ({mode}): {rate_text(seconds, flops[name, batch])}  "
                      f"(compile + capture {warm:.0f} s)", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on with the other measurements
                print(f"stage {name:<2} batch {batch:>2} compiled ({mode}): FAILED {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
            finally:
                stage._graphs = saved


def t5_int8(b: Bench, folder: Path) -> None:
    """T5 in int8 against fp16: load and encode times, GPU memory, cosine similarity of the embeddings."""
    texts = [preprocess(p) for p in PROMPTS]
    out = {}
    for plan in ("gpu", "8bit"):
        if b.tiny and plan == "8bit":
            print("T5 8bit: needs CUDA and bitsandbytes (skipped on the CPU)")
            break
        hub.release(b.device)
        if not b.tiny:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tokenizer, model = hub.load_text_encoder(folder, b.device, torch.float16 if not b.tiny else torch.float32,
                                                 memory.Plan(plan))
        b.sync()
        load = time.perf_counter() - t0
        seconds, out[plan] = b.wall(functools.partial(_embed, tokenizer, model, texts))
        peak = torch.cuda.max_memory_allocated() / memory.GiB if not b.tiny else 0.0
        del tokenizer, model
        print(f"T5 {plan:<4}: load {load:5.2f} s, encode {len(texts)} prompts {seconds:5.2f} s, "
              f"peak GPU {peak:5.2f} GiB", flush=True)
    if len(out) == 2:
        a, q = out["gpu"].float().flatten(1), out["8bit"].float().flatten(1)
        cos = torch.nn.functional.cosine_similarity(a, q).min().item()
        print(f"T5 8bit vs fp16 embeddings: cosine similarity >= {cos:.4f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--root", type=Path, default=Path("/tmp/mirage-if-bench"))
    p.add_argument("--modes", nargs="*", default=["default", "max-autotune-no-cudagraphs"])
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which compiles are skipped")
    args = p.parse_args(argv)
    start = time.perf_counter()
    b = Bench(args)
    s1, s2 = if_arch.build(args.root, b.arch, b.device)
    one = load_stage(str(s1), b.device, memory="gpu")
    two = load_stage(str(s2), b.device, memory="gpu", text_encoder_from=str(s1))
    embeds = one.encode(PROMPTS + [""]).embeds
    calls(b, {"I": one, "II": two}, embeds, args.modes, args.budget, start)
    one.free()
    two.free()
    t5_int8(b, Path(s1))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
