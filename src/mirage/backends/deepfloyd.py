"""DeepFloyd IF stage I (text -> 64 px) and stage II (64 -> 256 px upscaler) as Denoisers, via diffusers.

Sizes, channels and schedules come from the model's own configs. The UNet is loaded on the first call, so
that prompts are encoded (and T5 freed) before it takes any memory, under a memory plan (memory.py) chosen
then from the free memory, or named. On a GPU with the whole UNet resident, each input shape's call is
captured once as a CUDA graph and replayed. A CUDA out-of-memory error drops the graphs, then moves to the
next leaner plan, with a one-line note, and the call is retried.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mirage.backends import hub, memory
from mirage.backends.memory import check_plan
from mirage.backends.prompts import PromptEncoder
from mirage.engine.denoiser import Cond
from mirage.engine.schedule import Schedule
from mirage.errors import MirageError, UsageError

# torch.compile's default mode fuses the UNets' elementwise work (40 % of stage I's GPU time at batch 4) into
# the convolutions' neighbours: on an H100 (bench/if_profile.py) stage I at batch 4 goes from 43.9 to 32.2 ms,
# at batch 16 from 40 % to 60 % of peak, stage II at batch 4 from 66.5 to 38.2 ms; each new batch shape
# costs 70-130 s of compiling the first time (inductor caches it on disk for the next run).
COMPILE_MODE = "default"


def load_stage(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               memory: str = "auto", text_encoder_from: str | None = None, cache_dir: str | Path | None = None,
               compile: bool = False):
    """IFStage or IFUpscaler, whichever `ref` is: stage II's UNet takes more channels than it denoises
    (the upscaled low-res image is concatenated to its input)."""
    check_plan(memory)
    dtype = dtype or hub.default_dtype(device)
    folder = hub.resolve(ref, (hub.UNET, hub.SCHEDULER), dtype)
    sched_cfg = hub.read_config(folder, hub.SCHEDULER)
    _, cond_channels, _ = _shape(hub.read_config(folder, hub.UNET), _learned(sched_cfg), folder)
    cls = IFUpscaler if cond_channels else IFStage
    return cls(ref, device, dtype, text_encoder=text_encoder_from, cache_dir=cache_dir, memory=memory,
               compile=compile)


class IFStage:
    """One IF stage (stage I here, stage II in IFUpscaler) from a hub id or a folder in the hub's layout.

    Prompts are encoded by the T5 of `text_encoder` (default: `ref` itself); give stage II the stage-I
    model there, whose T5 IF shares. `memory` is a plan name (memory.PLANS); `plan` is the plan in force
    once the UNet has loaded. Results come back on `device` whatever the plan computes on. `compile`
    torch.compiles the UNet where it runs from CUDA graphs, resident on a GPU.
    """

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None, memory: str = "auto",
                 compile: bool = False):
        self._device = torch.device(device)
        self._dtype = dtype or hub.default_dtype(self._device)
        self.ref = ref
        self.folder = hub.resolve(ref, (hub.UNET, hub.SCHEDULER), self._dtype)
        unet_cfg = hub.read_config(self.folder, hub.UNET)
        sched_cfg = hub.read_config(self.folder, hub.SCHEDULER)
        self.schedule = Schedule.from_config(sched_cfg)
        self.learned_variance = _learned(sched_cfg)
        self.channels, self.cond_channels, self.size = _shape(unet_cfg, self.learned_variance, self.folder)
        if self.is_upscaler != isinstance(self, IFUpscaler):
            raise MirageError(f"{ref} is an IF stage-{'II upscaler' if self.is_upscaler else 'I'} model; "
                              f"pass it as {'--upscaler' if self.is_upscaler else '--model'}")
        check_plan(memory)
        self.memory = memory
        self.text = PromptEncoder(text_encoder or ref, self._device, self._dtype, cache_dir, memory)
        self.plan: memory.Plan | None = None
        self._unet = None
        self._graphs = None
        self._offloaded = None  # under offload: the UNet, its weights in RAM while the stage is freed
        # Channels-last weights and inputs when resident on a GPU: measured on an H100 (bench/if_gpu.py), they
        # make IF-I-XL's call at 64 px 20 % faster and IF-II-L's at 256 px 30 % slower (its group norms).
        self.channels_last = not self.is_upscaler
        self.use_graphs = True  # capture CUDA graphs when the whole UNet is on a GPU
        self.compile = COMPILE_MODE if compile else None  # torch.compile's mode under the graphs; None: eager

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def is_upscaler(self) -> bool:
        return self.cond_channels > 0

    def encode(self, prompts: list[str]) -> Cond:
        return Cond(embeds=self.text.encode(prompts))

    # ---- the UNet -----------------------------------------------------------------------------------
    def sizes(self) -> memory.Sizes:
        return memory.Sizes(hub.weights_bytes(self.folder, hub.UNET, self._dtype), work=self._work())

    def _work(self) -> int:
        """Activation memory for calls of up to 8 images (larger batches that do not fit fall back): about
        16 tensors at full resolution and the first block's width a image, plus library workspaces."""
        cfg = hub.read_config(self.folder, hub.UNET)
        per_image = 16 * self.size**2 * cfg["block_out_channels"][0] * self._dtype.itemsize
        return 8 * per_image + memory.GiB // 2

    def unet(self):
        """The UNet module, loaded (or copied back to the GPU under offload) on first use."""
        if self._unet is None:
            if self.plan is None:
                self.plan = memory.plan_for(self.memory, self._device, self.sizes())
            self._unet = memory.until_it_fits(lambda: self._load(self.plan), self._lean)
        return self._unet

    def _load(self, plan: memory.Plan):
        device = memory.compute_device(plan, self._device)
        if self._offloaded is not None:  # offload: the weights are in RAM already
            self._offloaded.mirage_offload.to_device()
            unet = self._offloaded
        else:
            resident = plan.name == "gpu" and device.type == "cuda"
            unet = hub.load_unet(self.folder, hub.UNET, device, self._dtype, plan, resident and self.channels_last)
            self._offloaded = unet if plan.name == "offload" else None
        if plan.name in ("gpu", "offload") and device.type == "cuda" and self.use_graphs:
            self._graphs = _Graphs(unet, self.compile if plan.name == "gpu" else None)
        return unet

    def free(self) -> None:
        """Drop the UNet from the GPU: it is loaded again (under offload: copied back from RAM) on next use."""
        if self._unet is not None and self.plan is not None and self.plan.name == "offload":
            self._unet.mirage_offload.to_host()
        else:
            self._offloaded = None
        self._unet = self._graphs = None
        hub.release(self._device)

    def _lean(self) -> None:
        """After an out-of-memory error: first stop using CUDA graphs, then move to a leaner plan."""
        if self._graphs is not None:
            self._graphs = None
            self.use_graphs = False
            hub.release(self._device)
            warnings.warn(f"{self.ref}: out of GPU memory with CUDA graphs; continuing without them", stacklevel=3)
            return
        self._unet = self._offloaded = None
        hub.release(self._device)
        self.plan = memory.fall_back(self.plan, self.sizes().weights, str(self.ref))

    def __call__(self, x: Tensor, t: int, cond: Cond) -> tuple[Tensor, Tensor | None]:
        if self.is_upscaler and (cond.image is None or cond.level is None):
            raise ValueError("IF stage II needs cond.image and cond.level (from noised_condition)")
        out = memory.until_it_fits(lambda: self._forward(x, t, cond), self._lean).float().to(x.device)
        if not self.learned_variance:
            return out, None
        eps, var = out.split(self.channels, dim=1)
        return eps, var

    def _forward(self, x: Tensor, t: int, cond: Cond) -> Tensor:
        unet = self.unet()
        device = memory.compute_device(self.plan, self._device)
        inp = x if cond.image is None else torch.cat([x, cond.image.to(x)], dim=1)
        inp = inp.to(device, self._dtype)
        if self.plan.name == "gpu" and device.type == "cuda" and self.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)  # as the resident weights are laid out
        level = None if cond.level is None else cond.level.to(device)
        embeds = cond.embeds.to(device, self._dtype)
        with torch.no_grad():  # not inference_mode: callers may update the results in place
            if self._graphs is not None:
                try:
                    return self._graphs(inp, t, embeds, level)
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as e:  # an operation CUDA graphs cannot capture: run it as it is
                    warnings.warn(f"{self.ref}: CUDA graphs failed ({str(e).strip().splitlines()[0]}); "
                                  f"running without them", stacklevel=3)
                    self._graphs, self.use_graphs = None, False
            return unet(inp, torch.tensor(t, device=device), return_dict=False, class_labels=level,
                        encoder_hidden_states=embeds)[0]


class _Graphs:
    """The UNet call replayed from CUDA graphs, one per input shape, sharing one memory pool.

    A 4.3 B-parameter UNet launches about two thousand kernels a call; from Python that takes longer than
    the GPU needs for them at small batches. A replay launches them all at once. Inputs are copied into the
    graph's own tensors; the output is the graph's own tensor, valid until the next replay.
    """

    def __init__(self, unet, compile_mode: str | None = None):
        self.unet = unet if compile_mode is None else torch.compile(unet, mode=compile_mode, dynamic=False)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[dict, torch.cuda.CUDAGraph, Tensor]] = {}

    def __call__(self, sample: Tensor, t: int, embeds: Tensor, level: Tensor | None) -> Tensor:
        key = (tuple(sample.shape), tuple(embeds.shape), None if level is None else tuple(level.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(sample, embeds, level)
        inputs, graph, out = self.graphs[key]
        inputs["sample"].copy_(sample)
        inputs["t"].fill_(t)
        inputs["embeds"].copy_(embeds)
        if level is not None:
            inputs["level"].copy_(level)
        graph.replay()
        return out

    def _run(self, inputs: dict) -> Tensor:
        return self.unet(inputs["sample"], inputs["t"], return_dict=False, class_labels=inputs["level"],
                         encoder_hidden_states=inputs["embeds"])[0]

    def _capture(self, sample: Tensor, embeds: Tensor, level: Tensor | None):
        with torch.inference_mode(False):  # normal tensors: updated in place in and out of inference mode
            inputs = dict(sample=sample.clone(), t=torch.zeros((), dtype=torch.long, device=sample.device),
                          embeds=embeds.clone(), level=None if level is None else level.clone())
        side = torch.cuda.Stream(sample.device)
        side.wait_stream(torch.cuda.current_stream(sample.device))
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # the shapes are fixed for good: time cuDNN's algorithms once
        try:
            with torch.cuda.stream(side):  # warm-up: libraries pick algorithms and allocate workspaces outside
                self._run(inputs)
            torch.cuda.current_stream(sample.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._run(inputs)
        finally:
            torch.backends.cudnn.benchmark = benchmark
        return inputs, graph, out


class IFUpscaler(IFStage):
    """IF stage II: denoises at `size` conditioned on a low-res image upscaled and noised to a level."""

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 text_encoder: str | None = None, cache_dir: str | Path | None = None, memory: str = "auto",
                 compile: bool = False):
        super().__init__(ref, device, dtype, text_encoder, cache_dir, memory, compile)
        folder = hub.resolve(ref, (hub.NOISING,), self._dtype)
        self.noising = Schedule.from_config(hub.read_config(folder, hub.NOISING))

    def noised_condition(self, low_res: Tensor, noise: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """The low-res image [B, C, h, w] in [-1, 1], upscaled to `size` and noised to `level`, and the
        level per item, as IFSuperResolutionPipeline prepares them (bilinear, align_corners, add_noise)."""
        if not 0 <= level < self.noising.num_train_timesteps:
            raise UsageError(f"the noise level must be between 0 and {self.noising.num_train_timesteps - 1}, "
                             f"got {level}")
        up = F.interpolate(low_res, (self.size, self.size), mode="bilinear", align_corners=True)
        levels = torch.full((up.shape[0],), level, dtype=torch.long, device=up.device)
        return self.noising.forward(up, levels, noise.to(up)), levels


def _learned(sched_cfg: dict) -> bool:
    return sched_cfg.get("variance_type") in ("learned", "learned_range")


def _shape(unet_cfg: dict, learned_variance: bool, folder: Path) -> tuple[int, int, int]:
    """(image channels, conditioning-image channels, size) from a UNet config."""
    out = unet_cfg.get("out_channels", 0)
    channels = out // 2 if learned_variance else out
    cond_channels = unet_cfg.get("in_channels", 0) - channels
    size = unet_cfg.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        size = size[0]
    if channels <= 0 or cond_channels < 0 or not isinstance(size, int):
        raise MirageError(f"{folder}/unet/config.json does not describe an IF UNet (in_channels, out_channels, "
                          f"sample_size: {unet_cfg.get('in_channels')}, {out}, {unet_cfg.get('sample_size')})")
    return channels, cond_channels, size


# ---- `mirage fetch` ---------------------------------------------------------------------------------
def fetch(ref: str, dtype: torch.dtype = torch.float16) -> Path:
    """Download what mirage needs of an IF stage: its UNet and schedulers, and T5 for a stage-I model."""
    stage = load_stage(ref, dtype=dtype)
    parts = (hub.NOISING,) if stage.is_upscaler else hub.TEXT_PARTS
    return hub.resolve(ref, parts, dtype)


def fetch_command(args) -> int:
    """`mirage fetch M [M ...]` (args.models; args.fp32 fetches full-precision weights instead of fp16)."""
    dtype = torch.float32 if getattr(args, "fp32", False) else torch.float16
    for ref in args.models:
        print(f"{ref}: {fetch(ref, dtype)}")
    return 0
