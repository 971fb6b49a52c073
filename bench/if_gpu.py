"""GPU benchmark of mirage's DeepFloyd IF path, on random weights at the published sizes (if_arch.py).

    python bench/if_gpu.py [--root DIR] [--json FILE] [--eager]  # CUDA: builds IF-I-XL, IF-II-L, T5-XXL in DIR
    python bench/if_gpu.py --tiny                       # the same steps on tiny models, on the CPU, in seconds

Prints, in one run: the time to build and to load each model; stage-I UNet latency and achieved TFLOP/s
(FLOPs from torch.utils.flop_counter) at batch 4 and 32 and stage II at batch 4, eager as diffusers runs
them and as mirage calls them (torch.compile'd, unless --eager, and replayed from CUDA graphs; the first call's
compile time is printed apart); a 2-view 64 -> 256 anagram, 30 + 30
steps, guidance 10, by mirage and by the plain reference loop (if_reference.py) side by side; eight
stage-I anagram candidates plus one through stage II (and the same for plain samples); and the whole
pipeline, T5 encoding included, in fresh processes (not compiled) with no cap, a 16 GiB and an 8 GiB cap
(torch.cuda.set_per_process_memory_fraction): wall time, plans taken, peak GPU memory (the allocator's;
the CUDA context is not counted) and peak host RSS. The last lines compare with the targets.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]
import if_arch  # noqa: E402
import if_reference  # noqa: E402

from mirage.backends.deepfloyd import COMPILE_MODE, load_stage  # noqa: E402
from mirage.backends.memory import GiB  # noqa: E402
from mirage.engine import tasks  # noqa: E402
from mirage.engine.denoiser import Cond  # noqa: E402
from mirage.illusions.views import make_view  # noqa: E402

PROMPTS = ["an oil painting of people around a campfire", "an oil painting of an old man"]
GUIDANCE = 10.0
PEAK = 790e12  # dense bf16/fp16 FLOP/s an H100 reaches on large matrix products (KINDS.md: 798 measured)
CAPS = (None, 16, 8)  # GiB


class Bench:
    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.arch = if_arch.TINY if args.tiny else if_arch.PUBLISHED
        self.steps = 2 if args.tiny else 30
        self.reps = 1 if args.tiny else 10
        self.batches = (2, 4) if args.tiny else (4, 32)
        self.candidates = 2 if args.tiny else 8
        self.results: dict = {}

    def note(self, key: str, value, text: str) -> None:
        self.results[key] = value
        print(text, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wall(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def latency(self, fn) -> float:
        for _ in range(1 if self.tiny else 2):
            fn()
        return statistics.median(self.wall(fn)[0] for _ in range(self.reps))


# ---- the parts -------------------------------------------------------------------------------------------
def unet_inputs(stage, batch: int, embeds: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, stage.channels, stage.size, stage.size, generator=g)
    cond = Cond(embeds=embeds[torch.arange(batch) % len(embeds)])
    if stage.is_upscaler:
        cond = cond.with_image(torch.randn(batch, 3, stage.size, stage.size, generator=g),
                               torch.full((batch,), 250, dtype=torch.long))
    return x.to(stage.device), cond.to(stage.device)


def direct_call(stage, x, cond, channels_last: bool):
    """The UNet module called as plain diffusers code would, without mirage's graphs."""
    inp = x if cond.image is None else torch.cat([x, cond.image], dim=1)
    inp = inp.to(stage.device, stage.dtype)
    if channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    level = cond.level
    embeds = cond.embeds.to(stage.dtype)
    t = torch.tensor(500, device=stage.device)
    return lambda: stage.unet()(inp, t, encoder_hidden_states=embeds, class_labels=level, return_dict=False)[0]


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def measure_unets(b: Bench, stages: dict, embeds, how: str) -> None:
    """Latency and FLOP/s of each stage's UNet call at its batch sizes: `eager` (the module called directly,
    weights in whatever layout they are now) or `mirage` (the stage's own call: its layout, compiled or not,
    CUDA graphs)."""
    for name, stage in stages.items():
        layout = "NHWC" if stage.unet().conv_in.weight.is_contiguous(memory_format=torch.channels_last) and \
            not stage.unet().conv_in.weight.is_contiguous() else "NCHW"
        for batch in (b.batches if name == "I" else b.batches[:1]):
            x, cond = unet_inputs(stage, batch, embeds)
            eager = direct_call(stage, x, cond, layout == "NHWC")
            fn = (lambda: stage(x, 500, cond)) if how == "mirage" else eager
            flops = count_flops(eager)
            if how == "mirage":  # the first call compiles (with --compile) and captures the graphs
                first, _ = b.wall(fn)
                print(f"  stage {name:<2} batch {batch:>2}  first call (compile and capture): {first:.1f} s",
                      flush=True)
            with torch.no_grad():
                seconds = b.latency(fn)
            b.note(f"unet_{name}_b{batch}_{how}_{layout}", dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                                                                tflop_per_call=flops / 1e12),
                   f"  stage {name:<2} batch {batch:>2}  {how:<22} {layout}: {rate_text(seconds, flops)}  "
                   f"({flops / batch / 1e12:.2f} TFLOP an image)")


def rate_text(seconds: float, flops: int) -> str:
    """'  43.88 ms   262.4 TFLOP/s =  33.2 % of 790': a call's latency and the share of peak it reaches."""
    rate = flops / seconds
    return f"{seconds * 1e3:8.2f} ms  {rate / 1e12:6.1f} TFLOP/s = {100 * rate / PEAK:5.1f} % of 790"


def reference_anagram(b: Bench, one, two, embeds, steps: int):
    views = [make_view("identity"), make_view("flip")]
    conds, null = [embeds[0:1], embeds[1:2]], embeds[2:3]
    unet1, unet2 = one.unet(), two.unet()
    t1, low = b.wall(lambda: if_reference.anagram(unet1, one.schedule.config, views, conds, null, steps,
                                                  GUIDANCE, seed=0))
    t2, high = b.wall(lambda: if_reference.anagram(unet2, two.schedule.config, views, conds, null, steps,
                                                   GUIDANCE, seed=0, low_res=low,
                                                   noising_config=two.noising.config))
    return t1, t2, low.float(), high.float()


def mirage_anagram(b: Bench, one, two, seeds, steps: int, views=None):
    views = views or [make_view("identity"), make_view("flip")]
    t1, low = b.wall(lambda: tasks.anagram(one, PROMPTS, views, seeds, steps=steps, guidance=GUIDANCE))
    t2, high = b.wall(lambda: tasks.anagram(two, PROMPTS, views, seeds[:1], steps=steps, guidance=GUIDANCE,
                                            low_res=low[:1]))
    return t1, t2, low, high


def mirage_samples(b: Bench, one, two, seeds, steps: int):
    t1, low = b.wall(lambda: tasks.sample(one, PROMPTS[0], seeds, steps=steps, guidance=GUIDANCE))
    t2, high = b.wall(lambda: tasks.sample(two, PROMPTS[0], seeds[:1], steps=steps, guidance=GUIDANCE,
                                           low_res=low[:1]))
    return t1, t2


def set_layout(stages: dict, layout) -> None:
    for stage in stages.values():
        stage.unet().to(memory_format=layout)


# ---- the whole pipeline in a fresh process ------------------------------------------------------------------
def pipeline(args) -> int:
    """T5 + stage I + stage II of one 2-view anagram under a memory cap; prints one JSON line."""
    b = Bench(args)
    s1, s2 = if_arch.build(args.root, b.arch, b.device)
    if b.device.type == "cuda":
        torch.zeros(1, device=b.device)  # the CUDA context, outside the time
        if args.cap:
            torch.cuda.set_per_process_memory_fraction(args.cap * GiB / torch.cuda.get_device_properties(0).total_memory)
    with warnings.catch_warnings(record=True) as notes, tempfile.TemporaryDirectory() as cache:
        warnings.simplefilter("always")
        start = time.perf_counter()
        one = load_stage(str(s1), b.device, memory="auto", cache_dir=cache)
        two = load_stage(str(s2), b.device, memory="auto", text_encoder_from=str(s1), cache_dir=cache)
        views = [make_view("identity"), make_view("flip")]
        low = tasks.anagram(one, PROMPTS, views, [0], steps=b.steps, guidance=GUIDANCE)
        plans = dict(t5=one.text.plan.describe(), stage_I=one.plan.describe())
        one.free()
        high = tasks.anagram(two, PROMPTS, views, [0], steps=b.steps, guidance=GUIDANCE, low_res=low)
        b.sync()
        seconds = time.perf_counter() - start
    plans["stage_II"] = two.plan.describe()
    cuda = b.device.type == "cuda"
    print(json.dumps(dict(cap_gib=args.cap, seconds=seconds, plans=plans, finite=bool(torch.isfinite(high).all()),
                          peak_vram_gib=torch.cuda.max_memory_reserved() / GiB if cuda else 0.0,
                          peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB if cuda else 0.0,
                          peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
                          notes=[str(n.message) for n in notes if "memory" in str(n.message)])))
    return 0


def run_capped(b: Bench, root: Path, cap) -> dict:
    cmd = [sys.executable, __file__, "--pipeline", "--root", str(root)] + (["--tiny"] if b.tiny else []) + \
          (["--cap", str(cap)] if cap else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return dict(cap_gib=cap, error=(done.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


# ---- the run ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a test of this script)")
    p.add_argument("--root", type=Path, help="where the random-weight models are built (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--eager", action="store_true", help="mirage's UNet calls without torch.compile")
    p.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.root = args.root or Path(tempfile.mkdtemp(prefix="mirage-if-bench-"))
    if args.pipeline:
        return pipeline(args)
    b = Bench(args)
    compile = not (args.eager or b.tiny)
    print(f"mirage IF benchmark ({b.arch.name} models, {torch.cuda.get_device_name() if not b.tiny else 'CPU'}, "
          f"torch {torch.__version__}, mirage's calls {'compiled: ' + COMPILE_MODE if compile else 'eager'})",
          flush=True)
    seconds, (s1, s2) = b.wall(lambda: if_arch.build(args.root, b.arch, b.device))
    b.note("build_s", seconds, f"built (or found) random fp16 weights in {args.root}: {seconds:.1f} s")

    cache = tempfile.mkdtemp()
    one = load_stage(str(s1), b.device, memory="gpu", cache_dir=cache, compile=compile)
    two = load_stage(str(s2), b.device, memory="gpu", text_encoder_from=str(s1), cache_dir=cache, compile=compile)
    seconds, _ = b.wall(lambda: one.encode(PROMPTS + [""]))
    b.note("t5_s", seconds, f"T5 load + encode 3 prompts + free: {seconds:.2f} s")
    for name, stage in (("I", one), ("II", two)):
        seconds, _ = b.wall(stage.unet)
        b.note(f"load_{name}_s", seconds, f"stage {name} UNet load from safetensors: {seconds:.2f} s")
    embeds = one.encode(PROMPTS + [""]).embeds
    stages = {"I": one, "II": two}
    ref = {}

    def reference():
        set_layout(stages, torch.contiguous_format)
        measure_unets(b, stages, embeds, "eager")
        if_reference.anagram(one.unet(), one.schedule.config, [make_view("identity")], [embeds[:1]], embeds[2:3],
                             2, GUIDANCE, seed=0)  # warm-up
        ref["times"] = reference_anagram(b, one, two, embeds, b.steps)

    def calls():
        for stage in stages.values():  # back to each stage's own layout before its graphs are captured
            stage.unet().to(memory_format=torch.channels_last if stage.channels_last else torch.contiguous_format)
        measure_unets(b, stages, embeds, "mirage")

    def anagram():
        mirage_anagram(b, one, two, [0], b.steps)  # warm-up: CUDA graphs are captured for these shapes
        m1, m2, low, high = mirage_anagram(b, one, two, [0], b.steps)
        r1, r2, _, ref_high = ref.get("times", (float("nan"),) * 2 + (None, None))
        b.note("anagram", dict(mirage=[m1, m2], reference=[r1, r2]),
               f"2-view anagram 64->256, {b.steps}+{b.steps} steps, guidance {GUIDANCE:g}:\n"
               f"  mirage    {m1:6.2f} s + {m2:6.2f} s = {m1 + m2:6.2f} s\n"
               f"  reference {r1:6.2f} s + {r2:6.2f} s = {r1 + r2:6.2f} s   ({(r1 + r2) / (m1 + m2):.2f}x)")
        if ref_high is not None:
            diff = (high.cpu() - ref_high.cpu()).abs().max().item()
            b.note("anagram_max_diff", diff, f"  max |mirage - reference| over the 256-px image: {diff:.2e}"
                   + ("" if b.tiny else " (random fp16 weights amplify rounding: compare with --tiny, fp32)"))

    def candidates():
        seeds = list(range(b.candidates))
        mirage_anagram(b, one, two, seeds, 2)  # warm-up of the batch-32 shapes
        c1, c2, _, _ = mirage_anagram(b, one, two, seeds, b.steps)
        mirage_samples(b, one, two, seeds, 2)
        p1, p2 = mirage_samples(b, one, two, seeds, b.steps)
        b.note("candidates", dict(anagram=[c1, c2], sample=[p1, p2]),
               f"{b.candidates} stage-I candidates + 1 through stage II:\n"
               f"  2-view anagrams {c1:6.2f} s + {c2:6.2f} s = {c1 + c2:6.2f} s\n"
               f"  plain samples   {p1:6.2f} s + {p2:6.2f} s = {p1 + p2:6.2f} s")

    print("UNet calls (median of a few):", flush=True)
    for part in (reference, calls, anagram, candidates):
        section(part)
    one.free()  # the capped runs below are fresh processes; this one gives the GPU back first
    two.free()

    print("whole pipeline (T5 + stage I + stage II, one 2-view anagram) in fresh processes:", flush=True)
    runs = []
    for cap in (CAPS if not b.tiny else (None,)):
        run = run_capped(b, args.root, cap)
        runs.append(run)
        label = f"{cap} GiB cap" if cap else "no cap"
        if "error" in run:
            print(f"  {label:<10}: failed: {run['error']}", flush=True)
            continue
        print(f"  {label:<10}: {run['seconds']:6.2f} s  peak GPU {run['peak_vram_gib']:5.2f} GiB "
              f"(allocated {run['peak_allocated_gib']:5.2f})  peak RSS {run['peak_rss_gib']:5.2f} GiB  "
              f"plans {run['plans']}" + (f"  notes {run['notes']}" if run["notes"] else ""), flush=True)
    b.results["pipeline"] = runs
    section(lambda: targets(b, runs))
    if args.json:
        args.json.write_text(json.dumps(b.results, indent=1))
    return 0


def section(fn) -> None:
    """Run one part of the benchmark; a failure is printed and the other parts still run."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one broken measurement must not lose the others
        import traceback

        print(f"  FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", flush=True)
        traceback.print_exc(limit=-3)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def targets(b: Bench, runs: list[dict]) -> None:
    r = b.results
    big = r.get(f"unet_I_b{b.batches[-1]}_mirage_NHWC", {}).get("tflops", 0) * 1e12
    anagram = sum(r.get("anagram", {}).get("mirage", [float("nan")]))
    candidates = {kind: sum(r.get("candidates", {}).get(kind, [float("nan")])) for kind in ("anagram", "sample")}
    ok = {run.get("cap_gib"): run for run in runs if "error" not in run}
    capped = ok.get(8, {}).get("seconds")
    ratio = capped / ok[None]["seconds"] if capped and None in ok else None
    lines = [("2-view anagram <= 1.5 s", f"{anagram:.2f} s", anagram <= 1.5),
             (f"stage I at batch {b.batches[-1]} >= 50 % of peak", f"{100 * big / PEAK:.1f} %", big >= 0.5 * PEAK),
             *((f"8 {kind} candidates + 1 <= 4.4 s", f"{c:.2f} s", c <= 4.4) for kind, c in candidates.items()),
             ("8 GiB cap <= 1.5x uncapped", "n/a" if ratio is None else f"{ratio:.2f}x",
              ratio is not None and ratio <= 1.5),
             ("host RSS <= 13 GiB (8 GiB cap)", "n/a" if capped is None else f"{ok[8]['peak_rss_gib']:.2f} GiB",
              capped is not None and ok[8]["peak_rss_gib"] <= 13)]
    print("targets" + (" (tiny models: figures meaningless)" if b.tiny else "") + ":")
    for what, got, met in lines:
        print(f"  {what:<38} {got:>10}  {'met' if met else 'NOT met'}")
    r["targets"] = {what: dict(got=got, met=met) for what, got, met in lines}


if __name__ == "__main__":
    sys.exit(main())
