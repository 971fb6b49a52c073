"""Stable Diffusion, assembled from its parts, and the x4 upscaler, as Denoisers in VAE latent space.

As the walk-through builds it: `AutoencoderKL` (image <-> latents, times its scaling factor),
`CLIPTextModel` + `CLIPTokenizer` (prompts -> embeddings, cached on disk, the encoder loaded for the prompts
not seen yet and freed: prompts.ClipPromptEncoder), `UNet2DConditionModel` (loaded on first call, under a
memory plan, with CUDA graphs and on request compiled blocks: runtime.py, as for IF) and the folder's scheduler
config (engine Sampling.scheduler via schedulers.py). The model works in latents; it says how to enter and
leave them (`encode_image`, `decode`), what they look like (`space_shape`) and which views act on their grid
(a latent cell is a `factor` x `factor` pixel block: flips, rotations and whole-cell permutations commute with
the VAE, negate and pixel permutations do not). Tasks and the loop never ask more.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.backends import hub
from mirage.backends.prompts import ClipPromptEncoder
from mirage.backends.runtime import UNetRuntime
from mirage.backends.schedulers import own_name
from mirage.engine.denoiser import Cond
from mirage.engine.sample import Noise
from mirage.engine.schedule import Schedule
from mirage.errors import MirageError, UsageError

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
PUBLISHED = ("CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5",
             "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1")
UPSCALERS = ("stabilityai/stable-diffusion-x4-upscaler",)
PARTS = (hub.UNET, hub.VAE, hub.SCHEDULER, hub.TEXT_ENCODER, hub.TOKENIZER)
# the views that act on a latent grid (every piece whole latent cells); negate and pixel_permute do not
LATENT_VIEWS = ("identity", "flip", "mirror", "rotate_cw", "rotate_ccw", "rotate_180", "skew", "patch_permute",
                "jigsaw", "inner_circle", "square_hinge")
LATENT_HYBRIDS = ("lowhigh", "lowmidhigh")  # blurs on the latent grid; gray/color and motion need pixels


def kind_of(ref: str) -> str | None:
    """"sd", "upscale", or None where `ref` is no Stable Diffusion model (found without loading weights)."""
    if Path(ref).expanduser().is_dir():
        index = hub.model_index(ref)
        name = (index or {}).get("_class_name")
        return "sd" if name in SD_PIPELINES else "upscale" if name == UPSCALE_PIPELINE else None
    if ref in UPSCALERS or "upscaler" in ref.lower() and "stable-diffusion" in ref.lower():
        return "upscale"
    if ref in PUBLISHED or "stable-diffusion" in ref.lower():
        return "sd"
    return None


def load_sd(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            size: int | None = None, memory: str = "auto", compile: bool | str | None = False,
            cache_dir: str | Path | None = None):
    """StableDiffusion or SDUpscaler, whichever `ref` is."""
    cls = SDUpscaler if kind_of(ref) == "upscale" else StableDiffusion
    return cls(ref, device, dtype, size, memory, compile, cache_dir)


class StableDiffusion(UNetRuntime):
    """A Stable Diffusion folder (or hub id) as a Denoiser in its VAE's latent space. `memory` and `compile`
    are the UNet's memory plan and compiling request (runtime.UNetRuntime); the VAE and the text encoder are
    small and load whole on the device."""

    space_name = "Stable Diffusion's latent grid"
    view_names = LATENT_VIEWS
    hybrid_kinds = LATENT_HYBRIDS
    is_upscaler = False
    parts = PARTS

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 size: int | None = None, memory: str = "auto", compile: bool | str | None = False,
                 cache_dir: str | Path | None = None):
        self._device = torch.device(device)
        self._dtype = dtype or hub.default_dtype(self._device)
        self.ref = ref
        try:
            self.folder = hub.resolve(ref, self.parts, self._dtype)
        except MirageError as e:  # a local folder lacking a part is bad input; a failed download is not
            if hub.hub_id(ref) is not None:
                raise
            raise UsageError(f"{e} (a Stable Diffusion folder needs {', '.join(self.parts)})") from None
        self.index = hub.model_index(str(self.folder)) or {}
        want = UPSCALE_PIPELINE if self.is_upscaler else "StableDiffusionPipeline"
        if self.index.get("_class_name") == UPSCALE_PIPELINE and not self.is_upscaler:
            raise UsageError(f"{ref} is the x4 upscaler: use `mirage upscale --model {ref}` or --stage3 {ref}")
        self.unet_config = hub.read_config(self.folder, hub.UNET)
        self.vae_config = hub.read_config(self.folder, hub.VAE)
        text_config = hub.read_config(self.folder, hub.TEXT_ENCODER)
        self.scheduler_config = hub.read_config(self.folder, hub.SCHEDULER)
        self.schedule = Schedule.from_config(self.scheduler_config)
        self.scheduler_name = own_name(self.scheduler_config) or "ddim"
        self.latent_channels = self.vae_config.get("latent_channels", 4)
        self.factor = 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)
        self.scaling = self.vae_config.get("scaling_factor", 0.18215)
        self.channels = self.vae_config.get("in_channels", 3)
        self.cond_channels = self.unet_config.get("in_channels", 0) - self.latent_channels
        if self.cond_channels != (self.channels if self.is_upscaler else 0):
            raise UsageError(f"{ref}: the VAE makes {self.latent_channels}-channel latents but the UNet takes "
                              f"{self.unet_config.get('in_channels')} input channels: the parts do not match "
                              f"(a {want} needs {self.latent_channels + (self.channels if self.is_upscaler else 0)})")
        width = text_config.get("hidden_size")
        if self.unet_config.get("cross_attention_dim") != width:
            raise UsageError(f"{ref}: the text encoder gives {width}-wide embeddings but the UNet attends to "
                              f"{self.unet_config.get('cross_attention_dim')}: the parts do not match")
        self.unit = self.factor * 2 ** (len(self.unet_config.get("block_out_channels", [0])) - 1)
        sample = self.unet_config.get("sample_size", 64)
        self.default_size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * self.factor
        self.size = self.default_size
        if size is not None:
            self.set_size(size)
        self.text = ClipPromptEncoder(ref, self._device, self._dtype, cache_dir)
        self._vae = None
        # NCHW: channels-last does not make batch 8 fast (bench/sd_gpu_b8_nhwc_h100.log: compiled NHWC 1.60 s against
        # StableDiffusionPipeline's 1.80 s on an H100, 1.13x; compiled NCHW was 1.19x on an H200)
        self._init_runtime(memory, compile, channels_last=False)

    # ---- what the seam asks -------------------------------------------------------------------------
    @property
    def space_shape(self) -> tuple[int, int, int]:
        side = self.size // self.factor
        return (self.latent_channels, side, side)

    def set_size(self, size: int) -> None:
        """Images of `size` px a side: a multiple of the VAE factor times the UNet's downsampling."""
        if not isinstance(size, int) or size <= 0 or size % self.unit:
            raise UsageError(f"--size {size} does not fit {self.ref}: use a multiple of {self.unit} px (its VAE "
                             f"factor {self.factor} x the UNet's downsampling), e.g. {self.default_size}")
        self.size = size

    def encode(self, prompts: list[str]) -> Cond:
        return Cond(embeds=self.text.encode(prompts))

    def encode_image(self, images: Tensor, noise: Noise | None = None) -> Tensor:
        """Images in [-1, 1] -> latents x scaling factor: a sample of the VAE's posterior drawn from each
        image's own generator (as the img2img pipeline does), or its mean without `noise`."""
        with torch.no_grad():
            dist = self.vae().encode(images.to(self._device, self._dtype)).latent_dist
            if noise is None:
                z = dist.mean
            else:
                z = dist.mean + dist.std * noise.draw(dist.mean.shape[1:]).to(dist.mean)
        return (self.scaling * z).float()

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [-1, 1]; one image at a time on a GPU (the VAE's peak memory is large)."""
        per = 1 if self._device.type == "cuda" else len(x)
        vae = self.vae()
        with torch.no_grad():
            parts = [vae.decode((x[i:i + per] / self.scaling).to(self._device, self._dtype), return_dict=False)[0]
                     for i in range(0, len(x), per)]
        return torch.cat(parts).float().clamp(-1, 1)

    def __call__(self, x: Tensor, t, cond: Cond) -> tuple[Tensor, Tensor | None]:
        if self.is_upscaler and (cond.image is None or cond.level is None):
            raise ValueError("the upscaler needs cond.image and cond.level (from noised_condition)")
        return self._run(x, t, cond), None

    # ---- the VAE, loaded when first needed (the UNet: runtime.UNetRuntime) ---------------------------
    def vae(self):
        import diffusers  # here, as hub's loaders do: importing it would cost every built-in model's run 1.5 s

        if self._vae is None:
            with hub._loading(self.folder, hub.VAE):
                self._vae = diffusers.AutoencoderKL.from_pretrained(
                    self.folder, subfolder=hub.VAE, dtype=self._dtype, use_safetensors=True,
                    variant=hub.variant(self.folder / hub.VAE, self._dtype)).to(self._device).eval()
            if self.size > 1024:
                self._vae.enable_tiling()
        return self._vae

    def free(self) -> None:
        self._vae = None
        super().free()


class SDUpscaler(StableDiffusion):
    """The x4 upscaler: latents at the low-res image's size, that image (noised to a level, which the UNet
    takes as its class label) concatenated to them, decoded `factor` times larger."""

    is_upscaler = True
    parts = PARTS + (hub.LOW_RES,)
    draws_condition_first = True  # StableDiffusionUpscalePipeline noises the image before drawing latents

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 size: int | None = None, memory: str = "auto", compile: bool | str | None = False,
                 cache_dir: str | Path | None = None):
        import diffusers

        super().__init__(ref, device, dtype, size, memory, compile, cache_dir)
        self.low_res_scheduler = diffusers.DDPMScheduler.from_config(hub.read_config(self.folder, hub.LOW_RES))
        self.max_noise_level = self.index.get("max_noise_level", 350)

    def noised_condition(self, low_res: Tensor, noise: Tensor, level: int) -> tuple[Tensor, Tensor]:
        if not 0 <= level <= self.max_noise_level:
            raise UsageError(f"--noise-level must be between 0 and {self.max_noise_level} for {self.ref}, "
                             f"got {level}")
        side = self.space_shape[-1]
        if low_res.shape[-1] != side:
            low_res = F.interpolate(low_res, (side, side), mode="bicubic", align_corners=False).clamp(-1, 1)
        levels = torch.full((low_res.shape[0],), level, dtype=torch.long, device=low_res.device)
        return self.low_res_scheduler.add_noise(low_res, noise.to(low_res), levels), levels
