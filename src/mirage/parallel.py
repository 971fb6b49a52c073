"""Running under torchrun: the process group, and the few collectives data-parallel training and sharded
generation use.

`torchrun --nproc_per_node N -m mirage train|sample|anagram|... ` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK in
their environment; `session(device)` then joins them in one process group (gloo on the CPU, NCCL for CUDA
tensors with gloo beside it for the small host-side agreements) on device cuda:LOCAL_RANK or the CPU. Without
those variables (or with WORLD_SIZE 1) it is a no-op and every collective below returns its input: a single
process trains exactly as it always did.

Failures: a rank whose work fails counts itself in the rendezvous store and, if it is the first, exits with its
one-line message naming the rank; the others that fail, and those that then lose contact with it, exit
quietly, so the job ends with one line. Usage errors, which every rank finds alike, are rank 0's to report.
torchrun itself ends the job when a rank dies (SIGKILL included); a rank stuck in a collective with a dead
peer on another machine gives up after MIRAGE_DIST_TIMEOUT seconds (default 600).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from mirage.errors import MirageError, UsageError

TIMEOUT_ENV = "MIRAGE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
FAILED_KEY = "mirage/failed"  # in the rendezvous store: how many ranks' work failed


def world_size() -> int:
    """The number of ranks torchrun started (1 without torchrun), read from the environment alone."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's rank as torchrun gave it (0 without torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextmanager
def one_voice() -> Iterator[None]:
    """Around the argument checks made before the ranks join: every rank finds the same bad argument, and
    rank 0 alone says so (the others exit 2 without a word)."""
    try:
        yield
    except UsageError:
        if world_size() > 1 and env_rank() > 0:
            raise SystemExit(2) from None
        raise


@dataclass
class Context:
    """This process's place in the job. With world 1 every method is the identity."""
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @property
    def main(self) -> bool:
        """Rank 0: the one that reads and writes the run folder, logs and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def describe(self) -> str:
        return f"{self.world} ranks ({self.backend})" if self.active else str(self.device)

    def shard(self, global_batch: int) -> slice:
        """This rank's rows of a global batch (contiguous: rank r has rows r*b ... (r+1)*b - 1)."""
        b = global_batch // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives (every rank must call them, in the same order) ------------------------------------
    def mean(self, x: Tensor) -> Tensor:
        """The mean of x over the ranks (gloo has no AVG: a sum, divided)."""
        if not self.active:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x / self.world

    def total(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def average_(self, tensors: list[Tensor]) -> None:
        """Replace each tensor by its mean over the ranks (integer ones by rank 0's value), in place."""
        if not self.active:
            return
        for t in tensors:
            if t.is_floating_point():
                dist.all_reduce(t)
                t.div_(self.world)
            else:
                dist.broadcast(t, 0)

    def decide(self, value: bool) -> bool:
        """Rank 0's value of a host-side decision (a timer), on every rank: they must all take the same branch."""
        if not self.active:
            return value
        flag = torch.tensor([int(value)], dtype=torch.int32)  # on the CPU: gloo, no device sync
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def all_true(self, value: bool) -> bool:
        if not self.active:
            return value
        flag = torch.tensor([int(not value)], dtype=torch.int32)
        dist.all_reduce(flag)
        return flag.item() == 0

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        box = [None] * self.world
        dist.all_gather_object(box, obj)
        return box

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable: a config, a checkpoint's tensors) on every rank."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, 0, device=torch.device("cpu"))
        return box[0]


def check_batch(batch_size: int, world: int | None = None) -> None:
    """The global --batch-size must split evenly over the ranks."""
    world = world_size() if world is None else world
    if world > 1 and batch_size % world:
        raise UsageError(f"--batch-size {batch_size} does not split over {world} ranks: give a multiple of "
                         f"{world} (each rank takes batch-size / {world} images a step)")


def _device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"give torchrun --nproc_per_node {torch.cuda.device_count()} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _timeout() -> timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        seconds = DEFAULT_TIMEOUT_S
    return timedelta(seconds=max(seconds, 1.0))


@contextmanager
def session(device: torch.device) -> Iterator[Context]:
    """The process group for one command, torn down at its end; see the module's docstring for failures."""
    world = world_size()
    if world <= 1:
        yield Context(device=device)
        return
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UsageError("WORLD_SIZE is set but RANK is not: start data-parallel training with torchrun") from None
    try:
        device = _device(device, local_rank)
    except UsageError as e:
        raise MirageError(f"rank {rank} of {world}: {e}") from None
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=_timeout())
    except (RuntimeError, ValueError) as e:
        raise MirageError(f"rank {rank} of {world}: cannot join the other ranks ({_first_line(e)})") from None
    ctx = Context(rank=rank, world=world, device=device, backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield ctx
    except UsageError:
        if not ctx.main:  # every rank sees the same bad argument: rank 0 alone says so
            raise SystemExit(2) from None
        _record_failure()
        raise
    except KeyboardInterrupt:
        if not ctx.main:
            raise SystemExit(130) from None
        raise
    except Exception as e:
        if _is_peer_failure(e):
            if _failed_elsewhere():
                raise SystemExit(1) from None  # the rank that failed has said why
            raise MirageError(f"rank {rank} of {world}: lost contact with the other ranks ({_peer_cause(e)}); "
                              f"continue from the last checkpoint with --resume") from None
        if not _record_failure():
            raise SystemExit(1) from None  # several ranks failed (the same way, mostly): the first one says why
        if isinstance(e, MirageError):
            e.args = (f"rank {rank} of {world}: {e}",)
            raise
        if isinstance(e, OSError):
            raise MirageError(f"rank {rank} of {world}: {e}") from e
        if type(e).__str__ is BaseException.__str__:
            e.args = (f"rank {rank} of {world}: {e}",)
        raise
    finally:
        dist.destroy_process_group()


def _is_peer_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection reset",
                                                                     "Connection closed", "Broken pipe"))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _record_failure() -> bool:
    """Count this rank's failure in the store; True if it is the first (the one to say why)."""
    store = _store()
    if store is None:
        return True
    try:
        return store.add(FAILED_KEY, 1) == 1
    except (RuntimeError, ValueError):
        return True


def _failed_elsewhere() -> bool:
    """Whether another rank recorded a failure. A store that cannot be reached lived in a rank that is gone
    (torch.multiprocessing; torchrun keeps it in its agent): that rank failed, and said so if it could."""
    store = _store()
    if store is None:
        return False
    try:
        return bool(store.check([FAILED_KEY]))
    except (RuntimeError, ValueError):
        return True


def _peer_cause(e: BaseException) -> str:
    """gloo's or NCCL's message without its source location and its advice: "Connection closed by peer ..."."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(e))
    return text.split(". This is typically")[0][:160]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
