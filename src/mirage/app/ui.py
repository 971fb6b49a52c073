"""`mirage ui`: every task in the browser, a gradio Blocks app with one tab per task.

There is no second code path: each form's fields are made from its subcommand's options (their defaults,
help and choices), a click turns them into the argv a command-line user would type, with an explicit `--out`
run folder under the UI's `--out`, and `mirage.app.main.main` runs it in this process: the same parser, the
same validation, the same records. The page then shows what that run folder holds (result.json, the PNGs
with their `parameters`, the GIF/MP4, the sheet). Errors are the command's one line; nothing else is
written. Models stay loaded between runs (pipeline.models). One generation runs at a time (gradio's queue),
and each browser tab keeps its own results.
"""
from __future__ import annotations

import argparse
import contextvars
import ctypes
import ctypes.util
import gc
import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from io import BytesIO, StringIO
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402 - after the environment it reads

from mirage.app import main as cli  # noqa: E402
from mirage.app import pipeline  # noqa: E402
from mirage.backends.small import BUILTIN  # noqa: E402
from mirage.errors import MirageError, UsageError  # noqa: E402
from mirage.illusions.filters import PARTS  # noqa: E402
from mirage.illusions.views import VIEW_NAMES, parse_views  # noqa: E402
from mirage.io import load_image, to_pil  # noqa: E402

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
HUB_MODELS = ("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-I-L-v1.0", "DeepFloyd/IF-I-M-v1.0",
              "stable-diffusion-v1-5/stable-diffusion-v1-5")  # listed; any other hub id or folder can be typed
TASKS = ("sample", "edit", "inpaint", "anagram", "hybrid", "denoise", "score")
GENERATE = "generate"  # the one concurrency group: one generation at a time, whichever tab asks
MAX_VIEWS = len(VIEW_NAMES)
VIEW_ORDER = ("identity", "flip", "rotate_cw", "rotate_180", "rotate_ccw", "mirror", "negate", "skew",
              "patch_permute", "pixel_permute", "jigsaw", "inner_circle", "square_hinge")
SHOWN = 256  # view images are blown up to this size (pixelated) to be seen
# the options every generating task shares, shown once above the tabs; the first row, then "more settings"
COMMON = ("--model", "--seed", "--n", "--steps", "--guidance", "--pick")
SKIP = ("-h", "--help", "--out", "--quiet", "--prompt")  # --out is the UI's run folder; --quiet would hide the notes
ALWAYS = ("--model", "--seed")  # written into the argv even at their default: what the run was made with
CSS = """
.pixelated img, #anagram-views img, .mirage-results img { image-rendering: pixelated; }
footer { display: none !important; }
"""
BAR = re.compile(r"\|\s*\d+/\d+ \[|^\s*\d+%\|")  # a tqdm bar's line


# ---- the command line, run in this process -----------------------------------------------------------------
def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def more_options(parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """The options every generating task shares, and those of the candidates (--tries, ...) that samples and
    illusions share, beyond the first row: whatever the command line has now, in its order."""
    shared = set(parsers["sample"]._option_string_actions) & set(parsers["anagram"]._option_string_actions)
    return [a.option_strings[-1] for a in parsers["anagram"]._actions
            if a.option_strings and a.option_strings[-1] in shared
            and not set(a.option_strings) & {*SKIP, *COMMON}]


def _lines(text: str) -> list[str]:
    """What a terminal would show of `text`: each line as its last carriage return left it, bars dropped."""
    shown = (line.rsplit("\r", 1)[-1].strip() for line in text.split("\n"))
    return [line for line in shown if line and not BAR.search(line)]


@dataclass
class Outcome:
    code: int  # the command's exit code
    message: str  # its last line: what it wrote, or its one-line error
    notes: list[str] = field(default_factory=list)  # what else it said (warnings, notes)
    printed: list[str] = field(default_factory=list)  # all it printed to stdout (score's summary)

    @property
    def ok(self) -> bool:
        return self.code == 0


def run_command(argv: list[str]) -> Outcome:
    """`mirage ARGV`, as the command line runs it: its parser, its handler, its one-line errors and exit
    codes (argparse's own errors included). What it prints is kept to be shown, not printed."""
    out, err = StringIO(), StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse refused the arguments: its message is on stderr
                code = e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - main lets errors through only under MIRAGE_DEBUG: still one line here
        if os.environ.get("MIRAGE_DEBUG"):
            traceback.print_exc()
        return Outcome(1, f"internal error: {e.__class__.__name__}: {e}")
    said = _lines(err.getvalue())
    if code == 0:
        done = _lines(out.getvalue())
        return Outcome(0, done[-1] if done else "done", said, done)
    message = said[-1] if said else f"mirage {argv[0]} stopped with exit code {code}"
    return Outcome(code, re.sub(r"^mirage [\w-]+: ", "", message), said[:-1])


class Worker:
    """The one thread every run goes on, in the caller's context (gradio's progress tracker with it). The
    queue already runs one at a time; one thread also keeps one thread's memory: runs spread over gradio's
    pool of threads would each leave freed buffers in their own malloc arena, and the server would grow.
    After each run, what was freed goes back to the system."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mirage-run")
        name = ctypes.util.find_library("c")
        self.libc = ctypes.CDLL(name) if name else None
        self.running: int | None = None  # the thread id while a run is on

    def __call__(self, fn, *args):
        return self.pool.submit(contextvars.copy_context().run, self._run, fn, *args).result()

    def _run(self, fn, *args):
        self.running = threading.get_ident()
        try:
            return fn(*args)
        finally:
            self.running = None
            gc.collect()
            if self.libc is not None and hasattr(self.libc, "malloc_trim"):  # glibc
                self.libc.malloc_trim(0)

    def interrupt(self) -> None:
        """Ctrl-C reaches the run as it reaches a command's: a KeyboardInterrupt in it, which the command
        turns into "interrupted; finished images were kept", its run folder listing what was complete."""
        if self.running is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.running), ctypes.py_object(KeyboardInterrupt))
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---- run folders and inputs ---------------------------------------------------------------------------------
class Runs:
    """The UI's --out: one numbered run folder per click (0001-anagram, ...), and the uploaded inputs the
    runs read, kept by content under inputs/ so that a run's record names a file that stays."""

    def __init__(self, root: Path):
        self.root = root  # as given: a relative --out stays relative in the runs' argv, as a user would type it
        self.inputs = self.root / "inputs"
        self._lock = threading.Lock()

    def claim(self, task: str) -> Path:
        """A new, empty, numbered folder: the command's --out (an empty folder is one it takes as is)."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for p in self.root.iterdir() if (m := re.match(r"(\d+)-", p.name))]
            n = max(numbers, default=0) + 1
            while True:
                folder = self.root / f"{n:04d}-{task}"
                try:
                    folder.mkdir()
                    return folder
                except FileExistsError:
                    n += 1

    def folders(self) -> list[str]:
        """Run folders that hold a result, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if re.match(r"\d+-", p.name) and (p / "result.json").is_file()]
        return [str(p) for p in sorted(found, key=lambda p: p.name, reverse=True)]

    def keep(self, upload: str | None) -> str | None:
        """An upload copied under inputs/, named by its content: the path a run's argv gives."""
        if not upload:
            return None
        data = Path(upload).read_bytes()
        return str(self._store(data, Path(upload).name))

    def keep_picture(self, picture: Image.Image, name: str) -> str:
        with BytesIO() as f:
            picture.save(f, format="PNG")
            return str(self._store(f.getvalue(), name))

    def _store(self, data: bytes, name: str) -> Path:
        stem = re.sub(r"[^\w.-]", "_", name)[-80:] or "upload"
        target = self.inputs / f"{hashlib.sha256(data).hexdigest()[:12]}-{stem}"
        if not target.exists():
            self.inputs.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return target


# ---- forms: fields made from the subcommands' options -------------------------------------------------------
def _short(text: str | None) -> str | None:
    """An option's help, its first clause: what it is, not every default (a blank field takes those)."""
    if not text:
        return None
    text = re.split(r" \(|; ", text.replace("%%", "%"), maxsplit=1)[0]
    return text if len(text) <= 120 else text[:117].rsplit(" ", 1)[0] + " ..."


def widget(action: argparse.Action, label: str | None = None, **kw) -> gr.components.Component:
    """The field for one option: its default, its help, its choices, as the command line has them."""
    label = label or (action.option_strings[-1] if action.option_strings else action.dest)
    info = kw.pop("info", _short(action.help))
    if action.nargs == 0:  # a switch
        return gr.Checkbox(value=bool(action.default), label=label, info=info, min_width=200, **kw)
    if action.choices:
        return gr.Dropdown(choices=list(action.choices), value=action.default, label=label, info=info, **kw)
    if action.type in (int, float) and action.default is not None:  # a blank Number reads as 0: not for these
        return gr.Number(value=action.default, label=label, info=info, precision=0 if action.type is int else None,
                         placeholder="default", **kw)
    return gr.Textbox(value="" if action.default is None else str(action.default), label=label, info=info,
                      placeholder="default" if action.default is None else None, max_lines=1, **kw)


def _text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def to_argv(parser: argparse.ArgumentParser, values: list[tuple[str, object]]) -> list[str]:
    """The options a command-line user would type for these field values: those the subcommand takes, each
    where it differs from its default (blank = the default), `ALWAYS` always."""
    options = parser._option_string_actions
    argv: list[str] = []
    for flag, value in values:
        action = options.get(flag)
        if action is None:
            continue
        if action.nargs == 0:
            if value:
                argv.append(flag)
            continue
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if action.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if flag not in ALWAYS and value == action.default:
            continue
        argv += [flag, _text(value).strip() if isinstance(value, str) else _text(value)]
    return argv


@dataclass
class Panel:
    """A tab's results: the images, the selected one's seed, parameters and files, the sheet."""

    status: gr.Textbox
    state: gr.State
    gallery: gr.Gallery
    seed: gr.Number
    parameters: gr.Textbox
    command: gr.Textbox
    files: gr.File
    reuse: gr.Button
    sheet: gr.Image | None = None
    views: gr.Gallery | None = None
    animation: gr.Image | None = None

    def outputs(self) -> list:
        return [c for c in (self.status, self.state, self.gallery, self.seed, self.parameters, self.command,
                            self.files, self.sheet, self.views, self.animation) if c is not None]


def _entries(folder: str | None) -> list[dict]:
    if not folder:
        return []
    try:
        return json.loads((Path(folder) / "result.json").read_text()).get("images", [])
    except (OSError, ValueError):
        return []


def _caption(entry: dict) -> str:
    parts = [f"#{entry['rank']}"] if "rank" in entry else []
    parts.append(f"seed {entry.get('seed')}")
    if "start" in entry:
        parts.append(f"start {entry['start']}")
    if "score" in entry:
        parts.append(f"score {entry['score']:.2f}")
    if entry.get("right") is False:
        parts.append("(not read right)")
    return " ".join(parts)


def _upright(folder: Path, entry: dict) -> list[tuple[Image.Image, str]]:
    """Each view of an anagram as its viewer sees it, under its prompt."""
    path = folder / entry["file"]
    with Image.open(path) as im:
        side, channels = im.width, 1 if im.mode in ("L", "I;16", "I") else 3
    image = load_image(path, size=side, channels=channels)
    views = parse_views(entry["views"], entry.get("view_seed", 0))
    shown = []
    for view, prompt in zip(views, entry["prompts"]):
        picture = to_pil(view.view(image)[0]).resize((SHOWN, SHOWN), Image.Resampling.NEAREST)
        shown.append((picture, f"{view.name}: {prompt or '(unconditional)'}"))
    return shown


def details(panel: Panel, folder: str | None, index: int) -> dict:
    """The panel's fields for image `index` of the run in `folder`."""
    entries = _entries(folder)
    empty = {panel.seed: None, panel.parameters: "", panel.command: "", panel.files: None}
    if panel.views is not None:
        empty.update({panel.views: None, panel.animation: None})
    if not entries:
        return empty
    run = Path(folder)
    entry = entries[min(max(index, 0), len(entries) - 1)]
    files = [entry["file"], entry.get("stage1_file"), entry.get("animation"), entry.get("video"), "result.json",
             *json.loads((run / "result.json").read_text()).get("sheets", [])]
    try:
        with Image.open(run / entry["file"]) as im:
            parameters = im.text.get("parameters", "")
    except OSError:
        parameters = ""
    shown = {panel.seed: entry.get("seed"), panel.parameters: parameters,
             panel.command: json.loads((run / "result.json").read_text()).get("command", ""),
             panel.files: [str(run / f) for f in dict.fromkeys(files) if f and (run / f).is_file()]}
    if panel.views is not None:
        shown[panel.views] = _upright(run, entry) if "views" in entry else None
        shown[panel.animation] = str(run / entry["animation"]) if entry.get("animation") else None
    return shown


def results(panel: Panel, folder: str) -> dict:
    entries = _entries(folder)
    run = Path(folder)
    shown = {panel.gallery: [(str(run / e["file"]), _caption(e)) for e in entries],
             panel.state: dict(folder=folder, index=0)}
    if panel.sheet is not None:
        sheets = json.loads((run / "result.json").read_text()).get("sheets", []) if entries else []
        shown[panel.sheet] = str(run / sheets[0]) if sheets else None
    return {**shown, **details(panel, folder, 0)}


def result_panel(task: str) -> Panel:
    gallery = gr.Gallery(label="results (best first where ranked)", columns=6, height=180, object_fit="contain",
                         fit_columns=False, preview=False,
                         elem_id=f"{task}-results", elem_classes=["mirage-results"], format="png",
                         interactive=False)
    views = animation = sheet = None
    if task == "anagram":
        with gr.Row():
            views = gr.Gallery(label="each view, upright", columns=2, height=300, object_fit="contain", fit_columns=False,
                               elem_id="anagram-views", format="png", interactive=False)
            animation = gr.Image(label="turning from view to view", type="filepath", height=300,
                                 elem_id="anagram-animation", interactive=False)
    else:
        sheet = gr.Image(label="contact sheet", type="filepath", elem_id=f"{task}-sheet", interactive=False,
                         elem_classes=["pixelated"])
    with gr.Row():
        seed = gr.Number(label="seed of this image", precision=0, interactive=False, elem_id=f"{task}-seed")
        reuse = gr.Button("reuse settings", elem_id=f"{task}-reuse", scale=0)
    parameters = gr.Textbox(label="parameters (the PNG's text chunk)", lines=2, interactive=False,
                            elem_id=f"{task}-parameters")
    command = gr.Textbox(label="the same run on the command line", interactive=False, elem_id=f"{task}-command")
    files = gr.File(label="downloads: the image, result.json, animation, sheet", file_count="multiple",
                    interactive=False, elem_id=f"{task}-files")
    return Panel(status=None, state=gr.State(None), gallery=gallery, seed=seed, parameters=parameters,
                 command=command, files=files, reuse=reuse, sheet=sheet, views=views, animation=animation)


# ---- the app --------------------------------------------------------------------------------------------------
class App:
    def __init__(self, model: str, root: Path):
        self.runs = Runs(root)
        self.worker = Worker()
        self.model = model
        self.parsers = subcommands()
        self.common: list[tuple[str, gr.components.Component]] = []

    # ---- one click: the argv, the run, what it made -----------------------------------------------------------
    def generate(self, task: str, argv: list[str], panel: Panel) -> dict:
        folder = self.runs.claim(task)
        outcome = self.worker(run_command, [task, *argv, "--out", str(folder)])
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # nothing was made: no trace, as the command leaves none
        made = (folder / "result.json").is_file()
        if outcome.ok:
            said = "".join(f"\n{n}" for n in outcome.notes)
            return {panel.status: f"{folder.name}: {outcome.message}{said}", **results(panel, str(folder))}
        if "out of memory" in outcome.message:
            pipeline.models.clear()  # the next run starts from a clean slate
        message = outcome.message if outcome.message.startswith(("error", "internal error")) else \
            f"error: {outcome.message}"
        if made:  # stopped part way: what was complete is kept, and shown
            return {**results(panel, str(folder)), panel.status: f"{folder.name}: {message}"}
        return {panel.status: message}

    def folders(self):
        return gr.update(choices=self.runs.folders())

    def values(self, data: dict, fields: list[tuple[str, gr.components.Component]]) -> list[tuple[str, object]]:
        return [(flag, data[c]) for flag, c in fields]

    def handler(self, task: str, panel: Panel, fields, extra=None):
        """The click: common and task fields to argv (with `extra(data)`'s options), the run, its results."""
        parser = self.parsers[task]
        components = {c for _, c in self.common + fields} | set(getattr(extra, "inputs", ()))

        def run(data: dict, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's convention
            try:
                argv = to_argv(parser, self.values(data, self.common + fields))
                if extra is not None:
                    argv += extra(data)
            except (UsageError, MirageError) as e:
                return {panel.status: f"error: {e}"}
            except OSError as e:
                return {panel.status: f"error: cannot read the upload: {e.strerror or e}"}
            return self.generate(task, argv, panel)
        return run, components

    def wire(self, task: str, button: gr.Button, panel: Panel, fields, extra=None, reuse_extra=None) -> None:
        run, components = self.handler(task, panel, fields, extra)
        button.click(run, inputs=components, outputs=panel.outputs(), concurrency_id=GENERATE, concurrency_limit=1,
                     show_progress_on=[panel.gallery]).then(self.folders, None, self.score_runs, queue=False)

        def select(state, evt: gr.SelectData):
            if not state:
                return {}
            return {panel.state: dict(state, index=evt.index), **details(panel, state["folder"], evt.index)}
        panel.gallery.select(select, inputs=[panel.state], outputs=panel.outputs(), queue=False)

        reused = [c for _, c in self.common + fields] + list(getattr(reuse_extra, "outputs", ()))

        def reuse(state):
            entries = _entries(state and state["folder"])
            if not entries:
                return {panel.status: "nothing to reuse yet: make a result first"}
            entry = entries[min(state["index"], len(entries) - 1)]
            try:
                args = self.parsers[task].parse_args(entry["argv"][1:])
            except SystemExit:
                return {panel.status: "this result's settings cannot be read back"}
            updates = {}
            for flag, c in self.common + fields:
                action = self.parsers[task]._option_string_actions.get(flag)
                if action is not None:
                    value = getattr(args, action.dest)
                    updates[c] = ("" if isinstance(c, gr.Textbox) else None) if value is None else value
            seeds = dict(self.common)
            updates.update({seeds["--seed"]: entry["seed"], seeds["--n"]: 1, seeds["--seeds"]: ""})
            if reuse_extra is not None:
                updates.update(reuse_extra(args))
            updates[panel.status] = f"settings of seed {entry['seed']} loaded from {Path(state['folder']).name}"
            return updates
        panel.reuse.click(reuse, inputs=[panel.state], outputs=[panel.status, *reused], queue=False)

    # ---- the page --------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        anagram = self.parsers["anagram"]  # it takes every common option, --pick/--tries/--confidence included
        opts = anagram._option_string_actions
        with gr.Blocks(title="mirage", analytics_enabled=False) as demo:
            gr.Markdown("## mirage\nVisual anagrams, hybrid images, edits and inpainting with pixel-space "
                        "diffusion models: the `mirage` command's tasks, with its defaults and checks. Blank "
                        "fields take the command's default.")
            with gr.Row():
                choices = list(dict.fromkeys([self.model, *BUILTIN, *HUB_MODELS]))
                model = gr.Dropdown(choices=choices, value=self.model, allow_custom_value=True, label="--model",
                                    info="built-in (fashion, digits), a mirage .safetensors, or an IF / Stable "
                                         "Diffusion hub id or folder", elem_id="model", scale=2)
                self.common.append(("--model", model))
                for flag in COMMON[1:]:
                    self.common.append((flag, widget(opts[flag], elem_id=flag.strip("-"))))
            with gr.Accordion("more settings", open=False):
                more = more_options(self.parsers)
                for switches in (False, True):  # the switches in a row of their own
                    with gr.Row():
                        for flag in (f for f in more if (opts[f].nargs == 0) == switches):
                            self.common.append((flag, widget(opts[flag], elem_id=flag.strip("-"))))
            self.score_runs = gr.Dropdown(choices=self.runs.folders(), label="run folder", allow_custom_value=True,
                                          info="a folder a mirage command wrote (it holds result.json)",
                                          elem_id="score-folder", scale=4, render=False)
            with gr.Tabs():
                for task in TASKS:
                    with gr.Tab(task, id=task, elem_id=f"tab-{task}"):
                        getattr(self, f"tab_{task}")()
            demo.load(self.folders, None, self.score_runs, queue=False)
        return demo

    def _inputs(self, task: str, fields: list, flags: tuple[str, ...]):
        for flag in flags:
            fields.append((flag, widget(self.parsers[task]._option_string_actions[flag], elem_id=f"{task}-{flag[2:]}")))

    def _image(self, task: str, label: str = "--image") -> tuple[gr.File, gr.Image]:
        upload = gr.File(label=label, file_types=["image"], type="filepath", elem_id=f"{task}-image")
        preview = gr.Image(label="the image", type="pil", height=160, interactive=False, elem_classes=["pixelated"],
                           elem_id=f"{task}-preview")
        upload.change(_shown, upload, preview, queue=False)
        return upload, preview

    def _run_button(self, task: str) -> gr.Button:
        return gr.Button(f"make {task}" if task != "score" else "score", variant="primary", elem_id=f"{task}-run")

    def tab(self, task: str, fill, extra=None, reuse_extra=None):
        fields: list = []
        with gr.Row():
            with gr.Column(scale=2):
                fill(fields)
                button = self._run_button(task)
                status = gr.Textbox(label="status", interactive=False, lines=1, max_lines=6,
                                    elem_id=f"{task}-status")
            with gr.Column(scale=3):
                panel = result_panel(task)
        panel.status = status
        self.wire(task, button, panel, fields, extra, reuse_extra)
        return panel

    # ---- the tabs ----------------------------------------------------------------------------------------------
    def tab_sample(self):
        self.tab("sample", lambda fields: self._inputs("sample", fields, ("--prompt",)))

    def _image_tab(self, task: str, flags: tuple[str, ...]):
        holder = {}

        def fill(fields):
            holder["upload"], _ = self._image(task)
            self._inputs(task, fields, flags)
            extra.inputs.append(holder["upload"])
            reuse.outputs.append(holder["upload"])

        def options(data):
            upload = data[holder["upload"]]
            return ["--image", self.runs.keep(upload)] if upload else []

        extra = Extra(options)
        reuse = Reuse(lambda args: {holder["upload"]: _existing(args.image)})
        self.tab(task, fill, extra, reuse)

    def tab_edit(self):
        self._image_tab("edit", ("--prompt", "--start"))

    def tab_denoise(self):
        self._image_tab("denoise", ("--prompt", "--levels", "--i-start", "--every"))

    def tab_inpaint(self):
        task, holder = "inpaint", {}

        def fill(fields):
            holder["upload"] = gr.File(label="--image", file_types=["image"], type="filepath", elem_id="inpaint-image")
            holder["mask"] = gr.ImageEditor(label="draw the part to regenerate (white), or give --box below",
                                            type="pil", image_mode="RGBA", format="png", sources=[], layers=False,
                                            transforms=(), brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=4),
                                            height=300, elem_id="inpaint-mask")
            for event in (holder["upload"].upload, holder["upload"].clear):  # not on reuse: it sets the mask too
                event(_canvas, holder["upload"], holder["mask"], queue=False)
            self._inputs(task, fields, ("--box", "--prompt", "--resample"))
            extra.inputs += [holder["upload"], holder["mask"]]
            reuse.outputs += [holder["upload"], holder["mask"]]

        def options(data):
            upload = data[holder["upload"]]
            argv = ["--image", self.runs.keep(upload)] if upload else []
            mask = drawn_mask(data[holder["mask"]], upload)
            if mask is not None:
                argv += ["--mask", self.runs.keep_picture(mask, "mask.png")]
            return argv

        def back(args):
            image = _existing(args.image)
            return {holder["upload"]: image, holder["mask"]: _canvas(image, _existing(args.mask))}

        extra, reuse = Extra(options), Reuse(back)
        self.tab(task, fill, extra, reuse)

    def tab_anagram(self):
        task, holder = "anagram", {}

        def fill(fields):
            count = gr.Slider(2, MAX_VIEWS, value=2, step=1, label="views",
                              info="how many views, each with its prompt", elem_id="anagram-count")
            rows, names, prompts = [], [], []
            for k in range(MAX_VIEWS):
                with gr.Row(visible=k < 2) as row:
                    names.append(gr.Dropdown(choices=list(VIEW_NAMES), value=VIEW_ORDER[k], label=f"view {k + 1}",
                                             elem_id=f"anagram-view-{k + 1}", scale=1))
                    prompts.append(gr.Textbox(label=f"prompt {k + 1}", elem_id=f"anagram-prompt-{k + 1}", scale=2,
                                              placeholder="what this view shows", max_lines=1))
                rows.append(row)
            count.change(lambda n: [gr.update(visible=k < n) for k in range(MAX_VIEWS)], count, rows, queue=False)
            holder.update(count=count, names=names, prompts=prompts)
            self._inputs(task, fields, ("--reduce", "--view-seed"))
            extra.inputs += [count, *names, *prompts]
            reuse.outputs += [count, *names, *prompts]  # the rows follow the count

        def options(data):
            argv = []
            for k in range(int(data[holder["count"]] or 2)):
                argv += ["--view", data[holder["names"][k]] or "", "--prompt", data[holder["prompts"][k]] or ""]
            return argv

        def back(args):
            views = args.view or ["identity", "flip"][:max(2, len(args.prompt))]
            n = min(len(views), MAX_VIEWS)
            updates = {holder["count"]: n}
            for k in range(n):
                updates[holder["names"][k]] = views[k]
                updates[holder["prompts"][k]] = args.prompt[k] if k < len(args.prompt) else ""
            return updates

        extra, reuse = Extra(options), Reuse(back)
        self.tab(task, fill, extra, reuse)

    def tab_hybrid(self):
        task, holder = "hybrid", {}
        opts = self.parsers[task]._option_string_actions
        parts = list(dict.fromkeys(p for ps in PARTS.values() for p in ps))

        def fill(fields):
            kind = widget(opts["--kind"], elem_id="hybrid-kind")
            fields.append(("--kind", kind))
            boxes = {}
            for part in parts:
                boxes[part] = widget(opts[f"--{part}"], elem_id=f"hybrid-{part}",
                                     visible=part in PARTS[opts["--kind"].default])
            self._inputs(task, fields, ("--sigma",))
            holder["upload"], _ = self._image(task, "--image (one component from this image)")
            component = gr.Dropdown(choices=list(PARTS[opts["--kind"].default]), value=None, label="--image-component",
                                    info=_short(opts["--image-component"].help), elem_id="hybrid-image-component")

            def switch(k):
                return [gr.update(visible=p in PARTS[k]) for p in parts] + [gr.update(choices=list(PARTS[k]), value=None)]
            kind.change(switch, kind, [*boxes.values(), component], queue=False)
            holder.update(kind=kind, boxes=boxes, component=component)
            extra.inputs += [kind, holder["upload"], component, *boxes.values()]
            reuse.outputs += [holder["upload"], component, *boxes.values()]

        def options(data):
            argv = []
            for part in PARTS[data[holder["kind"]]]:  # the parts of the kind picked; hidden boxes keep theirs
                value = data[holder["boxes"][part]]
                if value:
                    argv += [f"--{part}", value]
            upload = data[holder["upload"]]
            if upload:
                argv += ["--image", self.runs.keep(upload)]
            if data[holder["component"]]:
                argv += ["--image-component", data[holder["component"]]]
            return argv

        def back(args):
            updates = {holder["upload"]: _existing(args.image), holder["component"]: args.image_component}
            updates.update({box: getattr(args, part) or "" for part, box in holder["boxes"].items()})
            return updates

        extra, reuse = Extra(options), Reuse(back)
        self.tab(task, fill, extra, reuse)

    def tab_score(self):
        task = "score"
        parser = self.parsers[task]
        opts = parser._option_string_actions
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    self.score_runs.render()
                    refresh = gr.Button("refresh", scale=0)
                fields = [(flag, widget(opts[flag], elem_id=f"score-{flag[2:]}"))
                          for flag in ("--classifier", "--blur", "--clip") if flag in opts]
                button = self._run_button(task)
                status = gr.Textbox(label="status", interactive=False, lines=1, max_lines=12, elem_id="score-status")
            with gr.Column(scale=3):
                report = gr.JSON(label="score.json", elem_id="score-report")
                files = gr.File(label="download", file_count="multiple", interactive=False, elem_id="score-files")
        refresh.click(self.folders, None, self.score_runs, queue=False)
        inputs = {self.score_runs, *(c for _, c in fields)}

        def run(data: dict, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            folder = (data[self.score_runs] or "").strip()
            if not folder:
                return {status: "error: pick a run folder to score"}
            before = set(Path(folder).glob("score*.json")) if Path(folder).is_dir() else set()
            outcome = self.worker(run_command, ["score", folder, *to_argv(parser, [(f, data[c]) for f, c in fields])])
            if not outcome.ok:
                return {status: f"error: {outcome.message}".replace("error: error: ", "error: ")}
            made = sorted(set(Path(folder).glob("score*.json")) - before, key=lambda p: p.stat().st_mtime)
            shown = json.loads(made[-1].read_text()) if made else None
            said = "\n".join([*outcome.notes, *outcome.printed])
            return {status: said, report: shown, files: [str(p) for p in made[-1:]]}
        button.click(run, inputs=inputs, outputs=[status, report, files], concurrency_id=GENERATE,
                     concurrency_limit=1)


@dataclass
class Extra:
    """A tab's options beyond its plain fields (views, uploads, drawn masks): data -> argv."""

    make: object
    inputs: list = field(default_factory=list)

    def __call__(self, data):
        return self.make(data)


@dataclass
class Reuse:
    """Those options read back from a result's argv: parsed args -> component updates."""

    make: object
    outputs: list = field(default_factory=list)

    def __call__(self, args):
        return self.make(args)


def _existing(path: str | None) -> str | None:
    return path if path and Path(path).is_file() else None


def _preview(path: str | None):
    """The upload, shown; nothing where it is not a picture (the run says why, in the command's words)."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _shown(path: str | None):
    """The upload as previewed: a small picture blown up, pixels kept."""
    picture = _preview(path)
    if picture is not None and max(picture.size) < 160:
        k = -(-160 // max(picture.size))
        picture = picture.resize((picture.width * k, picture.height * k), Image.Resampling.NEAREST)
    return picture


def _canvas(path: str | None, mask: str | None = None):
    """The inpaint canvas: the uploaded image to draw on (and a recorded mask, as the drawing)."""
    picture = _preview(path)
    if picture is None:
        return gr.update(value=None)
    layers = []
    if mask:
        drawn = _preview(mask)
        if drawn is not None:
            alpha = drawn.convert("L").resize(picture.size, Image.Resampling.NEAREST)
            layer = Image.new("RGBA", picture.size, (255, 255, 255, 0))
            layer.putalpha(alpha)
            layers = [layer]
    brush = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=max(2, min(picture.size) // 16))
    return gr.update(value={"background": picture, "layers": layers, "composite": None}, brush=brush)


def drawn_mask(value, image_path: str | None) -> Image.Image | None:
    """The strokes drawn on the canvas as a mask of the image's size (white = regenerate); None if none."""
    if not value or not value.get("layers"):
        return None
    alpha = None
    for layer in value["layers"]:
        if layer is None:
            continue
        a = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        alpha = a if alpha is None else (alpha | a if alpha.shape == a.shape else alpha)
    if alpha is None or not alpha.any():
        return None
    mask = Image.fromarray((alpha * 255).astype(np.uint8), "L")
    picture = _preview(image_path)
    if picture is not None and picture.size != mask.size:
        mask = mask.resize(picture.size, Image.Resampling.NEAREST)
    return mask


# ---- serving ---------------------------------------------------------------------------------------------------
def serve(args) -> int:
    """`mirage ui`: the page on --host:--port until Ctrl-C."""
    if args.host not in LOCAL_HOSTS:
        print(f"mirage ui: warning: --host {args.host} opens the page to the network: anyone who reaches "
              f"port {args.port} can run models and download the results", file=sys.stderr)
    root = Path(args.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MirageError(f"cannot make --out {root}: {e.strerror or e}") from None
    pipeline.models.size = 1  # keep the current model and its upscaler between runs
    app = App(args.model, root)
    demo = app.build()
    demo.queue(default_concurrency_limit=1)
    # off where this gradio has them: the footer's links, server-side rendering (a node process), the MCP
    # server, the run history (whose page offers to upload runs to a Hugging Face bucket)
    offered = inspect.signature(demo.launch).parameters
    off = {k: v for k, v in dict(footer_links=[], ssr_mode=False, mcp_server=False, run_history=False).items()
           if k in offered}
    try:  # Ctrl-C stops the server cleanly from the moment it starts: the page answers inside launch already
        try:
            demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
                        prevent_thread_lock=True, allowed_paths=[str(app.runs.root.resolve())], css=CSS,
                        show_error=False, **off)
        except OSError as e:
            raise UsageError(f"cannot serve on {args.host}:{args.port}: {e}") from None
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"mirage ui: http://{host}:{args.port} (model {args.model}; runs in {app.runs.root}); Ctrl-C stops "
              f"it", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        app.worker.interrupt()
        with redirect_stdout(StringIO()):  # gradio's own "Closing server ..."
            demo.close()
    print("mirage ui: stopped", file=sys.stderr)
    return 0
