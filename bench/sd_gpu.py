"""GPU benchmark of mirage's Stable Diffusion back end (issue 14) against diffusers' pipelines, on random weights
at the published sizes, built here offline and saved in the hub layout (both sides load the same folders):
SD 1.5 (UNet 860 M, CLIP ViT-L/14 text 123 M, VAE 84 M) and stabilityai/stable-diffusion-x4-upscaler (UNet
473 M, OpenCLIP ViT-H text 340 M, VAE 55 M); the three-stage illusion also takes IF-I-XL, IF-II-L and T5-XXL
from if_arch.py.

    python bench/sd_gpu.py [--root DIR] [--json FILE] [--skip sample,upscale,stages3]   # CUDA, fp16
    python bench/sd_gpu.py --tiny                       # tiny fp32 models on the CPU, in seconds

One run prints, diffusers | mirage | their ratio side by side:
  sample   512 px, 30 steps, guidance 7.5, batch 1 and 8: `StableDiffusionPipeline(prompt, generator=[one per
           image])` against mirage's same job (tasks.sample with the folder's own scheduler, one seed per image);
  upscale  256 -> 1024 px by the x4 upscaler, 20 steps, guidance 9, noise level 20, one image:
           `StableDiffusionUpscalePipeline` against `mirage upscale` as the CLI runs it (its parser and
           Settings give the model, the defaults and the loop; tasks.upscale makes the image);
for each: warm time (median of repeats after one warm-up; 3 at batch 1, 2 at batch 8), peak GPU memory
(torch.cuda.max_memory_allocated over the timed runs, reset between, with only that side's weights on the GPU)
and the maximum and mean difference between the two images; on a GPU also both fp16 images against diffusers'
pipeline run once in fp32 on the same folder and seeds. That check is needed: on the H200 (torch 2.11) diffusers'
randn_tensor draws other numbers from a CPU generator in fp16 than in fp32 (mean |difference| 1.13 for one
seed), so its fp16 pipelines start from other noise than its fp32 ones, while mirage draws in fp32 in every
precision. The fp16 images of the two then differ by up to 1 (mean 0.17), and mirage's fp16 image is the one
within 3e-3 (mean 3e-4) of the fp32 reference (bench run of 2026-12-02). Then
  stages3  a 2-view IF anagram 64 -> 256 -> 1024 (IF-I-XL, IF-II-L, T5-XXL, then the x4 upscaler on the same
           views) by the real CLI entry, `mirage anagram ... --stage3 <x4 folder>`, in a fresh process whose GPU
           memory is capped at 16 GiB (torch.cuda.set_per_process_memory_fraction, before anything loads):
           its wall time, peak GPU memory and RSS (read inside it), exit code, one-line error, and the memory
           plans its notes name.
--tiny runs all of it on tiny fp32 models on the CPU (no cap, a few steps for IF) and checks that mirage and
diffusers make the same images.

The x4 upscaler's configs are those of the model card's unet/, vae/, text_encoder/, scheduler/ and
low_res_scheduler/ config files (DDIM with v-prediction, scaled_linear betas 0.0001-0.02; noise levels up to
350 by DDPM on the same betas; VAE of 3 blocks, factor 4, scaling 0.08333; the text model as SD 2's, 23 layers).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO / "src")]
import if_arch  # noqa: E402  (IF-I-XL, IF-II-L and T5-XXL at the published sizes)
from rss import peak_rss_gib, rss_text  # noqa: E402
import tiny_sd  # noqa: E402  (the CLIP BPE tokenizer, written from a small vocab; the tiny configs)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from mirage.app.commands import upscale_input  # noqa: E402
from mirage.app.main import build_parser  # noqa: E402
from mirage.app.main import main as mirage_main  # noqa: E402
from mirage.app.settings import resolve  # noqa: E402
from mirage.backends.load import load_model  # noqa: E402
from mirage.backends.schedulers import Scheduler  # noqa: E402
from mirage.engine import tasks  # noqa: E402
from mirage.engine.sample import Sampling  # noqa: E402

GiB = 2**30
PROMPT = "an oil painting of a snowy mountain village"
GUIDANCE = 7.5
UP_STEPS, UP_GUIDANCE, UP_NOISE = 20, 9.0, 20  # the x4 upscaler's published recipe (and `mirage upscale`'s)
ILLUSION = ("an oil painting of an old man", "an oil painting of people around a campfire")
CAP_GIB = 16
PARTS = ("sample", "upscale", "stages3")

# SD 1.5's published configs (unet/config.json, vae/config.json, text_encoder/config.json)
UNET_15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
VAE_15 = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
CLIP_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

# stabilityai/stable-diffusion-x4-upscaler's published configs. The UNet: the low-res image concatenated to the
# latents (4 + 3 channels in), the noise level as a class label (1000 classes), attention only in the three lower
# blocks, cross-attention only (no self-attention) in the first two of them; 473 M parameters.
UNET_X4 = dict(sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
               block_out_channels=(256, 512, 512, 1024), cross_attention_dim=1024, attention_head_dim=8,
               num_class_embeds=1000, only_cross_attention=(True, True, True, False), use_linear_projection=True,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
VAE_X4 = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256, scaling_factor=0.08333)
CLIP_H23 = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                projection_dim=512)
X4_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                    prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
X4_LOW_RES = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                  clip_sample=False, variance_type="fixed_small")
X4_MAX_NOISE = 350


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def text_model(tok, config: dict) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id, **config))


def build(root: Path, tiny: bool, device: torch.device | str = "cpu") -> Path:
    """The random-weight SD 1.5 folder (built once under root; random init on `device`, quick on a GPU)."""
    folder = root / ("SD-tiny" if tiny else "SD-1.5-random")
    if (folder / "model_index.json").is_file():
        return folder
    if tiny:
        return tiny_sd.build(root).sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = tiny_sd.tokenizer()
        with torch.device(device):
            text, vae, unet = text_model(tok, CLIP_L14), AutoencoderKL(**VAE_15), UNet2DConditionModel(**UNET_15)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny_sd.sd_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        print(f"SD 1.5 parameters: UNet {params(unet) / 1e6:.0f} M, CLIP text {params(text) / 1e6:.0f} M, "
              f"VAE {params(vae) / 1e6:.0f} M", flush=True)
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    release()
    return folder


def build_x4(root: Path, tiny: bool, device: torch.device | str = "cpu") -> Path:
    """The random-weight x4-upscaler folder (StableDiffusionUpscalePipeline's layout), built once under root."""
    folder = root / ("SD-x4-tiny" if tiny else "SD-x4-upscaler-random")
    if (folder / "model_index.json").is_file():
        return folder
    if tiny:
        return tiny_sd.build(root).upscaler
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        tok = tiny_sd.tokenizer()
        with torch.device(device):
            text, vae, unet = text_model(tok, CLIP_H23), AutoencoderKL(**VAE_X4), UNet2DConditionModel(**UNET_X4)
        pipe = StableDiffusionUpscalePipeline(
            vae=vae, text_encoder=text, tokenizer=tok, unet=unet, low_res_scheduler=DDPMScheduler(**X4_LOW_RES),
            scheduler=DDIMScheduler(**X4_SCHEDULER), safety_checker=None, feature_extractor=None,
            watermarker=None, max_noise_level=X4_MAX_NOISE)
        print(f"x4 upscaler parameters: UNet {params(unet) / 1e6:.0f} M, OpenCLIP-H text {params(text) / 1e6:.0f} "
              f"M, VAE {params(vae) / 1e6:.0f} M", flush=True)
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    release()
    return folder


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def low_res_image(root: Path, side: int) -> Path:
    """The upscaler's input: mirage's sample photo resized to `side` px, as a PNG both sides read."""
    path = root / f"low-{side}.png"
    if not path.is_file():
        with Image.open(REPO / "src" / "mirage" / "assets" / "photo.png") as im:
            im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS).save(path)
    return path


# ---- timing ------------------------------------------------------------------------------------------
def timed(fn, repeats: int, device: torch.device) -> tuple[float, int, torch.Tensor]:
    """(median seconds, peak GPU bytes, last output) over `repeats` runs after one warm-up."""
    out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(times), peak, out


def place(pipe, device) -> None:
    """A pipeline's modules moved to `device` (pipe.to("cpu") warns that fp16 cannot run there: it is parked)."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.to(device)


NOTES = ("memory plan", "out of GPU memory", "CUDA graphs", "out of memory")


def both(pipe, model, device: torch.device, repeats: int, diffusers_run, mirage_run):
    """Each side timed with only its own weights on the GPU: the pipeline moved there and mirage's model freed
    (it loads again on its next call, in its warm-up), then the pipeline moved to the CPU. mirage's notes (the
    memory plan its UNet runs under) are printed once."""
    model.free()
    release()
    place(pipe, device)
    d = timed(diffusers_run, repeats, device)
    place(pipe, "cpu")
    release()
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        m = timed(mirage_run, repeats, device)
    for note in dict.fromkeys(str(n.message) for n in notes if any(k in str(n.message) for k in NOTES)):
        if note not in SEEN:
            SEEN.add(note)
            print(f"  note (mirage): {note}", flush=True)
    return d, m


SEEN: set[str] = set()


def fp32_check(b, cls, folder: Path, call, d_img: torch.Tensor, m_img: torch.Tensor) -> tuple[dict, str]:
    """On a GPU: diffusers' pipeline in fp32 on the same folder and seeds, once, as the reference both fp16
    images are measured against (random weights make fp16's differences large; this says whose they are)."""
    pipe = cls.from_pretrained(folder, dtype=torch.float32, safety_checker=None, feature_extractor=None,
                               **({"watermarker": None} if cls is StableDiffusionUpscalePipeline else
                                  {"requires_safety_checker": False}))
    pipe.set_progress_bar_config(disable=True)
    place(pipe, b.device)
    ref = call(pipe)
    place(pipe, "cpu")
    del pipe
    release()
    figures = {}
    for name, img in (("diffusers_fp16", d_img), ("mirage_fp16", m_img)):
        diff = (img - ref).abs()
        figures[name] = dict(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    text = "            against diffusers in fp32: " + " | ".join(
        f"{name.replace('_', ' ')} max {v['max_abs_diff']:.2e} mean {v['mean_abs_diff']:.1e}"
        for name, v in figures.items())
    return figures, text


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def row(label: str, d: tuple, m: tuple, **extra) -> tuple[dict, str]:
    (d_s, d_peak, d_img), (m_s, m_peak, m_img) = d, m
    diff = (d_img - m_img).abs()
    figures = dict(extra, diffusers_s=round(d_s, 4), mirage_s=round(m_s, 4), speedup=round(d_s / m_s, 3),
                   diffusers_peak_gib=round(d_peak / GiB, 3), mirage_peak_gib=round(m_peak / GiB, 3),
                   memory_ratio=round(d_peak / m_peak, 3) if m_peak else None, max_abs_diff=float(diff.max()),
                   mean_abs_diff=float(diff.mean()))
    text = (f"  {label:<9} time {d_s:7.3f} s | {m_s:7.3f} s | {ratio(d_s, m_s)}    peak GPU {d_peak / GiB:6.2f} "
            f"GiB | {m_peak / GiB:6.2f} GiB | {ratio(d_peak, m_peak)}    |diff| max {diff.max():.2e} mean "
            f"{diff.mean():.1e}")
    return figures, text


# ---- (1) samples: StableDiffusionPipeline against tasks.sample -----------------------------------------
def sample_part(b, out: dict) -> None:
    folder = build(b.root, b.tiny, b.device)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=b.dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    model = load_model(str(folder), b.device, compile=b.compile)
    model.channels_last = b.channels_last  # read when its UNet loads (on a GPU, with the whole UNet resident)
    spec = Scheduler(model.scheduler_name, model.scheduler_config, b.steps)
    sampling = Sampling(spec.timesteps(), GUIDANCE, scheduler=spec)
    print(f"SD 1.5 sample, {model.size} px, {b.steps} steps, guidance {GUIDANCE:g}, the folder's scheduler "
          f"({model.scheduler_name}), mirage's UNet {'NHWC' if b.channels_last else 'NCHW'}:  "
          "StableDiffusionPipeline | mirage | ratio", flush=True)
    results = out.setdefault("results", [])
    for n in b.batches:
        seeds = list(range(n))

        def diffusers_run(p=pipe):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            return p([PROMPT] * n, num_inference_steps=b.steps, guidance_scale=GUIDANCE, generator=gens,
                     output_type="pt").images.float().cpu()

        def mirage_run():
            return ((tasks.sample(model, PROMPT, seeds, sampling) + 1) / 2).float().cpu()

        repeats = b.repeats or (1 if b.tiny else 3 if n == 1 else 2)
        d, m = both(pipe, model, b.device, repeats, diffusers_run, mirage_run)
        figures, text = row(f"batch {n}", d, m, batch=n, steps=b.steps, repeats=repeats)
        results.append(figures)
        print(text, flush=True)
        print(f"            mirage runs {model.execution}; its first calls so far (compiling, capturing graphs): "
              f"{model.first_call_seconds:.1f} s", flush=True)
        if not b.tiny and n == b.batches[0]:
            figures["fp32_check"], text = fp32_check(b, StableDiffusionPipeline, folder, diffusers_run, d[2], m[2])
            print(text, flush=True)
    model.free()


# ---- (2) the x4 upscaler: StableDiffusionUpscalePipeline against `mirage upscale` -----------------------
def upscale_part(b, out: dict) -> None:
    folder = build_x4(b.root, b.tiny, b.device)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder, dtype=b.dtype, safety_checker=None,
                                                          feature_extractor=None, watermarker=None)
    pipe.set_progress_bar_config(disable=True)
    # mirage's side as `mirage upscale --model F --image low.png --size S --prompt P` runs it: the CLI's parser
    # and Settings (its defaults: 20 steps, guidance 9, noise level 20), load_model, Settings.sampling (which
    # sets the size and builds the folder's scheduler), upscale_input (the image at the latents' side)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = factor * pipe.unet.config.sample_size if b.tiny else 1024  # the output side: 1024 px from 256 px
    low_path = low_res_image(b.root, side // factor)
    argv = ["upscale", "--model", str(folder), "--image", str(low_path), "--prompt", PROMPT, "--size", str(side),
            "--seeds", "0", "--device", b.device.type, "--quiet"] + (["--compile"] if b.compile else [])
    args = build_parser().parse_args(argv)
    args.argv = argv
    settings = resolve(args, "upscale")
    model = load_model(settings.model, b.device, settings.memory, settings.compile)
    sampling = settings.sampling(model)
    low = upscale_input(model, args)
    if (settings.steps, settings.guidance, settings.noise_level) != (UP_STEPS, UP_GUIDANCE, UP_NOISE):
        print(f"  note: mirage upscale's defaults are {settings.steps} steps, guidance {settings.guidance:g}, noise "
              f"level {settings.noise_level}, not the published {UP_STEPS}, {UP_GUIDANCE:g}, {UP_NOISE}", flush=True)
    with Image.open(low_path) as im:
        low_pil = im.convert("RGB")

    def diffusers_run(p=pipe):
        return p(PROMPT, image=low_pil, num_inference_steps=UP_STEPS, guidance_scale=UP_GUIDANCE,
                 noise_level=UP_NOISE, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="pt").images.float().cpu()

    def mirage_run():
        return ((tasks.upscale(model, low, args.prompt, [0], sampling, noise_level=settings.noise_level) + 1)
                / 2).float().cpu()

    repeats = b.repeats or (1 if b.tiny else 3)
    print(f"x4 upscale {side // factor} -> {side} px, {UP_STEPS} steps, guidance {UP_GUIDANCE:g}, noise level "
          f"{UP_NOISE}, one image ({model.scheduler_name}, v-prediction):  StableDiffusionUpscalePipeline | "
          f"mirage upscale | ratio", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*upcast_vae.*")  # diffusers' own fp32 VAE decode, each call
        d, m = both(pipe, model, b.device, repeats, diffusers_run, mirage_run)
    figures, text = row("1 image", d, m, low_side=side // factor, side=side, steps=UP_STEPS, repeats=repeats,
                        mirage_steps=settings.steps, mirage_guidance=settings.guidance,
                        mirage_noise_level=settings.noise_level)
    out["upscale"] = figures
    print(text, flush=True)
    if not b.tiny:
        figures["fp32_check"], text = fp32_check(b, StableDiffusionUpscalePipeline, folder, diffusers_run, d[2], m[2])
        print(text, flush=True)
        if pipe.vae.config.get("force_upcast", False):
            print("  (diffusers decodes in fp32, its VAE's force_upcast; mirage in fp16)", flush=True)
    model.free()


# ---- (3) the three-stage IF illusion, by the CLI in a fresh process under a GPU memory cap --------------
def anagram_argv(b, s1: Path, s2: Path, x4: Path, out_dir: Path) -> list[str]:
    argv = ["anagram", "--model", str(s1), "--upscaler", str(s2), "--stage3", str(x4), "--prompt", ILLUSION[0],
            "--prompt", ILLUSION[1], "--view", "identity", "--view", "flip", "--seeds", "0", "--out", str(out_dir)]
    if b.tiny:  # a few steps: the CLI's 100 + 50 on a CPU would take a minute
        argv += ["--device", "cpu", "--steps", "4", "--steps2", "4"]
    return argv


def fresh(args) -> int:
    """The child: caps this process's GPU memory first, then runs `mirage anagram` through the CLI's entry
    (mirage.app.main.main), and prints one JSON line with what it measured from inside."""
    b = Bench(args)
    cuda = b.device.type == "cuda"
    total = 0
    if cuda:
        torch.zeros(1, device=b.device)  # the CUDA context, before the cap and the models
        total = torch.cuda.get_device_properties(b.device).total_memory
        if args.cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap * GiB / total))
    s1, s2 = if_arch.build(b.root, b.arch, b.device)  # made by the parent: found here
    x4 = build_x4(b.root, b.tiny, b.device)
    out_dir = Path(tempfile.mkdtemp(prefix="stages3-", dir=b.root))
    argv = anagram_argv(b, s1, s2, x4, out_dir)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            rc = mirage_main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 2
        seconds = time.perf_counter() - start
    images = []
    result = out_dir / "result.json"
    if result.is_file():
        for entry in json.loads(result.read_text()).get("images", []):
            for key in ("stage1_file", "file"):
                if key in entry:
                    with Image.open(out_dir / entry[key]) as im:
                        images.append(dict(file=entry[key], side=im.width))
    keep = ("memory plan", "out of GPU memory", "UNet runs", "CUDA graphs", "out of memory")
    maxrss, hwm = peak_rss_gib()
    print(json.dumps(dict(
        rc=rc, main_s=seconds, cap_gib=args.cap, total_gib=total / GiB, argv=["mirage", *argv], images=images,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB if cuda else 0.0,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB if cuda else 0.0,
        peak_rss_gib=maxrss, vm_hwm_gib=hwm,
        notes=list(dict.fromkeys(str(n.message) for n in notes if any(k in str(n.message) for k in keep))))))
    return 0


def stages3_part(b, out: dict) -> None:
    t0 = time.perf_counter()
    if_arch.build(b.root, b.arch, b.device)
    x4 = build_x4(b.root, b.tiny, b.device)
    print(f"IF {b.arch.name} + x4 upscaler folders built (or found): {time.perf_counter() - t0:.1f} s", flush=True)
    factor = 2 ** (len(json.loads((x4 / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    sizes = (b.arch.stage_1["sample_size"], b.arch.stage_2["sample_size"], b.arch.stage_2["sample_size"] * factor)
    release()
    cap = None if b.tiny else CAP_GIB
    env = dict(os.environ, MIRAGE_CACHE=tempfile.mkdtemp(prefix="cache-stages3-", dir=b.root))  # T5 runs: no cache
    cmd = [sys.executable, __file__, "--fresh", "--root", str(b.root)] + (["--tiny"] if b.tiny else []) + \
          (["--cap", str(cap)] if cap else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    run = json.loads(lines[-1]) if lines else {}
    errors = [line for line in done.stderr.splitlines() if re.match(r"mirage \w+: (error|internal error|interrupted)",
                                                                    line)]
    if not lines:
        errors = errors or (done.stderr.strip().splitlines() or ["no output"])[-1:]
    run.update(wall_s=wall, process_rc=done.returncode, error=errors[-1] if errors else None)
    (b.root / "stages3.err").write_text(done.stderr)
    out["stages3"] = run
    sides = " -> ".join(str(i["side"]) for i in run.get("images", [])) or "none"
    cap_text = f"under a {cap} GiB GPU cap" if cap else "no cap (CPU)"
    print(f"three-stage IF anagram (identity, flip) {' -> '.join(map(str, sizes))} px by `mirage anagram --stage3` "
          f"in a fresh process, {cap_text}:", flush=True)
    print(f"  command: {' '.join(run.get('argv', cmd))}", flush=True)
    if "rc" not in run:
        print(f"  FAILED: the process ended with rc {done.returncode}: {run['error']}", flush=True)
        return
    peak, rss = run["peak_allocated_gib"], rss_text(run["peak_rss_gib"], run.get("vm_hwm_gib"))
    print(f"  rc {run['rc']}{'' if run['error'] is None else ': ' + run['error']}; wall {wall:.1f} s (the CLI's "
          f"main() {run['main_s']:.1f} s); peak GPU {peak:.2f} GiB allocated"
          + (f" = {peak / cap:.0%} of the cap" if cap else "")
          + f", {run['peak_reserved_gib']:.2f} GiB reserved; peak RSS {rss}; images written {sides} px", flush=True)
    plans = run.get("notes") or []
    print("  memory plans, as the CLI's notes say them:"
          + ("" if plans else " none printed (the CLI notes them on a GPU)"), flush=True)
    for note in plans:
        print(f"    {note}", flush=True)
    print(f"  (T5's plan is not printed by the CLI; its stderr is in {b.root / 'stages3.err'})", flush=True)


# ---- the run ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, a):
        self.tiny = a.tiny
        self.device = torch.device("cpu" if a.tiny else "cuda")
        self.dtype = torch.float32 if a.tiny else torch.float16
        self.steps = a.steps or (3 if a.tiny else 30)
        self.batches = [int(n) for n in (a.batches or ("1,2" if a.tiny else "1,8")).split(",")]
        self.repeats = a.repeats
        self.compile = a.compile
        self.channels_last = a.channels_last
        self.root = Path(a.root)
        self.arch = if_arch.TINY if a.tiny else if_arch.PUBLISHED


def section(name: str, fn) -> bool:
    """Run one part; a failure is printed and the other parts still run."""
    start = time.perf_counter()
    try:
        fn()
        ok = True
    except Exception as e:  # noqa: BLE001 - one broken measurement must not lose the others
        import traceback

        print(f"  FAILED ({name}): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              flush=True)
        traceback.print_exc(limit=-4)
        ok = False
    release()
    print(f"  [{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 models on the CPU")
    ap.add_argument("--root", default=None, help="where the random-weight folders go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; 3 with --tiny)")
    ap.add_argument("--batches", default=None, help="sample batch sizes (default 1,8; 1,2 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per case (default 3, and 2 at batch 8; 1 with --tiny)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    ap.add_argument("--compile", action="store_true", help="mirage's side with --compile (compiled UNet blocks)")
    ap.add_argument("--channels-last", action="store_true",
                    help="mirage's SD UNet resident in NHWC (its default is NCHW; unmeasured on a GPU until now)")
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny on a CPU", file=sys.stderr)
        return 2
    a.root = a.root or tempfile.mkdtemp(prefix="sd-bench-")
    if a.fresh:
        return fresh(a)
    skip = set(filter(None, a.skip.split(",")))
    if skip - set(PARTS):
        print(f"unknown --skip {','.join(sorted(skip - set(PARTS)))}: the parts are {','.join(PARTS)}",
              file=sys.stderr)
        return 2
    b = Bench(a)
    os.environ["MIRAGE_CACHE"] = str(b.root / "cache")  # prompt embeddings: this run's own
    print(f"mirage Stable Diffusion benchmark ({'tiny models, CPU, fp32' if b.tiny else torch.cuda.get_device_name()}"
          f", torch {torch.__version__}); figures: diffusers | mirage | diffusers / mirage", flush=True)
    t0 = time.perf_counter()
    folders = ([build(b.root, b.tiny, b.device)] if "sample" not in skip else []) + \
        ([build_x4(b.root, b.tiny, b.device)] if {"upscale", "stages3"} - skip else [])
    print(f"model folders {', '.join(str(f) for f in folders) or 'none'} built (or found): "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    out: dict = dict(device=str(b.device), dtype=str(b.dtype))
    ok = True
    for name, part in (("sample", sample_part), ("upscale", upscale_part), ("stages3", stages3_part)):
        if name not in skip:
            ok &= section(name, lambda: part(b, out))
    rss, hwm = peak_rss_gib()
    out["peak_rss_gib"], out["vm_hwm_gib"] = round(rss, 3), hwm and round(hwm, 3)
    print(f"peak host RSS of this process {hwm if hwm is not None else rss:.2f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if b.tiny:
        rows = out.get("results", []) + ([out["upscale"]] if "upscale" in out else [])
        if any(r["max_abs_diff"] > 1e-4 for r in rows):
            print("mirage and diffusers made different images", file=sys.stderr)
            return 1
        if "stages3" in out and out["stages3"].get("rc") != 0:
            print("the three-stage anagram failed", file=sys.stderr)
            return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
