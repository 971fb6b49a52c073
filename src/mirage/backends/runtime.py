"""How a diffusers UNet2DConditionModel runs behind a Denoiser: DeepFloyd IF's stages and Stable Diffusion's
UNet alike (both are that class, called the same way).

The UNet is loaded on the first call, so that prompts are encoded (and the text encoder freed) before it takes
any memory, under a memory plan (memory.py) chosen then from the free memory, or named. On a GPU with the whole
UNet resident, each input shape's call is captured once as a CUDA graph and replayed, and on request the UNet's
repeated blocks are compiled first (regional compilation, `compile_regions`); plans that stream weights run
eagerly. Which of the two a model runs is said in a one-line note when its UNet loads on a GPU, and kept in
`execution`. A CUDA out-of-memory error drops the graphs, then moves to the next leaner plan, with a one-line
note, and the call is retried.
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mirage.backends import fused, hub, memory
from mirage.backends.base import Placed
from mirage.backends.prompts import default_cache_dir
from mirage.engine.denoiser import Cond, space_shape

# Regional compilation: inductor (its default mode) compiles each resnet and attention block of the UNets, not
# the whole model. Blocks of one kind and the same widths share one compiled graph (both IF stages together: 60
# graphs for 130 blocks), and the batch dimension is marked dynamic, so a new batch size compiles nothing
# (measured: 60 graphs after batch 4, still 60 after batch 32). Widths stay static: with every size symbolic
# (a handful of graphs in all) the first stage-I call took 334 s on an H200, sympy-bound. Symbolic heights and
# widths would save no graph either: IF's 130 blocks hold 58 distinct kinds and widths, each at one resolution
# only (counted on the meta device). It fuses the blocks' elementwise work (group norms, SiLU, scale-shift,
# residuals) around the convolutions and matrix products, which stay cuDNN's and cuBLAS's. Compiled code is
# cached in inductor's cache under mirage's cache folder (`inductor_cache_dir`), so a second process starts warm.
# Measured on an H200 (bench/if_gpu_h200.log): the first 2-view anagram of a fresh process spends 225 s compiling
# on an empty cache and 45 s on a warm one, then runs 30 + 30 steps in 2.1-2.2 s (2.32x visual_anagrams' own
# samplers in the same run; stage I at batch 4: 28 ms a step, against 40 ms eager with CUDA graphs and 53 ms as
# diffusers runs it). SD 1.5's UNet compiles in 41 s (bench/sd_gpu_h200.log). Whole-model compilation, the
# earlier way, took 70-130 s for each new batch shape (bench/if_gpu_h100.log).
COMPILE_MODE = "default"
COMPILE_BACKEND = "inductor"
# What is compiled: "blocks", each resnet and attention block whole; "fused", only the elementwise work around
# the convolutions and attention (fused.py: a few graphs with every size symbolic). The trade, measured on H100s
# (bench/if_gpu_fused_bias_h100.log, bench/if_gpu_fused_pyc_h100.log: three fresh-process runs): beyond what an
# eager fresh process spends on its first calls (6.6-9.3 s), "fused" compiles for 26.6-33.3 s on an empty cache
# and 5.2-8.1 s on a warm one (9 graphs, stage II then still NCHW; with both stages NHWC it is 4, counted on a
# CPU, bench/fused_compile_cpu.log), and runs stage I at 33 ms a call (batch 4; eager 42.5) and stage II at 56.3 ms
# NHWC (60.7 NCHW; eager 66.3): a 2-view anagram in 2.93 s against eager's 3.35-3.51. "blocks" runs them at 25.4
# and 41.1 ms, the anagram in 2.08 s (bench/if_gpu_blocks_h100.log), but compiles for minutes. Speed is what a
# session of many images pays for, so "blocks" stays the default and "fused" is for one-off runs.
COMPILE_SCOPES = ("blocks", "fused")
COMPILE_SCOPE = "blocks"

# Dynamo's settings while a block is traced: only the dimensions marked dynamic (the batch) are symbolic, and
# there is room for every kind and width of block (resnets plain, with a shortcut, up, down; attentions).
_DYNAMO_SETTINGS = dict(automatic_dynamic_shapes=False, recompile_limit=128)


class UNetRuntime(Placed):
    """What a back end whose network is a diffusers UNet2DConditionModel (in `folder`/unet) shares: the UNet
    loaded under a memory plan, called through CUDA graphs and compiled blocks, freed, and leaner plans after
    an out-of-memory error. Subclasses set `ref`, `folder`, `_device`, `_dtype` and call `_init_runtime`.

    `compile` (regional compilation of the UNet's blocks, under the CUDA graphs): None compiles where the whole
    UNet is resident on a GPU (plan gpu) and runs eagerly under offload and blocks; True compiles under offload
    too; False never compiles; a scope name (COMPILE_SCOPES) is True with that scope, True takes COMPILE_SCOPE.
    Nothing is compiled off a GPU, nor under blocks, whose streaming hooks compiled
    code would not run. `execution` says what the loaded UNet runs as. `channels_last`: the resident weights
    and inputs laid out NHWC (a measured per-model choice); None: NHWC where the fused scope compiles the UNet
    (`nhwc`, decided as it loads), NCHW elsewhere. Eager group norms are slow in NHWC, compiled ones are not.
    """

    ref: str
    folder: Path

    def _init_runtime(self, memory_plan: str, compile: bool | str | None, channels_last: bool | None) -> None:
        memory.check_plan(memory_plan)
        if isinstance(compile, str):
            check_scope(compile)
        self.memory = memory_plan
        self.plan: memory.Plan | None = None
        self._unet = None
        self._graphs = None
        self._offloaded = None  # under offload: the UNet, its weights in RAM while the model is freed
        self.channels_last = channels_last
        self.nhwc = False  # whether the loaded UNet's weights and inputs are NHWC
        self.use_graphs = True  # capture CUDA graphs when the whole UNet is on a GPU
        self.compile_request = compile if not isinstance(compile, str) else True  # None: auto; True / False
        # torch.compile's mode where the UNet runs compiled (decided per plan as it loads); None: never compiled
        self.compile = None if compile is False else COMPILE_MODE
        self.execution: str | None = None  # what the loaded UNet runs as, e.g. "compiled blocks + CUDA graphs"
        self.compiled = False  # whether the loaded UNet's blocks are compiled
        self.compile_scope = compile if isinstance(compile, str) else COMPILE_SCOPE  # read when the UNet loads
        self.first_call_seconds = 0.0  # first calls of new input shapes: compiling blocks, capturing graphs
        self._noted: set[str] = set()

    # ---- the UNet -----------------------------------------------------------------------------------
    def sizes(self) -> memory.Sizes:
        return memory.Sizes(hub.weights_bytes(self.folder, hub.UNET, self._dtype), work=self._work())

    def _work(self) -> int:
        """Activation memory for calls of up to 8 images (larger batches that do not fit fall back): about
        16 tensors at the UNet's full resolution and its first block's width a image, plus library workspaces."""
        cfg = hub.read_config(self.folder, hub.UNET)
        per_image = 16 * space_shape(self)[-1] ** 2 * cfg["block_out_channels"][0] * self._dtype.itemsize
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
        why_eager = self._why_eager(plan, device)
        if self._offloaded is not None:  # offload: the weights are in RAM already
            self._offloaded.mirage_offload.to_device()
            unet = self._offloaded
        else:
            resident = plan.name == "gpu" and device.type == "cuda"
            self.nhwc = resident and self._wants_nhwc(compiled=why_eager is None)
            unet = hub.load_unet(self.folder, hub.UNET, device, self._dtype, plan, self.nhwc)
            self._offloaded = unet if plan.name == "offload" else None
        graphs = plan.name in ("gpu", "offload") and device.type == "cuda" and self.use_graphs
        self.compiled = why_eager is None
        if self.compiled:
            compile_regions(unet, self.compile, layout=_layout(unet), scope=self.compile_scope)
        else:
            uncompile_regions(unet)
        if graphs:
            self._graphs = _Graphs(unet, self._first_call_took)
        compiled = "compiled blocks" if self.compile_scope == "blocks" else "compiled elementwise work"
        self.execution = (compiled if self.compiled else f"eager ({why_eager})") + \
            (" + CUDA graphs" if graphs else "")
        if self.execution not in self._noted:
            self._noted.add(self.execution)
            memory.note_plan(self.ref, plan, device, f": UNet runs {self.execution}"
                             + (f"; compiled code is cached in {inductor_cache_dir()}" if self.compiled else ""))
        return unet

    def _wants_nhwc(self, compiled: bool) -> bool:
        # measured on an H100 (bench/if_gpu_fused_pyc_h100.log): IF-II-L's call at 256 px, batch 4, under the fused
        # scope takes 56.3 ms NHWC and 60.7 ms NCHW; eagerly NHWC is 30 % slower
        if self.channels_last is None:
            return compiled and self.compile_scope == "fused"
        return self.channels_last

    def _why_eager(self, plan: memory.Plan, device: torch.device) -> str | None:
        """None where the UNet's blocks are compiled under `plan`, else why they run eagerly."""
        if self.compile_request is False:
            return "compilation turned off"
        if plan.name == "blocks":
            return "weights stream in block by block: the copies set the pace"
        if device.type != "cuda":
            return "not on a GPU"
        if plan.name == "offload" and self.compile_request is None:
            return "offload plan; --compile compiles it"
        return None

    def _first_call_took(self, seconds: float) -> None:
        self.first_call_seconds += seconds

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

    def _run(self, x: Tensor, t: int, cond: Cond) -> Tensor:
        """The UNet's output for input `x` (cond.image concatenated to it) at timestep `t`, in fp32 on x's
        device, retried under leaner plans until it fits."""
        return memory.until_it_fits(lambda: self._forward(x, t, cond), self._lean).float().to(x.device)

    def _forward(self, x: Tensor, t: int, cond: Cond) -> Tensor:
        unet = self.unet()
        device = memory.compute_device(self.plan, self._device)
        inp = x if cond.image is None else torch.cat([x, cond.image.to(x)], dim=1)
        inp = inp.to(device, self._dtype)
        if self.nhwc:
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

    def __init__(self, unet, took=lambda seconds: None):
        self.unet = unet
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[dict, torch.cuda.CUDAGraph, Tensor]] = {}
        self.took = took  # told the seconds of each first call: warm-up (compiling what is new) and capture

    def __call__(self, sample: Tensor, t: int, embeds: Tensor, level: Tensor | None) -> Tensor:
        key = (tuple(sample.shape), tuple(embeds.shape), None if level is None else tuple(level.shape))
        if key not in self.graphs:
            start = time.perf_counter()
            self.graphs[key] = self._capture(sample, embeds, level)
            torch.cuda.synchronize(sample.device)
            self.took(time.perf_counter() - start)
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


def inductor_cache_dir() -> Path:
    """Where compiled blocks are cached: inductor's cache in mirage's cache folder (beside the prompt embeddings),
    unless TORCHINDUCTOR_CACHE_DIR names another folder than inductor's own default."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != _inductor_default():
        return Path(chosen)
    return default_cache_dir().parent / "inductor"


def _inductor_default() -> str | None:
    """Inductor's default cache folder (/tmp/torchinductor_USER): importing diffusers or transformers sets
    TORCHINDUCTOR_CACHE_DIR to it, so finding it there says nothing of the user's choice."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as default
    except ImportError:
        return None
    return os.path.abspath(default())


def _region_classes() -> tuple[type, ...]:
    """The UNets' repeated blocks: resnets (with their up/down samplers) and attentions."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D, Attention


@functools.cache
def _compiled_forward(cls: type, mode: str | None, backend: str):
    """One compiled forward per kind of block, shared by all its instances (and both stages): dynamo caches the
    compiled graphs per function, so blocks of the same widths reuse them, at any batch size."""
    options = dict(mode=mode) if backend == "inductor" and mode not in (None, "default") else {}
    return torch.compile(cls.forward, dynamic=None, backend=backend, **options)


def _dynamo_settings() -> dict:
    config = torch._dynamo.config
    return {k: max(v, getattr(config, k)) if k == "recompile_limit" else v
            for k, v in _DYNAMO_SETTINGS.items() if hasattr(config, k)}


def _run_region(forward, layout: torch.memory_format | None, module, x, *args, **kwargs):
    if layout is not None and isinstance(x, Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=layout)  # one layout in, one compiled graph (strides are guarded)
    for t in (x, *args, *kwargs.values()):
        if isinstance(t, Tensor) and t.dim() > 1 and t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)  # the batch: one graph for every batch size
    with torch._dynamo.config.patch(**_dynamo_settings()):
        return forward(module, x, *args, **kwargs)


def check_scope(scope: str) -> None:
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}: one of {', '.join(COMPILE_SCOPES)}")


def compile_regions(unet, mode: str | None = COMPILE_MODE, backend: str | None = None,
                    layout: torch.memory_format | None = None, scope: str = COMPILE_SCOPE) -> int:
    """Compile a diffusers UNet's resnet and attention blocks in place (regional compilation); returns how many
    modules now run compiled code.

    Scope "blocks": each block's forward becomes its class's compiled forward (`_compiled_forward`); inputs are
    brought to `layout` first. Scope "fused": the resnets' and group norms' elementwise work runs as fused.py's
    compiled functions (`mode` and `layout` do not apply). Nothing is compiled until a block runs.
    `uncompile_regions` undoes it."""
    check_scope(scope)
    backend = backend or COMPILE_BACKEND
    if backend == "inductor":  # read by inductor whenever it caches (its Triton kernels go in a subfolder)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    if scope == "fused":
        return fused.fuse(unet, _region_classes()[0], backend)
    classes, count = _region_classes(), 0
    for block in unet.modules():
        if isinstance(block, classes):
            forward = _compiled_forward(type(block), mode, backend)
            block.forward = functools.partial(_run_region, forward, layout, block)
            count += 1
    return count


def uncompile_regions(unet) -> None:
    for block in unet.modules():
        block.__dict__.pop("forward", None)


def _layout(unet) -> torch.memory_format:
    weight = unet.conv_in.weight
    channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format

