"""Tiny random-weight Stable Diffusion and x4-upscaler folders in the hub's layout, built offline.

The configs are those of diffusers' own pipeline tests (UNet with block_out_channels (32, 64), a 2-block
AutoencoderKL, a CLIP text model with 32-wide embeddings) made smaller still to run in well under a second:
one layer per block, 2 CLIP layers, 8x8 latents (16 px images: the 2-block VAE's factor is 2). The CLIP BPE
tokenizer is written here from a small vocab and merges list. SD's folder carries SD 1.x's own scheduler
(PNDM, scaled_linear betas 0.00085-0.012, steps_offset 1); the upscaler's is DDIM with v-prediction, its
noise level a class label, as the published x4 upscaler. Both load with diffusers' from_pretrained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
import tiny_clip
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

WORDS = ("a an the of photo painting cat dog red blue old man woman rocket ship hat snowy mountain village "
         "skull high quality").split()
WIDTH = 32  # CLIP's hidden size = the UNet's cross_attention_dim
LATENT = 8  # latent side; images are 2x that


@dataclass(frozen=True)
class TinySD:
    sd: Path  # StableDiffusionPipeline layout
    upscaler: Path  # StableDiffusionUpscalePipeline layout


def tokenizer() -> CLIPTokenizer:
    return tiny_clip.tokenizer(WORDS)


def text_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=WIDTH, intermediate_size=37,
                            layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok))
    return CLIPTextModel(config).eval()


def unet(in_channels: int = 4, **kw) -> UNet2DConditionModel:
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=LATENT,
                                in_channels=in_channels, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=WIDTH,
                                attention_head_dim=8, norm_num_groups=8, **kw).eval()


def vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, scaling_factor=scaling_factor,
                         down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
                         norm_num_groups=8).eval()


def sd_scheduler() -> PNDMScheduler:
    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False)


NO_EXTRAS = dict(safety_checker=None, feature_extractor=None)


def build(root: Path, seed: int = 0) -> TinySD:
    root = Path(root)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tokenizer()
        pipe = StableDiffusionPipeline(vae=vae(), text_encoder=text_encoder(tok), tokenizer=tok, unet=unet(),
                                       scheduler=sd_scheduler(), requires_safety_checker=False, **NO_EXTRAS)
        up = StableDiffusionUpscalePipeline(
            vae=vae(scaling_factor=0.08333), text_encoder=text_encoder(tok), tokenizer=tok,
            unet=unet(in_channels=7, num_class_embeds=351, use_linear_projection=True),
            low_res_scheduler=DDPMScheduler(),
            scheduler=DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                    beta_start=0.0001, beta_end=0.02, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1),
            watermarker=None, max_noise_level=350, **NO_EXTRAS)
    out = TinySD(root / "SD-tiny", root / "SD-x4-tiny")
    pipe.save_pretrained(out.sd, safe_serialization=True)
    up.save_pretrained(out.upscaler, safe_serialization=True)
    return out

