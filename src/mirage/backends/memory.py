"""Memory plans for DeepFloyd IF: where T5 and the UNets live, and how their weights reach the GPU.

IF-I-XL (4.3 B parameters, 8.6 GB in fp16), IF-II-L (1.2 B, 2.4 GB) and T5 v1.1 XXL (4.8 B, 9.5 GB) never
need the GPU together: T5 encodes and is freed, then stage I runs and is freed, then stage II. Each model is
placed under a plan when it loads, chosen from the memory free at that moment or named by `--memory`:

| plan    | the model's weights                                                      | needs                          |
|---------|--------------------------------------------------------------------------|--------------------------------|
| gpu     | all on the GPU                                                           | VRAM >= weights + work         |
| offload | in pinned RAM; the whole model is copied to the GPU while its stage runs and dropped there by `free` (copied again, from RAM, on the next use) | as gpu, plus RAM >= weights |
| 8bit    | T5 only: quantized to int8 by bitsandbytes while loading (if installed)  | VRAM >= weights / 2 + work     |
| blocks  | as many blocks (UNet resnets/attentions/samplers, T5 layers) as fit stay on the GPU; the others live in pinned RAM and are copied in before each use on a side CUDA stream, the next block while the current one computes | VRAM >= work + 1/2 GiB, RAM >= the streamed part |
| cpu     | in RAM, computed on the CPU                                              | RAM >= weights                 |

`auto` takes the first of gpu, blocks, cpu that fits; 8bit only where RAM cannot hold blocks' streamed part.
`offload` is never chosen automatically: it pays only when a process uses a stage again after another
one (the Python API), which one command never does.

Weights are read straight from the safetensors files with plain reads, tensor by tensor, into the GPU
(through a small pinned staging buffer) or into the pinned buffer of the streamed blocks: no full copy in
RAM, and no memory-mapped pages counted as the process's memory.

A CUDA out-of-memory error while loading or calling a model moves it to the next leaner plan (`leaner`):
gpu, offload or 8bit -> blocks with half of the weights on the GPU -> blocks with half as much, while that
is at least 1/2 GiB -> cpu.
"""
from __future__ import annotations

import json
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch
from torch import Tensor, nn

from mirage.errors import MirageError, UsageError

GiB = 2**30
T = TypeVar("T")
MIN_RESIDENT = GiB // 2  # less than this on the GPU and streaming costs more than computing on the CPU
RAM_MARGIN = GiB  # RAM left for Python, torch and the images when deciding what fits
PLANS = ("auto", "gpu", "offload", "blocks", "cpu")  # what --memory accepts (8bit is T5's, chosen by auto)


@dataclass(frozen=True)
class Plan:
    name: str  # gpu | offload | 8bit | blocks | cpu
    budget: int | None = None  # blocks: bytes of weights kept on the GPU

    def describe(self) -> str:
        return self.name if self.budget is None else f"{self.name} ({self.budget / GiB:.1f} GiB on the GPU)"


@dataclass(frozen=True)
class Sizes:
    weights: int  # bytes of the model's weights in the dtype it computes in
    work: int  # bytes its calls need besides the weights (activations, library workspaces)
    int8: bool = False  # whether the 8bit plan is possible (T5 with bitsandbytes installed)


def choose_plan(vram_free: int, ram_free: int, sizes: Sizes) -> Plan:
    """The fastest plan that fits the free GPU memory and RAM (see the table above)."""
    if vram_free >= sizes.weights + sizes.work:
        return Plan("gpu")
    room = vram_free - sizes.work
    blocks_fit = room >= MIN_RESIDENT and ram_free >= sizes.weights - room + RAM_MARGIN
    if sizes.int8 and not blocks_fit and room >= sizes.weights // 2:
        return Plan("8bit")
    if blocks_fit:
        return Plan("blocks", budget=room)
    if ram_free >= sizes.weights + RAM_MARGIN:
        return Plan("cpu")
    raise MirageError(f"not enough memory: the model needs {sizes.weights / GiB:.1f} GiB of weights, but only "
                      f"{vram_free / GiB:.1f} GiB of GPU memory and {ram_free / GiB:.1f} GiB of RAM are free; "
                      f"close other programs or use a smaller model")


def leaner(plan: Plan, weights: int) -> Plan | None:
    """The plan to try after `plan` ran out of GPU memory, or None when there is none."""
    if plan.name in ("gpu", "offload", "8bit"):
        return Plan("blocks", budget=weights // 2)
    if plan.name == "blocks":
        return Plan("blocks", budget=plan.budget // 2) if plan.budget // 2 >= MIN_RESIDENT else Plan("cpu")
    return None


def fall_back(plan: Plan, weights: int, what: str) -> Plan:
    """After an out-of-memory error: the next leaner plan, with a one-line note, or a one-line error."""
    new = leaner(plan, weights)
    if new is None:
        raise MirageError(f"out of memory running {what} even with memory plan {plan.name}: "
                          f"free some memory or use a smaller model")
    warnings.warn(f"{what}: out of GPU memory with memory plan {plan.describe()}; continuing with "
                  f"{new.describe()}", stacklevel=3)
    return new


def check_plan(memory: str) -> None:
    """A plan name `--memory` accepts, or a usage error listing them."""
    if memory not in PLANS:
        raise UsageError(f"memory plan {memory!r} is not available; use one of {', '.join(PLANS)}")


def until_it_fits(attempt: Callable[[], T], lean: Callable[[], None]) -> T:
    """attempt() again until it runs without a CUDA out-of-memory error, calling lean() after each one
    outside the except block, whose traceback still holds the failed attempt's tensors."""
    while True:
        try:
            return attempt()
        except torch.OutOfMemoryError:
            pass
        lean()


def plan_for(memory: str, device: torch.device, sizes: Sizes) -> Plan:
    """The plan `--memory` names (auto: choose_plan from what is free now) for a model of `sizes`."""
    check_plan(memory)
    cuda = device.type == "cuda"
    if memory == "auto":
        return choose_plan(vram_free(device), ram_free(), sizes) if cuda else Plan("cpu")
    if memory == "blocks":  # keep what fits; off a GPU (tests), stream half so that the streaming runs
        room = vram_free(device) - sizes.work if cuda else sizes.weights // 2
        return Plan("blocks", budget=max(MIN_RESIDENT if cuda else 0, room))
    return Plan(memory)


class PlanNote(UserWarning):
    """The one-line note of the memory plan a model runs under on a GPU (and, for UNets, how it runs)."""


def note_plan(what: str, plan: Plan, device: torch.device, how: str = "") -> None:
    """Say which plan `what` runs under, on a GPU only (off one there is no choice to report)."""
    if device.type == "cuda":
        warnings.warn(f"{what}: memory plan {plan.describe()}{how}", PlanNote, stacklevel=3)


def compute_device(plan: Plan, device: torch.device) -> torch.device:
    return torch.device("cpu") if plan.name == "cpu" else device


# ---- what is free -------------------------------------------------------------------------------------
def vram_free(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: free memory, the allocator's unused cache, and
    the cap of torch.cuda.set_per_process_memory_fraction."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return max(0, min(free, int(fraction * total) - reserved) + reserved - allocated)


def ram_free() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, IndexError, ValueError):  # not Linux: assume the RAM is there
        return 1 << 50


# ---- safetensors, read without mapping ------------------------------------------------------------------
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are."""
    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> list[Entry]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100 * 2**20:
            raise ValueError(f"{path.name} has no safetensors header")
        header = json.loads(f.read(size))
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        entries.append(Entry(Path(path), name, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin,
                             end - begin))
    return entries


def nbytes(entry: Entry, dtype: torch.dtype) -> int:
    """Bytes of the tensor once loaded: floating tensors in `dtype`, the others as stored."""
    return math.prod(entry.shape) * (dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize)


def weights_bytes(files: Iterable[Path], dtype: torch.dtype) -> int:
    return sum(nbytes(e, dtype) for f in files for e in read_header(f))


def _read_exact(f, pos: int, out: Tensor) -> None:
    """Fill the uint8 tensor `out` (on the CPU) with the file's bytes from `pos`."""
    view = memoryview(out.numpy()).cast("B")
    f.seek(pos)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise OSError(f"{Path(f.name).name} ends before its tensors do (truncated file)")
        done += got


def _bytes_of(t: Tensor) -> Tensor:
    return t.reshape(-1).view(torch.uint8)


# ---- placing a model's weights --------------------------------------------------------------------------
def units_of(model: nn.Module) -> list[nn.Module]:
    """The pieces the blocks plan streams: a diffusers UNet's resnets, attentions and samplers, T5's layers."""
    if hasattr(model, "down_blocks"):
        blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
        pieces = [m for b in blocks if b is not None for c in b.children()
                  for m in (c if isinstance(c, nn.ModuleList) else [c])]
    elif hasattr(model, "encoder") and hasattr(model.encoder, "block"):
        pieces = list(model.encoder.block)
    else:
        pieces = list(model.children())
    return [m for m in pieces if any(True for _ in m.parameters())]


Binding = list  # [(name, owner module, attribute)]: every place one tensor appears (tied weights: several)


def bindings(module: nn.Module) -> list[Binding]:
    """Each parameter and buffer of `module` once, with all the names it goes by."""
    by_tensor: dict[int, Binding] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table in (owner._parameters, owner._buffers):
            for attr, t in table.items():
                if t is not None:
                    by_tensor.setdefault(id(t), []).append((f"{prefix}.{attr}" if prefix else attr, owner, attr))
    return list(by_tensor.values())


def _current(binding: Binding) -> Tensor:
    _, owner, attr = binding[0]
    return getattr(owner, attr)


def _set(binding: Binding, value: Tensor) -> None:
    """Give a (meta) tensor its loaded value, in every module that shares it."""
    param = nn.Parameter(value, requires_grad=False) if binding[0][2] in binding[0][1]._parameters else None
    for _, owner, attr in binding:
        if attr in owner._parameters:
            owner._parameters[attr] = param
        else:
            owner._buffers[attr] = value


def _rebind(binding: Binding, value: Tensor) -> None:
    """Point a loaded tensor at other memory (the hot path of streaming: no new objects)."""
    for _, owner, attr in binding:
        if attr in owner._parameters:
            owner._parameters[attr].data = value
        else:
            owner._buffers[attr] = value


class _Flat:
    """Tensors laid out one after another in one byte buffer, each starting on a 256-byte boundary."""

    def __init__(self, specs: list[tuple[tuple[int, ...], torch.dtype]]):
        self.specs, self.offsets, end = specs, [], 0
        for shape, dtype in specs:
            end = _align(end)
            self.offsets.append(end)
            end += math.prod(shape) * dtype.itemsize
        self.nbytes = end

    def views(self, buffer: Tensor) -> list[Tensor]:
        return [buffer[o:o + math.prod(s) * d.itemsize].view(d).view(s)
                for o, (s, d) in zip(self.offsets, self.specs)]


def _align(n: int) -> int:
    return -(-n // 256) * 256


class _HostMemory:
    """n bytes of RAM, page-locked for asynchronous copies when `pin`, unlocked when the last group using it
    goes. Registered rather than allocated pinned: torch's pinned allocator rounds sizes up to a power of
    two and keeps freed blocks."""

    def __init__(self, n: int, pin: bool):
        self.buffer = torch.empty(n, dtype=torch.uint8)
        self.registered = pin and n > 0 and int(torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), n, 0)) == 0

    def __del__(self):
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())


@dataclass
class _Group:
    """Tensors kept together in RAM and copied to the GPU in one piece: a streamed unit, or a whole
    offloaded model."""
    module: nn.Module
    bindings: list[Binding]
    layout: _Flat
    memory: _HostMemory | None = None  # the RAM it lives in (kept alive, and locked, by its groups)
    buffer: Tensor | None = None  # its bytes of that memory
    host: list[Tensor] | None = None  # the tensors, viewing `buffer`


def place(model: nn.Module, files: list[Path], device: torch.device, dtype: torch.dtype, plan: Plan,
          channels_last: bool = False) -> nn.Module:
    """Fill `model`, built on the meta device, with the weights of `files`, placed as `plan` says.

    Floating tensors are cast to `dtype`; the 4-D (convolution) weights on the device can be laid out
    channels-last. Under blocks, the streamed units get hooks that copy them in (`_Streamer`); under
    offload, the model carries an `Offloaded` as `model.mirage_offload`.
    """
    entries = {e.name: e for f in files for e in read_header(f)}
    tensors = bindings(model)
    named = {name for b in tensors for name, _, _ in b}
    unknown = sorted(set(entries) - named)
    if unknown:
        raise ValueError(f"the weights hold {unknown[0]!r}, which the model's config has no place for")
    source = {}
    for b in tensors:
        found = [entries[name] for name, _, _ in b if name in entries]
        if not found:
            raise ValueError(f"the weights lack {b[0][0]!r}")
        if tuple(_current(b).shape) != found[0].shape:
            raise ValueError(f"{found[0].name} is {found[0].shape} in the weights but "
                             f"{tuple(_current(b).shape)} in the model's config")
        source[id(b)] = found[0]

    def dtype_of(b):
        e = source[id(b)]
        return dtype if e.dtype.is_floating_point else e.dtype

    groups = _host_groups(model, plan, tensors, dtype_of)
    host = _HostMemory(sum(_align(g.layout.nbytes) for g in groups), pin=device.type == "cuda")
    in_ram, offset = {}, 0
    for g in groups:
        g.memory, g.buffer = host, host.buffer[offset:offset + g.layout.nbytes]
        g.host = g.layout.views(g.buffer)
        offset += _align(g.layout.nbytes)
        in_ram.update({id(b): view for b, view in zip(g.bindings, g.host)})
    with torch.inference_mode(False), torch.no_grad():
        _read_all(tensors, source, dtype_of, in_ram, device, channels_last)
    if plan.name == "blocks" and groups:
        _Streamer(groups, device).attach()
    if plan.name == "offload":
        model.mirage_offload = Offloaded(groups[0], device)
        model.mirage_offload.to_device()
    return model


def _read_all(tensors, source, dtype_of, in_ram, device, channels_last) -> None:
    """Read every tensor, file by file in file order, into RAM (streamed/offloaded) or onto the device."""
    staging = _Staging() if device.type == "cuda" else None
    order = sorted(tensors, key=lambda b: (str(source[id(b)].path), source[id(b)].start))
    f = None
    for b in order:
        entry = source[id(b)]
        if f is None or f.name != str(entry.path):
            if f is not None:
                f.close()
            f = open(entry.path, "rb", buffering=0)
        dst = in_ram.get(id(b))
        if dst is None:
            layout = torch.channels_last if channels_last and len(entry.shape) == 4 else torch.contiguous_format
            dst = torch.empty(entry.shape, dtype=dtype_of(b), device=device, memory_format=layout)
        if dst.device.type == "cuda":
            staging.fill(f, entry, dst)
        else:
            _fill_on_cpu(f, entry, dst)
        _set(b, dst)
    if f is not None:
        f.close()
    if staging is not None:
        staging.finish()


def _host_groups(model: nn.Module, plan: Plan, tensors: list[Binding], dtype_of) -> list[_Group]:
    """What lives in RAM under `plan`: nothing, the whole model (offload), or the units that do not fit
    the budget (blocks), smallest units kept on the GPU first."""
    def group(module, bs):
        return _Group(module, bs, _Flat([(tuple(_current(b).shape), dtype_of(b)) for b in bs]))

    if plan.name == "offload":
        return [group(model, tensors)]
    if plan.name != "blocks":
        return []
    owner_of = {id(_current(b)): b for b in tensors}
    units = [group(u, [owner_of[id(_current(b))] for b in bindings(u)]) for u in units_of(model)]
    total = sum(math.prod(_current(b).shape) * dtype_of(b).itemsize for b in tensors)
    biggest = max((u.layout.nbytes for u in units), default=0)
    room = plan.budget - (total - sum(u.layout.nbytes for u in units)) - 2 * biggest  # the rest, two slots
    streamed = set()
    for u in sorted(units, key=lambda u: u.layout.nbytes):
        if u.layout.nbytes <= room:
            room -= u.layout.nbytes
        else:
            streamed.add(id(u))
    return [u for u in units if id(u) in streamed]


class _Staging:
    """Two pinned buffers: a chunk is read from the file into one while the other is copied to the GPU."""

    CHUNK = 64 * 2**20

    def __init__(self):
        self.buffers = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [None, None]
        self.turn = 0

    def fill(self, f, entry: Entry, dst: Tensor) -> None:
        raw = dst if dst.dtype == entry.dtype and dst.is_contiguous() else \
            torch.empty(entry.shape, dtype=entry.dtype, device=dst.device)
        out = _bytes_of(raw)
        for offset in range(0, entry.nbytes, self.CHUNK):
            n = min(self.CHUNK, entry.nbytes - offset)
            buf = self.buffers[self.turn]
            if self.done[self.turn] is not None:
                self.done[self.turn].synchronize()  # its previous chunk has reached the GPU
            _read_exact(f, entry.start + offset, buf[:n])
            out[offset:offset + n].copy_(buf[:n], non_blocking=True)
            self.done[self.turn] = torch.cuda.Event()
            self.done[self.turn].record()
            self.turn ^= 1
        if raw is not dst:
            dst.copy_(raw)

    def finish(self) -> None:
        torch.cuda.current_stream().synchronize()


def _fill_on_cpu(f, entry: Entry, dst: Tensor) -> None:
    if dst.dtype == entry.dtype and dst.is_contiguous():
        _read_exact(f, entry.start, _bytes_of(dst))
    else:
        raw = torch.empty(entry.shape, dtype=entry.dtype)
        _read_exact(f, entry.start, _bytes_of(raw))
        dst.copy_(raw)


class _Streamer:
    """Copies streamed units into two GPU slots in turn, on a side stream, one unit ahead.

    The first call records the order the units run in; from then on, when a unit finishes, the copy of the
    next one starts into the other slot and overlaps the compute in between. A unit's tensors point at its
    slot while it runs and at its RAM copy otherwise. Off a GPU (tests) the copies are plain and immediate.
    """

    def __init__(self, groups: list[_Group], device: torch.device):
        self.groups, self.device, self.cuda = groups, device, device.type == "cuda"
        slot_bytes = max(g.layout.nbytes for g in groups)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.views = [[g.layout.views(slot) for slot in self.slots] for g in groups]
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.slot_free = [None, None]  # events: the slot's last unit has finished computing
        self.next_slot = 0
        self.pending = None  # (unit, slot, ready event) of the copy issued ahead
        self.running: dict[int, int] = {}
        self.order: list[int] = []
        self.recording = True
        if self.cuda:  # no copy may still be writing into a slot when the allocator hands it out again
            weakref.finalize(self, self.side.synchronize)

    def attach(self) -> None:
        for i, g in enumerate(self.groups):
            g.module.register_forward_pre_hook(lambda m, args, i=i: self.before(i))
            g.module.register_forward_hook(lambda m, args, out, i=i: self.after(i))

    def _take_slot(self) -> int:
        slot, self.next_slot = self.next_slot, self.next_slot ^ 1
        return slot

    def _copy(self, i: int, slot: int):
        src = self.groups[i].buffer
        dst = self.slots[slot][:src.numel()]
        if not self.cuda:
            dst.copy_(src)
            return None
        if self.slot_free[slot] is not None:
            self.side.wait_event(self.slot_free[slot])
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.side)
        return ready

    def before(self, i: int) -> None:
        if self.pending is not None and self.pending[0] == i:
            _, slot, ready = self.pending
        else:  # not foreseen (the first call): copy it now
            slot = self._take_slot()
            ready = self._copy(i, slot)
        self.pending = None
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        for b, view in zip(self.groups[i].bindings, self.views[i][slot]):
            _rebind(b, view)
        self.running[i] = slot
        if self.recording:
            if i in self.order:
                self.recording = False
            else:
                self.order.append(i)

    def after(self, i: int) -> None:
        slot = self.running.pop(i)
        if self.cuda:
            self.slot_free[slot] = torch.cuda.Event()
            self.slot_free[slot].record(torch.cuda.current_stream(self.device))
        g = self.groups[i]
        for b, view in zip(g.bindings, g.host):
            _rebind(b, view)
        if not self.recording:
            nxt = self.order[(self.order.index(i) + 1) % len(self.order)]
            slot = self._take_slot()
            self.pending = (nxt, slot, self._copy(nxt, slot))


class Offloaded:
    """A whole model kept in pinned RAM, copied to the GPU in one piece while its stage runs."""

    def __init__(self, group: _Group, device: torch.device):
        self.group, self.device, self.on_device = group, device, None

    def to_device(self) -> None:
        if self.on_device is None:
            g = self.group
            self.on_device = torch.empty(g.layout.nbytes, dtype=torch.uint8, device=self.device)
            self.on_device.copy_(g.buffer, non_blocking=True)
            for b, view in zip(g.bindings, g.layout.views(self.on_device)):
                _rebind(b, view)

    def to_host(self) -> None:
        for b, view in zip(self.group.bindings, self.group.host):
            _rebind(b, view)
        self.on_device = None
