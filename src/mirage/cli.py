"""The `mirage` command. Exit codes: 0 done, 1 failure, 2 usage error; errors are one line, no traceback."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import MirageError, UsageError

# IFPipeline's own; no classifier checks IF images, so one try (confidence is then unused); sigma None is
# filters.SIGMA, looked up only when asked for (importing filters here would load torch for every command)
IF_DEFAULTS = dict(steps=100, guidance=7.0, guidance_interval=None, tries=1, confidence=0.5, sigma=None)
# built-ins, per task where "<setting>_<task>" is given (measured in builtin/README.md): samples guided only at
# timesteps 150-850 keep both class accuracy and diversity (Frechet distance), and each is remade (up to 3
# tries) where the classifier is not at least 50 % sure of its class; illusions, steered by classifier guidance
# at the strength their guide's file gives, are remade (up to 8 tries) until it is 90 % sure of every prompt;
# hybrids split low from high at sigma 3.5 and take 100 steps (their low prompt gains most from them).
SMALL_DEFAULTS = dict(steps=30, guidance=2.0, guidance_interval=None, tries=8, confidence=0.9, sigma=None,
                      steps_sample=100, guidance_sample=1.5, guidance_interval_sample=(150, 850), tries_sample=3,
                      confidence_sample=0.5, guidance_anagram=5.0, guidance_hybrid=5.0, sigma_hybrid=3.5,
                      steps_hybrid=100)


def task_defaults(small: bool, task: str) -> dict:
    """steps, guidance, guidance interval, tries, confidence and hybrid sigma for one task: the task's own
    where given, then the general ones."""
    defaults = SMALL_DEFAULTS if small else IF_DEFAULTS
    keys = ("steps", "guidance", "guidance_interval", "tries", "confidence", "sigma")
    chosen = {k: defaults.get(f"{k}_{task}", defaults[k]) for k in keys}
    if chosen["sigma"] is None:
        from .filters import SIGMA

        chosen["sigma"] = SIGMA
    return chosen


# ---- argument helpers ---------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """'0-7,12' -> [0, ..., 7, 12]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise UsageError(f"--seeds takes numbers and ranges like 0-7,12, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds names no seed")
    return seeds


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


def seeds_of(args) -> list[int]:
    if args.seeds:
        return parse_seeds(args.seeds)
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    return list(range(args.seed, args.seed + args.n))


def add_common(p: argparse.ArgumentParser, prompt_default: str | None = "") -> None:
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
                   help="IF on a GPU: torch.compile the UNets (about 1.5x faster; each new batch size compiles "
                        "for 1-2 minutes the first time, cached after)")
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
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (with --sampler ddim)")
    g.add_argument("--batch-size", type=int, default=0, help="images per model batch (default: all at once)")
    s2 = p.add_argument_group("stage II (IF upscaler)")
    s2.add_argument("--steps2", type=int, default=50, help="stage-II steps (default 50)")
    s2.add_argument("--guidance2", type=float, default=4.0, help="stage-II guidance (default 4)")
    s2.add_argument("--noise-level", type=int, default=250, help="stage-II noise level of the 64-px image")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default: out/<command>); an existing, non-empty "
                                               "folder gets a numbered sibling instead of being overwritten")
    o.add_argument("--quiet", action="store_true", help="print only errors")


# ---- commands ----------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    common: bool = True
    aliases: Sequence[str] = field(default_factory=tuple)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(prog="mirage", description="Creative work with pixel-space diffusion "
                                     "models: sampling, edits, inpainting, visual anagrams, hybrid images.")
    parser.add_argument("--version", action="version", version=f"mirage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.common:
            add_common(p)
        cmd.arguments(p)
        p.set_defaults(func=cmd.handler)
    for register in _plugins():
        register(sub)
    return parser


def _plugins():
    """Subcommands that live with their code: training and scoring."""
    import importlib

    for module in ("mirage.train.cli", "mirage.score"):
        try:
            yield importlib.import_module(module).register
        except (ImportError, AttributeError):  # a part not installed (or not built yet) adds no command
            continue


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        _silence_libraries()
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(f"mirage {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MirageError as e:
        print(f"mirage {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mirage {args.command}: interrupted; finished images were kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if _is_oom(e):
            print(f"mirage {args.command}: error: out of memory ({e.__class__.__name__}); try --memory offload, "
                  f"a smaller --batch-size or --device cpu", file=sys.stderr)
            return 1
        if os.environ.get("MIRAGE_DEBUG"):
            raise
        print(f"mirage {args.command}: internal error: {e.__class__.__name__}: {e} "
              f"(rerun with MIRAGE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


def _silence_libraries() -> None:
    """--quiet: no loading bars or notices from the libraries underneath, only mirage's own errors. Set
    through the environment, which they read when imported: importing them here would cost a built-in
    model's run a second."""
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")


def _is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower() or e.__class__.__name__ == "OutOfMemoryError"


if __name__ == "__main__":
    sys.exit(main())
