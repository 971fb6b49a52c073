"""DeepFloyd IF at its published sizes with random weights, saved in the hub layout, for benchmarks.

The UNet configs follow the structure diffusers' IF conversion script (scripts/convert_if.py) derives from
DeepFloyd's checkpoints: IF-I has a ResnetDownsampleBlock2D then SimpleCrossAttn blocks, 3 layers a block,
group-norm cross attention over T5 embeddings projected by encoder_hid_proj and pooled into the time
embedding (64 heads), scale-shift resnets and GELU; IF-II concatenates the upscaled image (6 input
channels), takes the noise level as a timestep class embedding, and has 5 blocks of 2, 2, 3, 5, 5 layers
with attention in the two lowest. The widths were chosen so that the parameter counts are the published
ones (IF-I-XL 4.30 B, IF-II-L 1.19 B; checked by tests/test_bench.py); stage I's FLOPs a call (2.9 TFLOP
an image) match the published reference timings. T5 is google/t5-v1_1-xxl's encoder (4.76 B).

`build` makes the models on the given device in fp32, casts them to the dtype and writes fp16-variant
safetensors files (T5 sharded, as the published repo is) with the configs mirage and diffusers read.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_if import tokenizer  # noqa: E402 - a small offline T5 tokenizer; only token ids matter here

_UNET = dict(act_fn="gelu", addition_embed_type="text", addition_embed_type_num_heads=64, attention_head_dim=64,
             cross_attention_norm="group_norm", mid_block_type="UNetMidBlock2DSimpleCrossAttn",
             resnet_time_scale_shift="scale_shift", upcast_attention=False, out_channels=6)
_STAGE_I = dict(_UNET, in_channels=3, layers_per_block=3,
                down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",))
_STAGE_II = dict(_UNET, in_channels=6, layers_per_block=(2, 2, 3, 5, 5), class_embed_type="timestep",
                 mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                 down_block_types=("ResnetDownsampleBlock2D",) * 3 + ("SimpleCrossAttnDownBlock2D",) * 2,
                 up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",) * 3)
_T5 = dict(vocab_size=32128, d_kv=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
           dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6)


def _widths(base: int, mults) -> tuple[int, ...]:
    return tuple(base * m for m in mults)


@dataclass(frozen=True)
class Arch:
    name: str
    stage_1: dict
    stage_2: dict
    t5: dict
    shard_bytes: int  # T5 files are split at this size


PUBLISHED = Arch(
    "published",
    dict(_STAGE_I, sample_size=64, block_out_channels=_widths(704, (1, 2, 3, 4)), cross_attention_dim=2816,
         encoder_hid_dim=4096),
    dict(_STAGE_II, sample_size=256, block_out_channels=_widths(160, (1, 2, 4, 6, 8)), cross_attention_dim=1280,
         encoder_hid_dim=4096),
    dict(_T5, d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
    shard_bytes=5 * 10**9)

# The same structure at a size a CPU runs in a moment (heads of 8 channels instead of 64).
TINY = Arch(
    "tiny",
    dict(_STAGE_I, sample_size=16, block_out_channels=_widths(32, (1, 1, 2, 2)), cross_attention_dim=64,
         encoder_hid_dim=32, attention_head_dim=16, addition_embed_type_num_heads=2, layers_per_block=1),
    dict(_STAGE_II, sample_size=32, block_out_channels=_widths(32, (1, 1, 1, 2, 2)), cross_attention_dim=64,
         encoder_hid_dim=32, attention_head_dim=16, addition_embed_type_num_heads=2, layers_per_block=1),
    dict(_T5, vocab_size=128, d_model=32, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    shard_bytes=20_000)

# The published structure (blocks, layers, attention, activations) at narrow widths, for studies of compiling on
# a CPU: what dynamo traces depends on the structure and on which sizes are 1 (TINY's 32 channels in 32 groups
# are), not on the widths.
NARROW = Arch(
    "narrow",
    dict(_STAGE_I, sample_size=16, block_out_channels=_widths(64, (1, 2, 3, 4)), cross_attention_dim=64,
         encoder_hid_dim=32, attention_head_dim=16, addition_embed_type_num_heads=2),
    dict(_STAGE_II, sample_size=32, block_out_channels=_widths(64, (1, 2, 4, 6, 8)), cross_attention_dim=64,
         encoder_hid_dim=32, attention_head_dim=16, addition_embed_type_num_heads=2),
    TINY.t5, shard_bytes=10**9)


def _scheduler(sample_max_value: float | None):
    from diffusers import DDPMScheduler

    if sample_max_value is None:  # the image-noising scheduler of stage II
        return DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", prediction_type="epsilon",
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=sample_max_value)


def parameters(config: dict, kind: str = "unet") -> int:
    """Parameter count of a config, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return sum(p.numel() for p in _model(config, kind).parameters())


def _model(config: dict, kind: str):
    if kind == "t5":
        from transformers import T5Config, T5EncoderModel

        return T5EncoderModel(T5Config(**config))
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def build(root: Path, arch: Arch, device: torch.device, dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """(stage-I folder, stage-II folder) under root, made once: an existing complete build is reused."""
    stage_1, stage_2 = Path(root) / f"IF-I-{arch.name}", Path(root) / f"IF-II-{arch.name}"
    done = Path(root) / f"{arch.name}.done"
    if done.is_file():
        return stage_1, stage_2
    torch.manual_seed(0)
    for config, kind, folder, stem, shard in ((arch.stage_1, "unet", stage_1 / "unet", "diffusion_pytorch_model", None),
                                              (arch.stage_2, "unet", stage_2 / "unet", "diffusion_pytorch_model", None),
                                              (arch.t5, "t5", stage_1 / "text_encoder", "model", arch.shard_bytes)):
        with torch.device(device):  # random init of billions of weights is quick on a GPU, slow on a CPU
            model = _model(config, kind)
        _save_model(model, folder, stem, dtype, shard)
        del model
    tokenizer().save_pretrained(stage_1 / "tokenizer")
    _scheduler(1.5).save_config(stage_1 / "scheduler")
    _scheduler(1.0).save_config(stage_2 / "scheduler")
    _scheduler(None).save_config(stage_2 / "image_noising_scheduler")
    for folder, pipeline in ((stage_1, "IFPipeline"), (stage_2, "IFSuperResolutionPipeline")):
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    done.write_text("ok")
    return stage_1, stage_2


def _save_model(model, folder: Path, stem: str, dtype, shard_bytes: int | None) -> None:
    """The weights as `stem`.fp16[-0000k-of-0000n].safetensors (+ an index when sharded) and the config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.save_config(folder) if hasattr(model, "save_config") else model.config.save_pretrained(folder)
    seen, state = set(), {}
    for k, v in model.state_dict().items():  # tied weights (T5's shared embedding) are written once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[k] = v
    shards, current, size = [], {}, 0
    for name, t in state.items():
        if shard_bytes and current and size + t.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    names = [f"{stem}.fp16.safetensors"] if len(shards) == 1 else \
        [f"{stem}.fp16-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / f"{name}.tmp"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (folder / f"{stem}.safetensors.index.fp16.json").write_text(json.dumps(index, indent=1))
    del model, state, shards, current
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
