"""Tiny random-weight DeepFloyd IF stage I and stage II, saved in the hub's layout.

The configs keep the real IF structure (IFPipeline / IFSuperResolutionPipeline folders, learned-range
variance so out_channels = 2 x image channels, T5 embeddings projected by encoder_hid_proj and pooled into
the time embedding, stage II's noise level as a "timestep" class embedding, IF's scheduler configs) at a
size that builds and runs in well under a second on a CPU. Both folders load with diffusers' own
`from_pretrained` (safety_checker=None, watermarker=None, feature_extractor=None), so tests can compare
mirage with the pipelines. Stage I also carries fp16-variant files, as the published repos do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    IFPipeline,
    IFSuperResolutionPipeline,
    UNet2DConditionModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

T5_DIM = 32  # d_model of the tiny T5 (4096 for T5 v1.1 XXL)
CROSS_DIM = 64  # cross_attention_dim, deliberately != T5_DIM so encoder_hid_proj is exercised
STAGE_I_SIZE, STAGE_II_SIZE = 16, 32

WORDS = ("a an the of in on at with and photo painting oil old man woman dog cat people campfire rocket ship "
         "hat coast waterfalls lithograph pencil snowy mountain village skull high quality").split()


@dataclass(frozen=True)
class TinyIF:
    stage_1: Path  # IFPipeline layout: unet, scheduler, text_encoder, tokenizer (+ fp16 variants)
    stage_2: Path  # IFSuperResolutionPipeline layout: unet, scheduler, image_noising_scheduler


def tokenizer() -> T5Tokenizer:
    """A T5 (Unigram, sentencepiece-style) tokenizer over a few words and all letters, built offline."""
    pieces = [(f"\u2581{w}", -1.0) for w in WORDS]
    pieces += [(f"\u2581{c}", -8.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(c, -9.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'!?-"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=8)


def text_encoder(vocab_size: int) -> T5EncoderModel:
    # T5 v1.1 (as IF uses): gated-GELU feed-forward, untied embeddings.
    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def _unet(**kw) -> UNet2DConditionModel:
    common = dict(
        layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=CROSS_DIM, encoder_hid_dim=T5_DIM, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu", upcast_attention=False,
    )
    return UNet2DConditionModel(**(common | kw)).eval()


def stage_1_unet() -> UNet2DConditionModel:
    return _unet(sample_size=STAGE_I_SIZE, in_channels=3, out_channels=6)


def stage_2_unet() -> UNet2DConditionModel:
    # IF-II: the upscaled image is concatenated (6 in), the noise level enters as a timestep class label.
    return _unet(sample_size=STAGE_II_SIZE, in_channels=6, out_channels=6, layers_per_block=(1, 2),
                 class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                 time_embedding_dim=128)


def scheduler(sample_max_value: float) -> DDPMScheduler:
    """IF's denoising scheduler (1.5 for stage I, 1.0 for stage II, as the published configs)."""
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                         prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95,
                         sample_max_value=sample_max_value, clip_sample=True)


def build(root: Path, seed: int = 0) -> TinyIF:
    """Save both stages under `root`; the global RNG is left as it was."""
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tokenizer()
        stage_1 = IFPipeline(tokenizer=tok, text_encoder=text_encoder(len(tok)), unet=stage_1_unet(),
                             scheduler=scheduler(1.5), safety_checker=None, feature_extractor=None,
                             watermarker=None, requires_safety_checker=False)
        stage_2 = IFSuperResolutionPipeline(
            tokenizer=None, text_encoder=None, unet=stage_2_unet(), scheduler=scheduler(1.0),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), safety_checker=None,
            feature_extractor=None, watermarker=None, requires_safety_checker=False)
    out = TinyIF(root / "IF-I-tiny", root / "IF-II-tiny")
    # fp16 variant first: each save rewrites the configs, and they must say float32 as the published ones do
    # (transformers loads with the dtype a config names when none is asked for).
    copy.deepcopy(stage_1).to(torch.float16).save_pretrained(out.stage_1, safe_serialization=True, variant="fp16")
    stage_1.save_pretrained(out.stage_1, safe_serialization=True)
    stage_2.save_pretrained(out.stage_2, safe_serialization=True)
    return out


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    print(build(Path(sys.argv[1])), f"{time.perf_counter() - t0:.2f} s")
