"""The `mirage` command. Exit codes: 0 done, 1 failure, 2 usage error; errors are one line, no traceback."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
from typing import Sequence

from mirage import __version__
from mirage.app import again, rank, score, train
from mirage.app.args import add_common
from mirage.app.commands import COMMANDS
from mirage.errors import MirageError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (what is wrong, where to read more) instead of the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mirage", description="Creative work with pixel-space diffusion "
                                     "models: sampling, edits, inpainting, visual anagrams, hybrid images.")
    parser.add_argument("--version", action="version", version=f"mirage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.common:
            add_common(p)
        cmd.arguments(p)
        p.set_defaults(func=cmd.handler)
    train.register(sub)
    score.register(sub)
    rank.register(sub)
    p = sub.add_parser("again", help="make a recorded result again: an image, or a whole run",
                       description=again.__doc__.splitlines()[0])
    again.add_arguments(p)
    p.set_defaults(func=_again)
    p = sub.add_parser("ui", help="the web UI: every task in the browser (needs gradio: pip install 'mirage[ui]')",
                       description="Serve mirage's tasks as a web page (gradio), on this machine only by default.")
    p.add_argument("--model", default="fashion", help="the model the page starts with (default: fashion)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--out", default="mirage-ui-runs", help="where every run's numbered folder goes (default "
                                                           "./mirage-ui-runs)")
    p.set_defaults(func=_ui)
    return parser


def _again(args) -> int:
    return main(again.again_argv(args.source, args.out))


def _ui(args) -> int:
    """The web UI lives in app/ui.py, imported only here: gradio is an optional extra, and importing it
    would slow every other command."""
    if importlib.util.find_spec("gradio") is None:
        raise UsageError("the web UI needs gradio, an optional extra: pip install 'mirage[ui]'")
    return importlib.import_module("mirage.app.ui").serve(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:  # the command itself, not a call from Python: `kill` stops it as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what this run records, so that `mirage again` can make it again
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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _silence_libraries() -> None:
    """--quiet: no loading bars or notices from the libraries underneath, only mirage's own errors. Set
    through the environment, which they read when imported: importing them here would cost a built-in
    model's run a second."""
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")


def _is_oom(e: Exception) -> bool:
    return "out of memory" in str(e).lower() or e.__class__.__name__ == "OutOfMemoryError"


if __name__ == "__main__":
    sys.exit(main())
