"""Ranks started by hand, as torchrun sets them up but without its agent (which ends the survivors itself):
what a test needs to see how the ranks of a job end on their own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "MIRAGE_DIST_TIMEOUT": "60"}
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_by_hand(script: str, argv: list[str], world: int = 2, timeout: float = 120) -> tuple[list[int], list[str]]:
    """Runs `python -c script *argv` as `world` ranks; (their exit codes, their stderr)."""
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", script, *argv],
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [p.returncode for p in ranks], errs
