"""Peak host memory of a benchmark process, told right also in a fresh child process."""
from __future__ import annotations

import resource
from pathlib import Path

GiB = 2**30


def peak_rss_gib() -> tuple[float, float | None]:
    """This process's peak RSS: (ru_maxrss, /proc's VmHWM where there is one). In a child ru_maxrss is no
    measure: at exec Linux folds the high-water mark of the address space it replaces (the parent's, under
    vfork; a copy of it after fork) into it. The H200 run: 11.1 GiB, this parent's, against a VmHWM of 2.75
    GiB. So the fresh process's figure is VmHWM."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    try:
        hwm = next(int(line.split()[1]) * 1024 / GiB for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        hwm = None
    return maxrss, hwm


def rss_text(maxrss: float, hwm: float | None) -> str:
    if hwm is None:
        return f"{maxrss:.2f} GiB (ru_maxrss)"
    return f"{hwm:.2f} GiB (VmHWM" + (f"; ru_maxrss {maxrss:.2f} GiB, with the parent's at the fork)"
                                      if abs(hwm - maxrss) > 0.01 else ")")
