"""`mirage rank RUN_DIR`: an existing run's images re-ranked best first, by CLIP (alignment, then concealment:
quality.clip) or by the built-in model's classifier (as `--pick best` ranks). The order goes into the run's
result.json (replaced atomically) with each image's rank and scores, a new sheet shows the best large and
the others small, and the run's page (app.report.run_page) shows them in that order with their scores. No image is moved, renamed or deleted; `--keep K` only marks the K best as kept."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from mirage.app.report import run_page
from mirage.app.score import (
    _classifier_for,
    _group_of,
    _model_of,
    _prompts,
    check_images,
    clip_argument,
    clip_plan,
    clip_report,
    clip_table,
    judging_args,
    read_result,
    score_run,
)
from mirage.backends.load import resolve_device
from mirage.backends.small import BUILTIN
from mirage.errors import UsageError
from mirage.io import atomic_write, contact_sheet, load_image, to_pil, unique_path
from mirage.quality import selection
from mirage.quality.classifier import load_classifier
from mirage.quality.clip import DEFAULT_CLIP, ClipJudge

RANK_FIELDS = ("rank", "kept")  # what a ranking writes into an entry, besides its scores


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rank", help="re-rank a run's images best first (CLIP or the classifier); never deletes an image",
        description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("run_dir", help="a folder a mirage command wrote (it holds result.json)")
    scorer = p.add_mutually_exclusive_group()
    clip_argument(scorer)
    scorer.add_argument("--classifier", help="rank with a classifier instead: fashion, digits or a classifier "
                                             ".safetensors (default for runs of a built-in model; other runs "
                                             f"rank with CLIP, {DEFAULT_CLIP})")
    p.add_argument("--keep", type=int, default=None,
                   help="mark the K best as kept (\"kept\": true/false in result.json; the sheet shows those); "
                        "no image is deleted (default: all)")
    judging_args(p, "result.json and the sheet")
    p.set_defaults(func=rank_command)


def rank_command(args) -> int:
    if args.keep is not None and args.keep < 1:
        raise UsageError(f"--keep must be at least 1, got {args.keep}")
    run = Path(args.run_dir)
    doc = read_result(run)
    check_images(run, doc)
    entries = doc["images"]
    builtin = {_model_of(e) for e in entries} <= set(BUILTIN)
    if args.clip is not None or (args.classifier is None and not builtin):
        ranked, how, lines = _by_clip(args, run, entries)
    else:
        ranked, how, lines = _by_classifier(args, run, entries)
    keep = len(ranked) if args.keep is None else min(args.keep, len(ranked))
    by_file = {e["file"]: e for e in entries}
    images = [_ranked(by_file[f], scores, r + 1, None if args.keep is None else r < keep)
              for r, (f, scores) in enumerate(ranked)]
    scored = {f for f, _ in ranked}
    images += [{k: v for k, v in e.items() if k not in RANK_FIELDS} for e in entries if e["file"] not in scored]
    sheet = _sheet(run, images[:keep], how, args.blur)
    sheet_path = unique_path(run / "sheet-ranked.png")
    atomic_write(sheet_path, lambda tmp: sheet.save(tmp, format="PNG"))
    new = dict(doc, images=images, sheets=[*(doc.get("sheets") or []), sheet_path.name],
               ranking={**how, "keep": keep, "blur": args.blur, "sheet": sheet_path.name})
    text = json.dumps(new, indent=2, ensure_ascii=False, default=str) + "\n"
    try:
        atomic_write(run / "result.json", lambda tmp: tmp.write_text(text, encoding="utf-8"), replace=True)
    except BaseException:
        sheet_path.unlink(missing_ok=True)  # result.json is as it was: no sheet it does not list
        raise
    page = run_page(run)
    if not args.quiet:
        print("\n".join(lines))
        kept = f", kept the {keep} best" if args.keep is not None else ""
        print(f"ranked {len(ranked)} image(s){kept}: wrote the order into {run / 'result.json'}, the sheet "
              f"{sheet_path} and the run's page {page}")
    return 0


def _ranked(entry: dict, scores: dict, rank: int, kept: bool | None) -> dict:
    out = {k: v for k, v in entry.items() if k not in RANK_FIELDS}
    out.update(scores, rank=rank)
    if kept is not None:
        out["kept"] = kept
    return out


def _by_clip(args, run: Path, entries: list[dict]):
    """[(file, scores)] best first, how, the table lines: CLIP's order, exactly as `mirage score --clip`'s."""
    ref = args.clip or DEFAULT_CLIP
    plan = clip_plan(run, entries, args.blur)
    with ClipJudge.load(ref, resolve_device(args.device)) as judge:
        report = clip_report(judge, run, entries, plan)
    best = sorted(report["images"], key=lambda i: i["rank"])
    return [(i["file"], {"clip": i["clip"]}) for i in best], {"by": "clip", "model": ref}, clip_table(report)


def _by_classifier(args, run: Path, entries: list[dict]):
    """[(file, scores)] best first by the classifier's score (the mean log-probability of each map's prompt,
    as `--pick best` ranks), how, the table lines."""
    name = args.classifier or _classifier_for(entries)
    report = score_run(load_classifier(name), run, entries, args.blur)
    order = selection.best_first(torch.tensor([f["score"] for f in report["files"]], dtype=torch.float64))
    files = [report["files"][k] for k in order.tolist()]  # equal scores keep the run's order
    if not files:
        raise UsageError(f"no image of {run} has class prompts the {name} classifier knows: rank with --clip")
    lines = [f"{len(files)} images in {run} ranked by the {name} classifier, best first"]
    lines += [f"{r + 1:>3}  {f['file']}  {f['score']:.4f}  {' / '.join(f['prompts'])}"
              f"{'' if f['right'] else '  (not read as its prompts)'}" for r, f in enumerate(files)]
    return ([(f["file"], {"score": f["score"], "right": f["right"]}) for f in files],
            {"by": "classifier", "classifier": str(name)}, lines)


# ---- the sheet ----------------------------------------------------------------------------------------
def _caption(entry: dict) -> str:
    if "clip" in entry:
        return f"A {entry['clip']['alignment']:.3f}, C {entry['clip']['concealment']:.2f}"
    return f"score {entry['score']:.2f}"


def _label(entry: dict) -> str:
    seed = f" seed {entry['seed']}" if "seed" in entry else ""
    return f"#{entry['rank']}{seed}"


def _image(run: Path, entry: dict) -> Tensor:
    """[1, 3, s, s]: the image at its own size."""
    path = run / entry["file"]
    with Image.open(path) as im:
        side = min(im.size)
    return load_image(path, side, channels=3)


def _sheet(run: Path, best_first: list[dict], how: dict, blur: float | None):
    """The best image large with each of its maps under its prompt, then the rest (up to --keep) small."""
    by = f"CLIP {how['model']}: alignment, then concealment" if how["by"] == "clip" else \
        f"the {how['classifier']} classifier"
    best = best_first[0]
    x = _image(run, best)
    group = _group_of(best, x.shape[-1], blur)
    if group is not None:  # each map (view, blur) under the prompt it should show
        row = [(to_pil(m(x)[0].clamp(-1, 1)), f"{c}: {p}") for m, c, p in zip(group.maps, group.checks,
                                                                                 _prompts(best))]
    else:
        row = [(to_pil(x[0]), best["file"])]
    top = contact_sheet([row], title=f"{run.name} ranked by {by}. Best: {_label(best)}, {_caption(best)}")
    rest = best_first[1:]
    if not rest:
        return top
    cells = [(to_pil(_image(run, e)[0]), f"{_label(e)} {_caption(e)}") for e in rest]
    below = contact_sheet([cells[i:i + 8] for i in range(0, len(cells), 8)], title="the others, best first",
                          cell=min(128, max(48, 2 * x.shape[-1])))
    page = Image.new("RGB", (max(top.width, below.width), top.height + below.height), "white")
    page.paste(top, (0, 0))
    page.paste(below, (0, top.height))
    return page
