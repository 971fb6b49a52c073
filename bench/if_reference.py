"""A home-made reference loop for a visual anagram with DeepFloyd IF: NOT visual_anagrams and not the anchor.

It is kept only as a correctness check of mirage's loop on tiny fp32 models on a CPU (bench/if_gpu.py --tiny),
where visual_anagrams' own sampler cannot run (it asks for CUDA). It calls the conditional and unconditional
branches and each view separately, one image at a time, which visual_anagrams does not (it batches them), so it
is slower than the real thing (12.2 s against 4.4 s on an H100) and no speed is ever compared with it. The
speed anchor of bench/if_gpu.py is visual_anagrams' own `sample_stage_1` / `sample_stage_2`, fetched at
benchmark time, and diffusers' IF pipelines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@torch.no_grad()
def anagram(unet, scheduler_config: dict, views, conds: list, null, steps: int, guidance: float, seed: int,
            low_res=None, noising_config: dict | None = None, noise_level: int = 250):
    """One image: stage I from noise, or stage II upscaling `low_res` [1, 3, h, w] (with noising_config)."""
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = DDPMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    x = torch.randn(1, 3, size, size, generator=generator).to(device, dtype)
    image = labels = None
    if low_res is not None:
        up = F.interpolate(low_res.to(device, torch.float32), (size, size), mode="bilinear", align_corners=True)
        labels = torch.tensor([noise_level], device=device)
        noise = torch.randn(up.shape, generator=generator).to(device)
        image = DDPMScheduler.from_config(noising_config).add_noise(up, noise, labels).to(dtype)
    for t in scheduler.timesteps:
        eps_views, var_views = [], []
        for view, cond in zip(views, conds):
            inp = view.view(x)
            if image is not None:
                inp = torch.cat([inp, view.view(image)], dim=1)
            out_u = unet(inp, t, encoder_hidden_states=null, class_labels=labels).sample
            out_c = unet(inp, t, encoder_hidden_states=cond, class_labels=labels).sample
            eps_u, _ = out_u.split(3, dim=1)
            eps_c, var_c = out_c.split(3, dim=1)
            eps_views.append(view.inverse(eps_u + guidance * (eps_c - eps_u)))
            var_views.append(view.inverse_variance(var_c))
        prediction = torch.cat([torch.stack(eps_views).mean(0), torch.stack(var_views).mean(0)], dim=1)
        x = scheduler.step(prediction, t, x, generator=generator).prev_sample
    return x
