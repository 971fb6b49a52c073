"""GPU benchmark of mirage's Stable Diffusion path against diffusers' StableDiffusionPipeline, in one process, on
the same random weights at SD 1.5's published sizes (UNet 860 M, CLIP ViT-L/14 text 123 M, VAE 84 M), built
here offline and saved in the hub layout (both sides load that folder).

    python bench/sd_gpu.py [--root DIR] [--json FILE]   # CUDA, fp16: 512 px, 30 steps, batch 1 and 8
    python bench/sd_gpu.py --tiny                       # tiny fp32 models on the CPU, in seconds

For each batch size: warm time (median of --repeats runs after one warm-up) and peak GPU memory of
`StableDiffusionPipeline(prompt, num_inference_steps=30, guidance_scale=7.5, generator=[one per image])`
and of mirage's same job (tasks.sample with the folder's own scheduler, one seed per image), the maximum
difference between their images, and peak host RSS. --tiny checks that the two make the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src")]
import tiny_sd  # noqa: E402  (the CLIP BPE tokenizer, written from a small vocab; the tiny configs)
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from mirage.backends.load import load_model  # noqa: E402
from mirage.backends.schedulers import Scheduler  # noqa: E402
from mirage.engine import tasks  # noqa: E402
from mirage.engine.sample import Sampling  # noqa: E402

PROMPT = "an oil painting of a snowy mountain village"
GUIDANCE = 7.5

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


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(root: Path, tiny: bool) -> Path:
    """The random-weight SD folder (built once under root)."""
    folder = root / ("SD-tiny" if tiny else "SD-1.5-random")
    if (folder / "model_index.json").is_file():
        return folder
    if tiny:
        return tiny_sd.build(root).sd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tok = tiny_sd.tokenizer()
        text = CLIPTextModel(CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, **CLIP_L14))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**VAE_15), text_encoder=text, tokenizer=tok, unet=UNet2DConditionModel(**UNET_15),
            scheduler=tiny_sd.sd_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        print(f"parameters: UNet {params(pipe.unet) / 1e6:.0f} M, CLIP text {params(text) / 1e6:.0f} M, "
              f"VAE {params(pipe.vae) / 1e6:.0f} M", flush=True)
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny fp32 models on the CPU")
    ap.add_argument("--root", default=None, help="where the random-weight folders go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--steps", type=int, default=None, help="default 30 (3 with --tiny)")
    ap.add_argument("--batches", default=None, help="default 1,8 (1,2 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3, 1 with --tiny)")
    a = ap.parse_args()
    device = torch.device("cpu" if a.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny on a CPU", file=sys.stderr)
        return 2
    dtype = torch.float32 if a.tiny else torch.float16
    steps = a.steps or (3 if a.tiny else 30)
    batches = [int(b) for b in (a.batches or ("1,2" if a.tiny else "1,8")).split(",")]
    repeats = a.repeats or (1 if a.tiny else 3)
    root = Path(a.root or tempfile.mkdtemp(prefix="sd-bench-"))
    t0 = time.perf_counter()
    folder = build(root, a.tiny)
    print(f"model folder {folder} ({time.perf_counter() - t0:.1f} s)", flush=True)

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    model = load_model(str(folder), device)
    spec = Scheduler(model.scheduler_name, model.scheduler_config, steps)
    sampling = Sampling(spec.timesteps(), GUIDANCE, scheduler=spec)
    results = []
    for n in batches:
        seeds = list(range(n))

        def diffusers_run():
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            return pipe([PROMPT] * n, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=gens,
                        output_type="pt").images.float().cpu()

        def mirage_run():
            return ((tasks.sample(model, PROMPT, seeds, sampling) + 1) / 2).float().cpu()

        d_s, d_peak, d_img = timed(diffusers_run, repeats, device)
        m_s, m_peak, m_img = timed(mirage_run, repeats, device)
        row = dict(batch=n, steps=steps, diffusers_s=round(d_s, 4), mirage_s=round(m_s, 4),
                   speedup=round(d_s / m_s, 3), diffusers_peak_gib=round(d_peak / 2**30, 3),
                   mirage_peak_gib=round(m_peak / 2**30, 3), max_abs_diff=float((d_img - m_img).abs().max()))
        results.append(row)
        print(f"batch {n}: StableDiffusionPipeline {d_s:.3f} s, peak {row['diffusers_peak_gib']} GiB | mirage "
              f"{m_s:.3f} s, peak {row['mirage_peak_gib']} GiB | {row['speedup']}x | max |diff| "
              f"{row['max_abs_diff']:.2e}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak host RSS {rss:.2f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=str(device), dtype=str(dtype), results=results,
                                                peak_rss_gib=round(rss, 3)), indent=1))
    if a.tiny and any(r["max_abs_diff"] > 1e-4 for r in results):
        print("mirage and StableDiffusionPipeline made different images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
