"""One self-contained HTML page of results: sections of captioned figures (PNGs and playing GIFs, linked by
relative paths so the folder can be moved or zipped), each with its scores under it where it has them, notes,
and small inline SVG charts. No scripts, no network: it opens the same from a file, a web server or an archive.
The demo writes one (report.html); `run_page` writes a run folder's (index.html) from its result.json and its
newest score.json."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Sequence

from mirage.io import atomic_write

RUN_PAGE = "index.html"  # a run folder's page (the demo's own is report.html)
CLIP_LEGEND = ("A: alignment, CLIP's similarity of the worst view (or hybrid part) to its own prompt; "
               "C: concealment, how surely each view picks out its own prompt and not another's "
               "(1 at best, 1/N by chance)")
SCORE_LEGEND = ("score: the built-in classifier's mean log-probability of the prompt of each view (or hybrid "
                "part), 0 at best")

CSS = """
:root { --ink: #1d1d1f; --muted: #6e6e73; --line: #e5e5ea; --accent: #3a5bd9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       background: #fafafa; }
header, main { max-width: 1180px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 32px; padding-bottom: 8px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 22px; margin: 40px 0 4px; padding-top: 12px; border-top: 1px solid var(--line); }
h3 { font-size: 17px; margin: 28px 0 4px; }
.meta, .note { color: var(--muted); margin: 4px 0 12px; }
nav ol { columns: 2; color: var(--muted); padding-left: 20px; }
nav a { color: var(--accent); text-decoration: none; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--cell, 150px), 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure img { display: block; width: 100%; height: auto; image-rendering: pixelated; border-radius: 4px;
             background: #fff; }
figure.smooth img { image-rendering: auto; }
figcaption { margin-top: 6px; font-size: 13px; }
.scores { margin-top: 6px; font: 12px/1.4 ui-monospace, Menlo, monospace; }
figcaption .settings { display: block; color: var(--muted); font: 11px/1.4 ui-monospace, Menlo, monospace;
                       overflow-wrap: anywhere; }
svg.chart { background: #fff; border: 1px solid var(--line); border-radius: 8px; max-width: 100%; }
svg.chart text { font: 11px system-ui, sans-serif; fill: var(--muted); }
footer { max-width: 1180px; margin: 48px auto 32px; padding: 0 24px; color: var(--muted); font-size: 13px; }
"""


@dataclass
class Figure:
    """One image (or animation) file relative to the page, a short title and the settings that made it."""

    src: str
    title: str
    settings: dict = field(default_factory=dict)
    smooth: bool = False  # large pictures (animations, charts) are scaled smoothly, small ones stay pixelated
    width: int | None = None  # shown at this many px instead of filling its cell (a picture seen from afar)
    scores: str = ""  # shown under the picture, e.g. "A 0.31 · C 0.87" (`scores_line`)
    legend: str = ""  # what the scores mean, shown on hover

    def html(self) -> str:
        shown = ", ".join(f"{k}={_value(v)}" for k, v in self.settings.items())
        cls = ' class="smooth"' if self.smooth else ""
        size = f' style="width: {self.width}px"' if self.width else ""
        scores = (f'<div class="scores" title="{escape(self.legend)}">{escape(self.scores)}</div>' if self.scores
                  else "")
        return (f'<figure{cls}><img src="{escape(self.src)}" alt="{escape(self.title)}"{size}>{scores}'
                f'<figcaption>{escape(self.title)}<span class="settings">{escape(shown)}</span>'
                f'</figcaption></figure>')


def scores_line(*records: dict) -> tuple[str, str]:
    """(the line shown under an image, its legend) from its records, the first that has them: CLIP's alignment
    and concealment (`clip`), else a classifier's `score`; ("", "") where none has either."""
    for r in records:
        clip = r.get("clip") or {}
        if "alignment" in clip and "concealment" in clip:
            return f"A {clip['alignment']:.2f} · C {clip['concealment']:.2f}", CLIP_LEGEND
    for r in records:
        if isinstance(r.get("score"), (int, float)) and not isinstance(r["score"], bool):
            return f"score {r['score']:.2f}", SCORE_LEGEND
    return "", ""


def _value(v) -> str:
    if v == "":
        return '""'
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


@dataclass
class Block:
    """A run of content inside a section: an optional sub-heading and note, then figures in a grid (cell is
    the grid's minimum column width in px) and/or raw HTML made by this module (charts)."""

    heading: str = ""
    note: str = ""
    figures: list[Figure] = field(default_factory=list)
    cell: int = 150
    raw: str = ""

    def html(self) -> str:
        parts = [f"<h3>{escape(self.heading)}</h3>" if self.heading else "",
                 f'<p class="note">{escape(self.note)}</p>' if self.note else "", self.raw]
        if self.figures:
            parts.append(f'<div class="grid" style="--cell: {self.cell}px">'
                         + "".join(f.html() for f in self.figures) + "</div>")
        return "\n".join(p for p in parts if p)


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def html(self) -> str:
        return (f'<section id="{escape(self.anchor)}"><h2>{escape(self.title)}</h2>\n'
                + "\n".join(b.html() for b in self.blocks) + "</section>")


def render(title: str, sections: Sequence[Section], meta: str = "", footer: str = "") -> str:
    toc = "".join(f'<li><a href="#{escape(s.anchor)}">{escape(s.title)}</a></li>' for s in sections)
    body = "\n".join(s.html() for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>"
            f'<header><h1>{escape(title)}</h1><p class="meta">{escape(meta)}</p>'
            f"<nav><ol>{toc}</ol></nav></header>\n<main>{body}</main>"
            f"<footer>{escape(footer)}</footer></body></html>\n")


def write(path: str | Path, title: str, sections: Sequence[Section], meta: str = "", footer: str = "") -> Path:
    """The page written atomically (never over an existing file)."""
    text = render(title, sections, meta, footer)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def line_chart(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, log_y: bool = False,
               width: int = 560, height: int = 260) -> str:
    """An inline SVG line chart of named (x, y) series, with min/max tick labels on both axes."""
    colors = ("#3a5bd9", "#d9503a", "#2f9e5b", "#a05bd9")
    points = [p for s in series.values() for p in s if not log_y or p[1] > 0]
    if not points:
        return ""
    fy = math.log10 if log_y else float
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(fy(p[1]) for p in points), max(fy(p[1]) for p in points)
    left, right, top, bottom = 56, 12, 12, 36
    sx = (width - left - right) / ((x1 - x0) or 1)
    sy = (height - top - bottom) / ((y1 - y0) or 1)

    def at(x, y):
        return f"{left + (x - x0) * sx:.1f},{height - bottom - (fy(y) - y0) * sy:.1f}"

    lines = [f'<polyline fill="none" stroke="{colors[k % len(colors)]}" stroke-width="1.5" points="'
             + " ".join(at(x, y) for x, y in s if not log_y or y > 0) + '"/>'
             for k, s in enumerate(series.values())]
    legend = [f'<text x="{width - right - 4}" y="{top + 12 + 14 * k}" text-anchor="end" '
              f'style="fill:{colors[k % len(colors)]}">{escape(name)}</text>' for k, name in enumerate(series)]
    fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    axes = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>'
            f'<text x="{left}" y="{height - bottom + 14}">{x0:g}</text>'
            f'<text x="{width - right}" y="{height - bottom + 14}" text-anchor="end">{x1:g}</text>'
            f'<text x="{(left + width) / 2}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{fmt(y0)}</text>'
            f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{fmt(y1)}</text>'
            f'<text x="12" y="{(top + height - bottom) / 2}" text-anchor="middle" '
            f'transform="rotate(-90 12 {(top + height - bottom) / 2})">{escape(ylabel)}</text>')
    return (f'<svg class="chart" role="img" aria-label="{escape(ylabel)} by {escape(xlabel)}" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{axes}{"".join(lines)}{"".join(legend)}</svg>')


# ---- a run folder's page ----------------------------------------------------------------------------
SHOWN = ("prompt", "prompts", "views", "kind", "seed", "try", "right", "kept")  # an image's settings on its page


def run_page(run: str | Path) -> Path:
    """A run folder's page (RUN_PAGE): its sheets, then each image of its result.json in that order (best first
    where ranked) with its animation, and under each its scores: CLIP's A and C, else the classifier's score,
    from result.json (`--pick best`, `--tries`, `mirage rank`) and the folder's newest score.json, the newer
    file first. Written again, replacing the old page, whenever the scores change."""
    run = Path(run)
    result = run / "result.json"
    doc = json.loads(result.read_text(encoding="utf-8"))
    scored, path = newest_scores(run)
    newer = path is not None and path.stat().st_mtime_ns > result.stat().st_mtime_ns
    figures, legends = [], []
    for entry in doc["images"]:
        records = [entry, scored.get(entry["file"], {})]
        line, legend = scores_line(*(records[::-1] if newer else records))
        rank = f"#{entry['rank']} " if "rank" in entry else ""
        figures.append(Figure(entry["file"], f"{rank}{entry['file']}", {k: entry[k] for k in SHOWN if k in entry},
                              scores=line, legend=legend))
        if entry.get("animation"):
            figures.append(Figure(entry["animation"], f"{rank}animation", {"seed": entry.get("seed")}, smooth=True))
        legends += [legend] if legend and legend not in legends else []
    sections = [Section("images", f"Images ({len(doc['images'])})", [Block("", "; ".join(legends), figures)])]
    if doc.get("sheets"):
        sections.insert(0, Section("sheets", "Sheets", [Block("", "", [Figure(name, name, smooth=True)
                                                                          for name in doc["sheets"]], cell=480)]))
    text = render(f"{run.name}: mirage {doc.get('task', 'run')}", sections, meta=doc.get("command", ""),
                  footer="Every image is a PNG in this folder with its settings in its text chunk (`parameters`); "
                         "result.json lists them all.")
    return atomic_write(run / RUN_PAGE, lambda tmp: tmp.write_text(text, encoding="utf-8"), replace=True)


def newest_scores(run: Path) -> tuple[dict[str, dict], Path | None]:
    """(file -> {clip} or {score}, the file): what the run folder's newest score.json (score-N.json with the
    largest N) says of each image it scored; ({}, None) where there is none."""
    numbered = [(int(m.group(1) or 1), p) for p in run.glob("score*.json")
                if (m := re.fullmatch(r"score(?:-(\d+))?\.json", p.name))]
    if not numbered:
        return {}, None
    path = max(numbered)[1]
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("scorer") == "clip":
        return {i["file"]: {"clip": i["clip"]} for i in report.get("images", [])}, path
    return {f["file"]: {"score": f["score"]} for f in report.get("files", [])}, path
