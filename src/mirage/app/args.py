"""The command line's shared arguments and their parsing: seeds, intervals, the options every task takes."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Iterator

from mirage.app.defaults import X4_RECIPE
from mirage.backends.runtime import COMPILE_SCOPES
from mirage.errors import UsageError


# ---- argument helpers ---------------------------------------------------------------------------
class Seeds(Sequence):
    """The seeds of a run as the ranges that name them, never listed: --seeds 0-100000000 costs no memory."""

    def __init__(self, ranges: list[range]):
        self.ranges = ranges

    def __len__(self) -> int:
        return sum(len(r) for r in self.ranges)

    def __iter__(self) -> Iterator[int]:
        for r in self.ranges:
            yield from r

    def __getitem__(self, k: int) -> int:
        if k < 0:
            k += len(self)
        for r in self.ranges:
            if 0 <= k < len(r):
                return r[k]
            k -= len(r)
        raise IndexError("seed index out of range")

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Seeds({self.ranges})"


def parse_seeds(text: str) -> Seeds:
    """'0-7,12' -> 0, ..., 7, 12."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise UsageError(f"--seeds takes numbers and ranges like 0-7,12, got {text!r}") from None
        if last < first:
            raise UsageError(f"--seeds range {part.strip()} runs backwards: write {last}-{first}")
        if first < 0:
            raise UsageError(f"--seeds must be >= 0, got {first}")
        ranges.append((first, last))
    for (_, last), (first, _) in zip(sorted(ranges), sorted(ranges)[1:]):
        if first <= last:  # two ranges (or numbers) overlap: the lowest shared seed is `first`
            raise UsageError(f"--seeds names seed {first} more than once: each seed makes one image")
    return Seeds([range(first, last + 1) for first, last in ranges])


def parse_interval(text: str | None) -> tuple[int, int] | None:
    """'150-850' -> (150, 850); 'none' -> None."""
    if text is None or text.strip().lower() == "none":
        return None
    lo, sep, hi = text.partition("-")
    try:
        interval = (int(lo), int(hi))
    except ValueError:
        interval = None
    if not sep or interval is None or not 0 <= interval[0] <= interval[1]:
        raise UsageError(f"--guidance-interval takes LO-HI timesteps with 0 <= LO <= HI, or none; got {text!r}")
    return interval


def seeds_of(args) -> Seeds:
    if args.seeds:
        return parse_seeds(args.seeds)
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    return Seeds([range(args.seed, args.seed + args.n)])


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", default="fashion",
                   help="built-in model (fashion, digits), a mirage .safetensors file, or an IF stage-I hub id "
                        "or folder, e.g. DeepFloyd/IF-I-XL-v1.0 (default: fashion)")
    g.add_argument("--upscaler", default="auto",
                   help="IF stage-II hub id or folder, or none (default: DeepFloyd/IF-II-L-v1.0 after an IF "
                        "model, none after a built-in one)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--memory", default="auto",
                   help="memory plan for IF: auto, gpu, offload, blocks, cpu (default auto: from free VRAM/RAM)")
    g.add_argument("--compile", action="store_true",
                   help="IF with its UNet resident on a GPU: compile the UNets' repeated blocks (measured on an "
                        "H200: a 2-view 64->256 anagram in 2.1 s; the first process spends about 4 minutes "
                        "compiling, later ones about 45 s, as the compiled code is cached)")
    g.add_argument("--compile-scope", choices=COMPILE_SCOPES,
                   help="with --compile: blocks (default), each block compiled whole, or fused, only the "
                        "elementwise work (measured on an H100: compiles in 27-33 s, 5-8 s cached, runs a "
                        "2-view anagram in 2.9 s against blocks' 2.1 s and eager's 3.4 s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    g.add_argument("--n", type=int, default=1, help="number of images, seeds seed..seed+n-1 (default 1)")
    g.add_argument("--seeds", help="explicit seeds, e.g. 0-7,12 (overrides --seed/--n)")
    g.add_argument("--steps", type=int, help="denoising steps, spaced as diffusers does (default: 100 for IF and "
                                             "built-in samples and hybrids, 30 for the other tasks of built-in models)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 7 for IF; for built-in "
                                                  "models 1.5 for samples, 5 for anagrams and hybrids, 2 for "
                                                  "edits)")
    g.add_argument("--guidance-interval", metavar="LO-HI",
                   help="guide only at timesteps LO..HI, e.g. 150-850, or none (default: none for IF; 150-850 for "
                        "built-in samples)")
    g.add_argument("--classifier-guidance", type=float, metavar="S",
                   help="built-in models: also steer each prompt with the data set's guide, a classifier of noisy "
                        "images, at strength S; 0 = off (default: the strength the guide's file gives for the "
                        "task, measured: fashion 300 for anagrams and hybrids, digits 100 for anagrams, else 0)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    g.add_argument("--scheduler", default=None, metavar="NAME",
                   help="a diffusers scheduler built from the model's own config: ddpm, ddim, pndm, lms, euler, "
                        "euler_a, dpm++2m, unipc (default: Stable Diffusion's folder's own; --sampler otherwise)")
    g.add_argument("--size", type=int, default=None,
                   help="Stable Diffusion: image side in px, a multiple of 8 x its VAE factor (default: from its "
                        "config, 512 for SD 1.x, 768 for 2.x); upscale: the output side")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (with --sampler ddim)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per model call (default: all of a chunk of up to 64 at once); results do not "
                        "depend on it")
    g.add_argument("--schedule", metavar="NAME",
                   help="IF: one of DeepFloyd's published timestep lists instead of --steps: fast27, smart27, "
                        "smart50, smart100, smart185, super27, super40, super100")
    s2 = p.add_argument_group("stages II and III (IF's upscaler, then the x4 upscaler)")
    s2.add_argument("--schedule2", metavar="NAME", help="stage II: a published timestep list instead of "
                                                         "--steps2 (e.g. smart50)")
    s2.add_argument("--steps2", type=int, default=50, help="stage-II steps (default 50)")
    s2.add_argument("--guidance2", type=float, default=4.0, help="stage-II guidance (default 4)")
    s2.add_argument("--noise-level", type=int, default=None,
                    help="stage-II noise level of the 64-px image (default 250; `mirage upscale`: 20)")
    s2.add_argument("--stage3", default="none", metavar="MODEL",
                    help="after IF stage II: the Stable Diffusion x4 upscaler (hub id or folder), or none")
    s2.add_argument("--steps3", type=int, default=X4_RECIPE["steps"],
                    help=f"stage-III steps (default {X4_RECIPE['steps']}, the x4 upscaler's recipe)")
    s2.add_argument("--guidance3", type=float, default=X4_RECIPE["guidance"],
                    help=f"stage-III guidance (default {X4_RECIPE['guidance']:g})")
    s2.add_argument("--noise-level3", type=int, default=X4_RECIPE["noise_level"],
                    help=f"stage-III noise level of the 256-px image (default {X4_RECIPE['noise_level']})")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: out/<command>); an existing, non-empty "
                                               "folder gets a numbered sibling instead of being overwritten")
    o.add_argument("--quiet", action="store_true", help="print only errors")


class Once(argparse.Action):
    """An option given at most once: a second value is refused, not silently taken over the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"{option_string} was given twice; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


# ---- commands ----------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    common: bool = True
