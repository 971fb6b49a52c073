"""GPU benchmark of mirage's DeepFloyd IF path against what people run instead: visual_anagrams' own samplers
(`sample_stage_1`, `sample_stage_2`, its views) and diffusers' IFPipeline / IFSuperResolutionPipeline, all in
one process, on the same random weights at the published sizes (if_arch.py: IF-I-XL, IF-II-L, T5-XXL).

    python bench/if_gpu.py [--root DIR] [--json FILE] [--anchor DIR]   # CUDA
    python bench/if_gpu.py --tiny                                      # tiny models on the CPU, in seconds

visual_anagrams is imported from --anchor (default: .anchor/ in the repo, git-ignored), a checkout that the
benchmark's runner fetches (github dangeng/visual_anagrams); none of its code is copied here. mirage is driven
through its Denoiser objects (`model(x, t, cond)`, the views and `ddpm_step`), as its sampling loop calls them.

Prints, in one run: the time to build the models; the first illusion of fresh processes, on an empty and then
on a warm compile cache (this process then runs on that cache); the time to load each model; each UNet's call latency and TFLOP/s at batch 4
(stage I also at batch 32 and 2), as diffusers runs it (the module called directly), as mirage runs it with
compiling turned off (CUDA graphs) and as mirage runs it by default (compiled blocks + CUDA graphs); a 2-view
64 -> 256 anagram at 30 + 30 steps, guidance 10, by visual_anagrams and by mirage; eight
anagram candidates plus one through stage II against visual_anagrams run eight times; a plain 64-px sample
against IFPipeline (and 256 px against IFSuperResolutionPipeline); a fresh process under an 8 GiB cap (the
plans that stay eager, as the notes report them); where stage I's and stage II's GPU time goes (kernels by kind, attention backends). The
last lines compare with the targets of issue 17. `--skip fresh,calls,layout,anagram,candidates,plain,cap,profile`
leaves parts out.

--tiny runs the same steps on tiny fp32 models on the CPU, where visual_anagrams cannot run (its sampler asks
for CUDA): there the home-made loop of if_reference.py stands in as a correctness check of mirage's loop. It is
not the anchor and no speed is compared with it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # visual_anagrams' progress bars, not timed output

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "src")]
import if_arch  # noqa: E402
import rss  # noqa: E402
import if_reference  # noqa: E402

from mirage.backends import hub  # noqa: E402
from mirage.backends.deepfloyd import load_stage  # noqa: E402
from mirage.backends.runtime import COMPILE_MODE, COMPILE_SCOPE, COMPILE_SCOPES  # noqa: E402
from mirage.backends.memory import GiB  # noqa: E402
from mirage.engine.denoiser import Cond  # noqa: E402
from mirage.engine.schedule import CLEAN, ddpm_step  # noqa: E402
from mirage.illusions.views import make_view  # noqa: E402

PROMPTS = ["an oil painting of people around a campfire", "an oil painting of an old man"]
GUIDANCE = 10.0
NOISE_LEVEL = 250
PEAK = 790e12  # dense fp16 FLOP/s of large matrix products on an H200 (KINDS.md: 769-798 measured)


class Bench:
    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.float16
        self.arch = if_arch.TINY if args.tiny else if_arch.PUBLISHED
        self.steps = 2 if args.tiny else 30
        self.reps = 1 if args.tiny else 10
        self.batches = (2, 4) if args.tiny else (4, 32, 2)
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

    def latency(self, fn, reps: int | None = None) -> float:
        for _ in range(1 if self.tiny else 2):
            fn()
        return statistics.median(self.wall(fn)[0] for _ in range(reps or self.reps))


# ---- mirage, through its Denoiser objects ---------------------------------------------------------------
class Noise:
    """Per-image noise from per-image CPU generators, drawn in the order diffusers' pipelines draw it."""

    def __init__(self, seeds, device):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.device = device

    def draw(self, shape):
        return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators]).to(self.device)


@torch.inference_mode()
def mirage_illusion(model, embeds: torch.Tensor, views, seeds, steps: int, guidance: float = GUIDANCE,
                    low_res: torch.Tensor | None = None) -> torch.Tensor:
    """mirage's loop for one anagram (or, with one view, a plain sample): `embeds` [V + 1, 77, D], one prompt
    a view and the null prompt last. Each step is one Denoiser call on [uncond views; cond views] x images,
    guidance, the inverse views, their mean, then mirage's DDPM step."""
    n, v = len(seeds), len(views)
    noise = Noise(seeds, model.device)
    shape = (model.channels, model.size, model.size)
    x = noise.draw(shape)
    embeds = embeds.to(model.device)
    order = [v] * (v * n) + [k for k in range(v) for _ in range(n)]  # [null x V x n, prompt k x n for each k]
    cond = Cond(embeds=embeds[order])
    if low_res is not None:
        image, level = model.noised_condition(low_res.to(model.device), noise.draw((3, model.size, model.size)),
                                              NOISE_LEVEL)
        cond = Cond(embeds=cond.embeds, image=torch.cat([view.view(image) for view in views] * 2),
                    level=level.repeat(2 * v))
    timesteps = model.schedule.timesteps(steps)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN
        eps, var = model(torch.cat([view.view(x) for view in views] * 2), t, cond)
        eps = eps.unflatten(0, (2, v, n))
        guided = eps[0] + guidance * (eps[1] - eps[0])
        e = torch.stack([view.inverse(guided[k]) for k, view in enumerate(views)]).mean(0)
        var = var.unflatten(0, (2, v, n))[1]
        var = torch.stack([view.inverse_variance(var[k]) for k, view in enumerate(views)]).mean(0)
        x = ddpm_step(model.schedule, x, e, var, t, t_prev, noise.draw(shape) if t > 0 else None)
    return x


def mirage_views():
    return [make_view("identity"), make_view("flip")]


def mirage_anagram(b: Bench, one, two, embeds1, embeds2, seeds, steps: int):
    views = mirage_views()
    t1, low = b.wall(lambda: mirage_illusion(one, embeds1, views, seeds, steps))
    t2, high = b.wall(lambda: mirage_illusion(two, embeds2, views, seeds[:1], steps, low_res=low[:1]))
    return t1, t2, low, high


def mirage_sample(b: Bench, one, two, embeds1, embeds2, seeds, steps: int, upscale: bool = True):
    identity = [make_view("identity")]
    e1, e2 = embeds1[[0, 2]], embeds2[[0, 2]]
    t1, low = b.wall(lambda: mirage_illusion(one, e1, identity, seeds, steps))
    if not upscale:
        return t1, 0.0
    t2, _ = b.wall(lambda: mirage_illusion(two, e2, identity, seeds[:1], steps, low_res=low[:1]))
    return t1, t2


# ---- visual_anagrams and diffusers' pipelines, as people run them ---------------------------------------
def diffusers_unet(folder: Path, dtype, device):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                variant=hub.variant(folder / "unet", dtype), use_safetensors=True)
    return unet.to(device).eval()


def pipelines(s1: Path, s2: Path, dtype, device):
    """IFPipeline and IFSuperResolutionPipeline on the same weight files as mirage (no T5: embeddings given)."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    one = IFPipeline(tokenizer=None, text_encoder=None, unet=diffusers_unet(s1, dtype, device),
                     scheduler=DDPMScheduler.from_pretrained(s1, subfolder="scheduler"), **none)
    two = IFSuperResolutionPipeline(tokenizer=None, text_encoder=None, unet=diffusers_unet(s2, dtype, device),
                                    scheduler=DDPMScheduler.from_pretrained(s2, subfolder="scheduler"),
                                    image_noising_scheduler=DDPMScheduler.from_pretrained(
                                        s2, subfolder="image_noising_scheduler"), **none)
    for pipe in (one, two):
        pipe.set_progress_bar_config(disable=True)
    return one, two


def import_anchor(anchor: Path):
    """visual_anagrams' samplers and views, from the fetched checkout (never copied into mirage)."""
    sys.path.insert(0, str(anchor))
    from visual_anagrams.samplers import sample_stage_1, sample_stage_2
    from visual_anagrams.views import get_views

    return sample_stage_1, sample_stage_2, get_views


def anchor_anagram(b: Bench, va, pipe1, pipe2, embeds, seed: int, steps: int, upscale: bool = True):
    """One 2-view anagram exactly as visual_anagrams' generate.py samples it: stage I, then stage II."""
    sample_stage_1, sample_stage_2, get_views = va
    views = get_views(["identity", "flip"])
    cond, null = embeds[:2].to(b.device, b.dtype), embeds[2:3].expand(2, -1, -1).to(b.device, b.dtype)
    generator = torch.manual_seed(seed)
    t1, low = b.wall(lambda: sample_stage_1(pipe1, cond, null, views, num_inference_steps=steps,
                                            guidance_scale=GUIDANCE, generator=generator))
    if not upscale:
        return t1, 0.0, low
    t2, _ = b.wall(lambda: sample_stage_2(pipe2, low, cond, null, views, num_inference_steps=steps,
                                          guidance_scale=GUIDANCE, noise_level=NOISE_LEVEL, generator=generator))
    return t1, t2, low


def pipeline_sample(b: Bench, pipe1, pipe2, embeds, steps: int):
    cond, null = embeds[:1].to(b.device, b.dtype), embeds[2:3].to(b.device, b.dtype)
    run1 = lambda: pipe1(prompt_embeds=cond, negative_prompt_embeds=null, num_inference_steps=steps,  # noqa: E731
                         guidance_scale=GUIDANCE, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    t1, low = b.wall(run1)
    t2, _ = b.wall(lambda: pipe2(image=low * 2 - 1, prompt_embeds=cond, negative_prompt_embeds=null,
                                 num_inference_steps=steps, guidance_scale=GUIDANCE, noise_level=NOISE_LEVEL,
                                 output_type="pt", generator=torch.Generator().manual_seed(0)).images)
    return t1, t2, run1


# ---- UNet calls ---------------------------------------------------------------------------------------
def unet_inputs(stage, batch: int, embeds: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, stage.channels, stage.size, stage.size, generator=g)
    cond = Cond(embeds=embeds[torch.arange(batch) % len(embeds)])
    if stage.is_upscaler:
        cond = cond.with_image(torch.randn(batch, 3, stage.size, stage.size, generator=g),
                               torch.full((batch,), NOISE_LEVEL, dtype=torch.long))
    return x.to(stage.device), cond.to(stage.device)


def direct_call(unet, x, cond, dtype, device):
    """The UNet module called as diffusers' pipelines and visual_anagrams call it (NCHW, no graphs)."""
    with torch.inference_mode():  # as the sampler makes them: other tensors are other graphs to compiled code
        inp = x if cond.image is None else torch.cat([x, cond.image], dim=1)
        inp = inp.to(device, dtype)
        if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and \
                not unet.conv_in.weight.is_contiguous():
            inp = inp.contiguous(memory_format=torch.channels_last)
        embeds, level, t = cond.embeds.to(device, dtype), cond.level, torch.tensor(500, device=device)
    return lambda: unet(inp, t, encoder_hidden_states=embeds, class_labels=level, return_dict=False)[0]


def count_flops(fn) -> int:
    """The FLOPs of one eager call. Compiled functions met under the counter's dispatch mode would run eagerly
    from then on, so they are not entered here (it made eager code of fused's, bench/if_gpu_fused_bias_h100.log)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def layout_of(unet) -> str:
    w = unet.conv_in.weight
    return "NHWC" if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() else "NCHW"


def rate_text(seconds: float, flops: int) -> str:
    rate = flops / seconds
    return f"{seconds * 1e3:8.2f} ms  {rate / 1e12:6.1f} TFLOP/s = {100 * rate / PEAK:5.1f} % of 790"


def measure_unet(b: Bench, name: str, batch: int, how: str, fn, flops: int, first=None) -> float:
    with torch.inference_mode():
        if first is not None:
            seconds, _ = b.wall(fn)
            print(f"  stage {name:<2} batch {batch:>2}  {first}: first call {seconds:.1f} s", flush=True)
        seconds = b.latency(fn)
    key = f"unet_{name}_b{batch}_{how.replace(' ', '_')}"
    b.note(key, dict(ms=seconds * 1e3, tflops=flops / seconds / 1e12, tflop_per_call=flops / 1e12),
           f"  stage {name:<2} batch {batch:>2}  {how:<22}: {rate_text(seconds, flops)}  "
           f"({flops / batch / 1e12:.2f} TFLOP an image)")
    return seconds


# ---- where the time goes ------------------------------------------------------------------------------------
KINDS = (("convolution (cuDNN)", ("fprop", "conv", "implicit", "dgrad", "xmma_fprop", "nchw", "nhwc")),
         ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
         ("matrix product", ("gemm", "cutlass", "cublas", "sm90_xmma")),
         ("compiled (triton: norms, elementwise)", ("triton_",)),
         ("layout / copies", ("copy", "transpose", "permute", "cat")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, marks in KINDS:
        if any(m in low for m in marks):
            return kind
    return "other (eager elementwise, norms, ...)"


def profile_call(b: Bench, label: str, fn, calls: int = 5) -> None:
    """GPU time of `calls` calls by kernel kind, and the top kernels; fn runs without CUDA graphs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        b.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            b.sync()
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / calls / 1e3
    if not total:
        print(f"  {label}: no kernels recorded", flush=True)
        return
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.device_time_total / calls / 1e3
    print(f"  {label}: {total:.2f} ms of kernels a call", flush=True)
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<40} {ms:7.2f} ms  {100 * ms / total:5.1f} %", flush=True)
    top = sorted(events, key=lambda e: -e.device_time_total)[:10]
    for e in top:
        print(f"      {e.device_time_total / calls / 1e3:7.2f} ms  x{e.count // calls:<4} {e.key[:110]}", flush=True)
    b.results[f"profile_{label}"] = dict(total_ms=total, by_kind=by_kind)


def attention_backends(b: Bench) -> None:
    """SDPA's backends on the attention shapes of IF-I-XL and IF-II-L at batch 4 (query: the pixels, keys:
    the pixels and 77 text tokens, 64 channels a head)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = (("I 32x32", 22, 1024), ("I 16x16", 33, 256), ("I 8x8", 44, 64), ("II 32x32", 15, 1024),
              ("II 16x16", 20, 256))
    backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION)
    for label, heads, n in shapes:
        q = torch.randn(4, heads, n, 64, device=b.device, dtype=b.dtype)
        k = torch.randn(4, heads, n + 77, 64, device=b.device, dtype=b.dtype)
        cells = []
        for backend in backends:
            try:
                with sdpa_kernel([backend]):
                    ms = b.latency(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k), 20) * 1e3
                cells.append(f"{backend.name.split('_')[0].lower()} {ms * 1e3:6.1f} us")
            except RuntimeError:
                cells.append(f"{backend.name.split('_')[0].lower()}   n/a    ")
        print(f"  attention {label:<9} ({heads} heads): " + "   ".join(cells), flush=True)


# ---- a fresh process: the first illusion ------------------------------------------------------------------
def fresh(args) -> int:
    """Load both stages as `mirage --compile --compile-scope S` does (`mirage` alone with --eager), then time the first 2-view anagram (it
    compiles, for shapes not seen before, and captures the graphs) and a second one, then 8 candidates at 2
    steps (a new batch size). Prints one JSON line."""
    b = Bench(args)
    s1, s2 = if_arch.build(args.root, b.arch, b.device)
    cuda = b.device.type == "cuda"
    if cuda:
        torch.zeros(1, device=b.device)  # the CUDA context, outside the times
        if args.cap:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.cap * GiB / total)
    graphs = lambda: _unique_graphs()  # noqa: E731
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        start = time.perf_counter()
        compile = False if args.eager else args.scope
        one = load_stage(str(s1), b.device, compile=compile)
        two = load_stage(str(s2), b.device, text_encoder_from=str(s1), compile=compile)
        e1 = one.encode(PROMPTS + [""]).embeds
        e2 = two.encode(PROMPTS + [""]).embeds
        t_encode = time.perf_counter() - start
        first1, first2, low, high = mirage_anagram(b, one, two, e1, e2, [0], b.steps)
        plans = dict(t5=one.text.plan.describe() if one.text.plan else "cached", stage_I=one.plan.describe(),
                     stage_II=two.plan.describe())
        seconds = time.perf_counter() - start
        compiled_graphs = graphs()
        again1, again2, _, _ = mirage_anagram(b, one, two, e1, e2, [0], b.steps)
        firsts = dict(I=one.first_call_seconds, II=two.first_call_seconds)
        seeds = list(range(b.candidates))
        cand_first, _ = b.wall(lambda: mirage_illusion(one, e1, mirage_views(), seeds, 2))
        cand_again, _ = b.wall(lambda: mirage_illusion(one, e1, mirage_views(), seeds, 2))
    print(json.dumps(dict(
        cap_gib=args.cap, seconds=seconds, encode_and_load_s=t_encode, plans=plans,
        first_illusion_s=[first1, first2], second_illusion_s=[again1, again2],
        compile_s=first1 + first2 - again1 - again2, first_call_s=firsts,
        candidates_first_s=cand_first, candidates_again_s=cand_again, graphs_after_first=compiled_graphs,
        graphs_after_candidates=graphs(), phases=_compile_phases(), execution=dict(I=one.execution, II=two.execution),
        finite=bool(torch.isfinite(high).all()),
        peak_vram_gib=torch.cuda.max_memory_reserved() / GiB if cuda else 0.0,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB if cuda else 0.0,
        peak_rss_gib=rss.peak_rss_gib()[1] or rss.peak_rss_gib()[0],  # VmHWM where there is one: see rss.py
        notes=[str(n.message) for n in notes if "memory" in str(n.message) or "UNet runs" in str(n.message)])))
    return 0


# dynamo's timers that say where compiling went: tracing, the backend (AOT autograd, inductor's code generation
# or its cache), waiting on Triton's compiles, building guards
PHASES = {"_compile.compile_inner": "dynamo in all", "bytecode_tracing": "tracing",
          "OutputGraph.call_user_compiler": "backend", "fx_codegen_and_compile": "inductor codegen",
          "async_compile.wait": "Triton compiles", "build_guards": "guards"}


def _compile_phases() -> dict:
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return {PHASES[n]: round(float(v), 2) for n, v in zip(names, values) if n in PHASES}
    except Exception:  # noqa: BLE001 - timers are private API: a figure lost, not the run
        return {}


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001
        return -1


def run_fresh(b: Bench, root: Path, cache: Path, scope: str | None, cap=None, log: Path | None = None) -> dict:
    """A fresh process (fresh()) with MIRAGE_CACHE=cache; its stderr, with dynamo's recompile log, goes to log."""
    env = dict(os.environ, MIRAGE_CACHE=str(cache))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # mirage places it, under MIRAGE_CACHE
    if log is not None:
        env["TORCH_LOGS"] = "recompiles"
    cmd = [sys.executable, __file__, "--fresh", "--root", str(root)] + (["--tiny"] if b.tiny else []) + \
          (["--cap", str(cap)] if cap else []) + (["--scope", scope] if scope else ["--eager"])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log is not None:
        log.write_text(done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return dict(cap_gib=cap, error=(done.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def fresh_text(label: str, run: dict) -> str:
    if "error" in run:
        return f"  {label:<24}: failed: {run['error']}"
    f1, f2 = run["first_illusion_s"]
    a1, a2 = run["second_illusion_s"]
    return (f"  {label:<24}: first anagram {f1:6.2f} + {f2:6.2f} s, second {a1:5.2f} + {a2:5.2f} s: "
            f"{run['compile_s']:6.1f} s compiling and capturing; 8 candidates (new batch) first "
            f"{run['candidates_first_s']:5.2f} s, again {run['candidates_again_s']:5.2f} s; compiled graphs "
            f"{run['graphs_after_first']} -> {run['graphs_after_candidates']}; whole {run['seconds']:6.2f} s "
            f"(encode + load {run['encode_and_load_s']:.1f} s); peak GPU {run['peak_vram_gib']:5.2f} GiB, "
            f"RSS {run['peak_rss_gib']:5.2f} GiB; plans {run['plans']}; runs {run['execution']}"
            + (f"\n      dynamo's timers (s): {run['phases']}" if run.get("phases") else "")
            + (f"\n      notes: {run['notes']}" if run["notes"] else ""))


# ---- the run ---------------------------------------------------------------------------------------------
def section(name: str, fn) -> None:
    """Run one part; a failure is printed and the other parts still run."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one broken measurement must not lose the others
        import traceback

        print(f"  FAILED ({name}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              flush=True)
        traceback.print_exc(limit=-4)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"  [{name}: {time.perf_counter() - start:.1f} s]", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a test of this script)")
    p.add_argument("--root", type=Path, help="where the random-weight models are built (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--anchor", type=Path, default=REPO / ".anchor", help="the visual_anagrams checkout")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to skip: fresh,calls,layout,anagram,candidates,plain,cap,profile")
    p.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scope", choices=COMPILE_SCOPES, default=COMPILE_SCOPE,
                   help=f"what mirage compiles: whole blocks or only their elementwise work (default {COMPILE_SCOPE})")
    args = p.parse_args(argv)
    # past its recompile limit dynamo runs a function eagerly and says nothing: here that fails, so that no figure
    # of compiled code is one of eager code (it happened to fused's stage II, bench/if_gpu_fused_views_h100.log)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    args.root = args.root or Path(tempfile.mkdtemp(prefix="mirage-if-bench-"))
    if args.fresh:
        return fresh(args)
    skip = set(filter(None, args.skip.split(",")))
    b = Bench(args)
    r = b.results
    cache = args.root / "cache"  # embeddings and compiled code: the fresh processes' and then this one's
    os.environ["MIRAGE_CACHE"] = str(cache)
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    print(f"mirage IF benchmark ({b.arch.name} models, {torch.cuda.get_device_name() if not b.tiny else 'CPU'}, "
          f"torch {torch.__version__}; 'mirage --compile': compile scope {args.scope} ({COMPILE_MODE}) + CUDA "
          f"graphs; 'mirage default (graphs, eager)': mirage without --compile, CUDA graphs over eager kernels)",
          flush=True)
    seconds, (s1, s2) = b.wall(lambda: if_arch.build(args.root, b.arch, b.device))
    b.note("build_s", seconds, f"built (or found) random weights in {args.root}: {seconds:.1f} s")
    if sys.flags.dont_write_bytecode:  # the lent GPU machines: torch's modules would compile from source each time
        print("note: this Python writes no bytecode (PYTHONDONTWRITEBYTECODE): unless site-packages holds it, as a "
              "pip install leaves it, each fresh process compiles the modules it imports (dynamo's, inductor's: "
              "seconds); `python -m compileall -q -j 16` over site-packages first", flush=True)

    def fresh_runs(plan):
        for label, cap in plan:
            log = args.root / "fresh-cold.err" if label.startswith("cold") else None
            run = run_fresh(b, args.root, cache, None if label.startswith("eager") else args.scope, cap, log)
            run["label"] = label
            r.setdefault("pipeline", []).append(run)
            print(fresh_text(label, run), flush=True)

    def first_illusions():
        print("the first illusion of fresh processes (load both stages, a 2-view anagram at 30+30 steps twice, then "
              "8 candidates at 2 steps: a new batch size), on an empty and then on a warm cache:", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        fresh_runs([("cold compile cache", None)]
                   + ([] if b.tiny else [("warm compile cache", None), ("eager (no --compile)", None)]))

    if "fresh" not in skip:
        section("fresh processes", first_illusions)

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        one = load_stage(str(s1), b.device, b.dtype, compile=args.scope)  # as `mirage --compile` loads them
        two = load_stage(str(s2), b.device, b.dtype, text_encoder_from=str(s1), compile=args.scope)
        seconds, _ = b.wall(lambda: one.encode(PROMPTS + [""]))
        b.note("t5_s", seconds, f"T5 load + encode 3 prompts + free: {seconds:.2f} s")
        for name, stage in (("I", one), ("II", two)):
            seconds, _ = b.wall(stage.unet)
            b.note(f"load_{name}_s", seconds, f"stage {name} UNet load from safetensors: {seconds:.2f} s "
                   f"(memory plan {stage.plan.describe()}; runs {stage.execution})")
    for n in notes:
        print(f"  note: {n.message}", flush=True)
    e1, e2 = one.encode(PROMPTS + [""]).embeds, two.encode(PROMPTS + [""]).embeds
    if b.tiny:  # off a GPU mirage keeps NCHW; lay stage I out as it would be on a GPU, for the same figures
        one.unet().to(memory_format=torch.channels_last)
    eager = {}  # mirage with compiling turned off (CUDA graphs still), the pre-issue-17 default
    pipes = {}
    va = {}

    def setup():
        if not b.tiny:
            eager["I"] = load_stage(str(s1), b.device, b.dtype, compile=False)
            eager["II"] = load_stage(str(s2), b.device, b.dtype, text_encoder_from=str(s1), compile=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for stage in eager.values():
                    stage.unet()
        pipes["I"], pipes["II"] = pipelines(s1, s2, b.dtype, b.device)
        if not b.tiny:
            va["fns"] = import_anchor(args.anchor)
            print(f"visual_anagrams from {args.anchor} (commit "
                  f"{(args.anchor / 'COMMIT').read_text().strip() if (args.anchor / 'COMMIT').is_file() else '?'})",
                  flush=True)

    section("setup: second copies, diffusers pipelines, visual_anagrams", setup)
    stages = {"I": one, "II": two}
    embeds = {"I": e1, "II": e2}

    def calls():
        print("UNet calls (median of 10; 'diffusers': the module called directly, as visual_anagrams and the "
              "pipelines call it):", flush=True)
        for name in ("I", "II"):
            stage = stages[name]
            for batch in (b.batches if name == "I" else b.batches[:1]):
                x, cond = unet_inputs(stage, batch, embeds[name])
                module = pipes[name].unet if name in pipes else stage.unet()
                plain = direct_call(module, x, cond, b.dtype, b.device)
                flops = count_flops(plain)
                if batch == b.batches[0]:
                    measure_unet(b, name, batch, f"eager {layout_of(module)}", plain, flops)
                    if name in eager:
                        measure_unet(b, name, batch, f"mirage-eager {layout_of(eager[name].unet())}",
                                     lambda: eager[name](x, 500, cond), flops, first="graphs")
                measure_unet(b, name, batch, f"mirage {layout_of(stage.unet())}", lambda: stage(x, 500, cond), flops,
                             first="compile + graphs" if stage.compiled else "graphs")
        print(f"  first calls of mirage's default stages so far: I {one.first_call_seconds:.1f} s, "
              f"II {two.first_call_seconds:.1f} s (compile cache warm from the fresh processes)", flush=True)

    def layouts():
        print(f"stage II's layout under mirage's compile scope {args.scope} + CUDA graphs (median of 10; eager NHWC "
              f"was 30 % slower on an H100, its group norms):", flush=True)
        x, cond = unet_inputs(two, b.batches[0], e2)
        flops = count_flops(direct_call(two.unet(), x, cond, b.dtype, b.device))
        for channels_last in (False, True):  # each layout forced on a copy of stage II (runtime.py chooses one)
            stage = load_stage(str(s2), b.device, b.dtype, text_encoder_from=str(s1), compile=args.scope)
            stage.channels_last = channels_last  # read when the UNet loads
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stage.unet()
            measure_unet(b, "II", b.batches[0], f"mirage {layout_of(stage.unet())}", lambda: stage(x, 500, cond),
                         flops, first="compile + graphs")
            if "profile" not in skip and not b.tiny:  # where each layout's time goes (no graphs)
                profile_call(b, f"stage_II_{layout_of(stage.unet())}_{args.scope}",
                             direct_call(stage.unet(), x, cond, b.dtype, b.device))
            stage.free()

    def anagram():
        mirage_anagram(b, one, two, e1, e2, [0], b.steps)  # warm-up: graphs for these shapes
        m1, m2, low, high = mirage_anagram(b, one, two, e1, e2, [0], b.steps)
        r["anagram_images"] = (low, high)
        off = [float("nan")] * 2
        if eager:
            mirage_anagram(b, eager["I"], eager["II"], e1, e2, [0], 2)
            off = list(mirage_anagram(b, eager["I"], eager["II"], e1, e2, [0], b.steps)[:2])
        if va:
            anchor_anagram(b, va["fns"], pipes["I"], pipes["II"], e1, 0, 2)  # warm-up: cuDNN, allocator
            ref = list(anchor_anagram(b, va["fns"], pipes["I"], pipes["II"], e1, 0, b.steps)[:2])
            label = "visual_anagrams"
        else:  # tiny: the home-made loop, a correctness check of the same work in fp32, not the anchor
            ref, high_ref = home_made(b, one, two, e1)
            diff = (high.cpu() - high_ref.cpu()).abs().max().item()
            b.note("anagram_max_diff", diff, f"  max |mirage - home-made loop| over the stage-II image: {diff:.2e}")
            label = "home-made loop (not the anchor)"
        m, a, o = m1 + m2, sum(ref), sum(off)
        b.note("anagram", dict(mirage=[m1, m2], mirage_eager=off, reference=ref, reference_is=label),
               f"2-view anagram 64->256, {b.steps}+{b.steps} steps, guidance {GUIDANCE:g}:\n"
               f"  {label:<31} {ref[0]:6.2f} s + {ref[1]:6.2f} s = {a:6.2f} s\n"
               f"  mirage default (graphs, eager)  {off[0]:6.2f} s + {off[1]:6.2f} s = {o:6.2f} s   ({a / o:.2f}x)\n"
               f"  mirage --compile               {m1:6.2f} s + {m2:6.2f} s = {m:6.2f} s   ({a / m:.2f}x)")

    def candidates():
        seeds = list(range(b.candidates))
        mirage_anagram(b, one, two, e1, e2, seeds, 2)  # warm-up of the batch-32 shapes
        c1, c2, _, _ = mirage_anagram(b, one, two, e1, e2, seeds, b.steps)
        ref = [float("nan")] * 2
        if va:
            times = [anchor_anagram(b, va["fns"], pipes["I"], pipes["II"], e1, s, b.steps, upscale=False)[0]
                     for s in seeds]
            ref = [sum(times), r["anagram"]["reference"][1]]
        m, a = c1 + c2, sum(ref)
        b.note("candidates", dict(anagram=[c1, c2], reference=ref),
               f"{b.candidates} anagram candidates + 1 through stage II:\n"
               f"  visual_anagrams run {b.candidates} times (stage I) + its stage II once: {ref[0]:6.2f} s + "
               f"{ref[1]:6.2f} s = {a:6.2f} s\n"
               f"  mirage --compile, one batch         {c1:6.2f} s + {c2:6.2f} s = {m:6.2f} s   ({a / m:.2f}x)")

    def plain():
        mirage_sample(b, one, two, e1, e2, [0], 2)
        m1 = statistics.median(mirage_sample(b, one, two, e1, e2, [0], b.steps, upscale=False)[0]
                               for _ in range(3))
        m2 = mirage_sample(b, one, two, e1, e2, [0], b.steps)[1]
        pipeline_sample(b, pipes["I"], pipes["II"], e1, 2)
        p1, p2, run1 = pipeline_sample(b, pipes["I"], pipes["II"], e1, b.steps)
        p1 = statistics.median([p1] + [b.wall(run1)[0] for _ in range(2)])
        b.note("plain", dict(mirage=[m1, m2], pipelines=[p1, p2]),
               f"plain sample, {b.steps} steps, guidance {GUIDANCE:g}:\n"
               f"  64 px:  IFPipeline {p1:6.2f} s, mirage {m1:6.2f} s   ({p1 / m1:.2f}x)\n"
               f"  256 px: IFSuperResolutionPipeline {p2:6.2f} s, mirage {m2:6.2f} s   ({p2 / m2:.2f}x)")

    def profiles():
        print("where the GPU time goes (compiled blocks, no graphs; 5 calls at batch 4):", flush=True)
        for name in ("I", "II"):
            for stage in (stages[name],):
                x, cond = unet_inputs(stage, b.batches[0], embeds[name])
                fn = direct_call(stage.unet(), x, cond, b.dtype, b.device)
                profile_call(b, f"stage_{name}_{layout_of(stage.unet())}_{'compiled' if stage.compiled else 'eager'}",
                             fn)
            if name in pipes:
                x, cond = unet_inputs(stages[name], b.batches[0], embeds[name])
                profile_call(b, f"stage_{name}_diffusers_eager",
                             direct_call(pipes[name].unet, x, cond, b.dtype, b.device))
        if not b.tiny:
            attention_backends(b)

    def capped():
        print("a fresh process under an 8 GiB cap (warm cache): the plans that stay eager, and their notes:",
              flush=True)
        fresh_runs([("8 GiB cap, warm cache", 8)])

    # the fresh processes run while this one holds its models (idle): 139 GiB hold both
    for name, part in (("calls", calls), ("layout", layouts), ("anagram", anagram), ("candidates", candidates),
                       ("plain", plain), ("cap", capped), ("profile", profiles)):
        if name not in skip and not (b.tiny and name in ("profile", "cap")):
            section(name, part)
    r.pop("anagram_images", None)
    section("targets", lambda: targets(b))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1, default=str))
    return 0


def home_made(b: Bench, one, two, embeds):
    """The tiny check: if_reference.py's loop on the same UNets, in fp32."""
    views = [make_view("identity"), make_view("flip")]
    conds, null = [embeds[0:1], embeds[1:2]], embeds[2:3]
    t1, low = b.wall(lambda: if_reference.anagram(one.unet(), one.schedule.config, views, conds, null, b.steps,
                                                  GUIDANCE, seed=0))
    t2, high = b.wall(lambda: if_reference.anagram(two.unet(), two.schedule.config, views, conds, null, b.steps,
                                                   GUIDANCE, seed=0, low_res=low, noising_config=two.noising.config,
                                                   noise_level=NOISE_LEVEL))
    return [t1, t2], high


def targets(b: Bench) -> None:
    """Issue 17's targets, from the figures above."""
    r = b.results
    runs = {run.get("label"): run for run in r.get("pipeline", []) if "error" not in run}
    nan = float("nan")
    cold = runs.get("cold compile cache", {}).get("compile_s", nan)
    warm = runs.get("warm compile cache", {}).get("compile_s", nan)
    # what a fresh process's first illusion costs without compiling (cuDNN's algorithm search, graph capture):
    # the rest of the compiled runs' first-call time is compiling
    base = runs.get("eager (no --compile)", {}).get("compile_s", 0.0)
    ana = r.get("anagram", {})
    ana_ratio = sum(ana.get("reference", [nan])) / sum(ana.get("mirage", [nan])) if ana else nan
    cand = r.get("candidates", {})
    cand_ratio = sum(cand.get("reference", [nan])) / sum(cand.get("anagram", [nan])) if cand else nan
    plain = r.get("plain", {})
    plain_ratio = plain["pipelines"][0] / plain["mirage"][0] if plain else nan
    lines = [("first illusion, cold cache: compiling <= 30 s", f"{cold - base:.1f} s", cold - base <= 30),
             ("first illusion, warm cache: compiling <= 5 s", f"{warm - base:.1f} s", warm - base <= 5),
             ("2-view anagram >= 3x visual_anagrams", f"{ana_ratio:.2f}x", ana_ratio >= 3),
             ("8 candidates + 1 >= 3x visual_anagrams x 8", f"{cand_ratio:.2f}x", cand_ratio >= 3),
             ("plain 64-px sample >= 2.5x IFPipeline", f"{plain_ratio:.2f}x", plain_ratio >= 2.5)]
    print("targets (issue 17)" + (" (tiny models on a CPU: figures meaningless)" if b.tiny else "") + ":")
    print(f"  (compiling: a fresh process's first-illusion overhead, {cold:.1f} s cold and {warm:.1f} s warm, less "
          f"the {base:.1f} s an eager fresh process spends on its first calls)")
    for what, got, met in lines:
        print(f"  {what:<48} {got:>10}  {'met' if met else 'NOT met'}")
    r["targets"] = {what: dict(got=got, met=met) for what, got, met in lines}


if __name__ == "__main__":
    sys.exit(main())
