"""Time of CLIP scoring (issue 15): 64 candidates of a 2-view 256-px anagram judged by CLIP, with random
weights at the ViT-B/32 and ViT-L/14 sizes (fp16 on a GPU), through mirage's own loading and scoring code.
The target: scoring takes under 5 % of the time it took to make the candidates.

    python bench/clip_score.py [--device cuda] [--n 64] [--size 256] [--repeats 5] [--make-seconds S] [--json F]
    python bench/clip_score.py --tiny      # tiny towers on the CPU: a test of this script, in seconds

Each model is built from its CLIPConfig with random weights, saved in the hub's layout (with a byte-level BPE
tokenizer and CLIP's image processor settings) and loaded with quality.clip.ClipJudge.load, as `mirage score
--clip` loads one. The scoring time is that of quality.clip.judge_scores on all candidates at once (the image
processor on every view, the vision tower, the prompts), split into its parts below. --make-seconds gives the
time to make the candidates (e.g. from bench/if_gpu.py) to print the ratio; without it the ratio is against an
estimate from bench/if_gpu_h100.log (8 stage-I anagram candidates in 6.23 s on an H100, so 64 in ~50 s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src")]
from mirage.illusions.views import parse_views
from mirage.quality import clip

# (text tower, vision tower, projection) as in openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14
SIZES = {
    "ViT-B/32": ({"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
                 {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "patch_size": 32, "image_size": 224}, 512),
    "ViT-L/14": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
                 {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "patch_size": 14, "image_size": 224}, 768),
}
TINY = {"tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
                 {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "patch_size": 8, "image_size": 32}, 16)}
PUBLISHED_PARAMS = {"ViT-B/32": 151.3e6, "ViT-L/14": 427.6e6}  # CLIPModel parameters of the published models
VOCAB = 49408  # CLIP's vocabulary (the embedding table's size; the benchmark tokenizer uses a few of its ids)
PROMPTS = ["an oil painting of people around a campfire", "an oil painting of an old man"]
IF_ESTIMATE_S = 6.23 * 64 / 8  # bench/if_gpu_h100.log: 8 stage-I 2-view anagram candidates in 6.23 s


def byte_symbols() -> list[str]:
    shown = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in shown else chr(next(extra)) for b in range(256)]


def tokenizer(words: list[str]):
    """CLIP's byte-level BPE over the bytes, with merges that spell `words` whole."""
    from transformers import CLIPTokenizer

    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            if (parts[0], parts[1]) not in merges:
                merges.append((parts[0], parts[1]))
                vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build(folder: Path, name: str, towers, device: torch.device, dtype: torch.dtype) -> float:
    """A random-weight CLIP of these sizes saved in the hub's layout; returns its parameter count."""
    from transformers import CLIPConfig, CLIPModel

    text, vision, projection = towers
    tok = tokenizer(" ".join(PROMPTS).split())
    config = CLIPConfig(text_config={**text, "vocab_size": VOCAB, "max_position_embeddings": 77,
                                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                     "pad_token_id": tok.eos_token_id},
                        vision_config=vision, projection_dim=projection)
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(config).to(dtype).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    side = vision["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": side},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True}))
    params = sum(p.numel() for p in model.parameters())
    del model
    return params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench(name: str, towers, root: Path, device: torch.device, n: int, size: int, repeats: int) -> dict:
    folder = root / name.replace("/", "-")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    params = build(folder, name, towers, device, dtype)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    judge = clip.ClipJudge.load(str(folder), device)
    sync(device)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1  # the candidates, as the pipeline hands them over
    maps = [v.view for v in parse_views(["identity", "flip"], 0)]
    views = torch.cat([m(images) for m in maps])

    def score():
        judge._texts.clear()  # the prompts are encoded afresh each time, as for a new run
        return clip.judge_scores(judge, images, PROMPTS, maps)

    total_s, (a, c) = timed(score, device, repeats)
    process_s, pixels = timed(lambda: judge.pixel_values(views), device, repeats)
    pixels = pixels.to(device, judge.dtype)

    @torch.inference_mode()
    def vision():
        return [judge.model.get_image_features(pixel_values=p) for p in pixels.split(clip.BATCH)]

    vision_s, _ = timed(vision, device, repeats)
    text_s, _ = timed(lambda: (judge._texts.clear(), judge.text_features(PROMPTS)), device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    judge.free()
    return {"model": name, "params": params, "dtype": str(dtype).removeprefix("torch."), "build_s": build_s,
            "load_s": load_s, "candidates": n, "views": len(maps), "size": size, "score_s": total_s,
            "per_candidate_ms": 1000 * total_s / n, "image_processor_s": process_s, "vision_s": vision_s,
            "text_s": text_s, "peak_gib": peak, "finite": bool(torch.isfinite(a).all() and torch.isfinite(c).all())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny towers on the CPU (a test of this script)")
    p.add_argument("--device", default=None, help="default: cuda if there is one (cpu with --tiny)")
    p.add_argument("--n", type=int, default=64, help="candidates (default 64)")
    p.add_argument("--size", type=int, default=256, help="candidate size in px (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after a warm-up (default 5; 1 with --tiny)")
    p.add_argument("--make-seconds", type=float, default=None,
                   help="time it took to make the candidates, for the ratio (default: an estimate for IF on an "
                        f"H100, {IF_ESTIMATE_S:.0f} s for 64 stage-I anagram candidates)")
    p.add_argument("--root", type=Path, help="where the random-weight models are built (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    repeats = args.repeats if not args.tiny or args.repeats != 5 else 1
    sizes = TINY if args.tiny else SIZES
    make_s = args.make_seconds or IF_ESTIMATE_S * args.n / 64
    what = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    print(f"CLIP scoring benchmark: {args.n} candidates of a 2-view {args.size}-px anagram, random weights, "
          f"{what}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        results = []
        for name, towers in sizes.items():
            r = bench(name, towers, root, device, args.n, args.size, repeats)
            r["make_s"], r["ratio"] = make_s, r["score_s"] / make_s
            results.append(r)
            published = PUBLISHED_PARAMS.get(name)
            size_note = f" (published {published / 1e6:.1f} M)" if published else ""
            print(f"{name}: {r['params'] / 1e6:.1f} M parameters{size_note}, {r['dtype']}; built in "
                  f"{r['build_s']:.1f} s, loaded in {r['load_s']:.2f} s"
                  + (f", peak {r['peak_gib']:.2f} GiB on the GPU" if r["peak_gib"] is not None else ""))
            print(f"  scoring {r['candidates']} candidates x {r['views']} views: {r['score_s']:.3f} s "
                  f"({r['per_candidate_ms']:.2f} ms a candidate); of it, image processor {r['image_processor_s']:.3f} s,"
                  f" vision tower {r['vision_s']:.3f} s, prompts {r['text_s']:.4f} s")
            met = "met" if r["ratio"] < 0.05 else "NOT met"
            print(f"  against {make_s:.1f} s to make them: {100 * r['ratio']:.2f} % (target < 5 %: {met})"
                  + ("" if r["finite"] else "  NON-FINITE SCORES"))
    if args.json:
        args.json.write_text(json.dumps({"device": what, "results": results}, indent=2) + "\n")
    return 0 if all(r["finite"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
