"""The pictures a run shows its results in: contact sheets per task, candidates by rank, and the animation of
an illusion turning from view to view."""
from __future__ import annotations

from typing import Callable, Sequence

from PIL import Image
from torch import Tensor

from mirage.app.rundir import RunDir
from mirage.illusions.animate import illusion_animation, save_gif, save_mp4
from mirage.illusions.filters import make_components
from mirage.io import atomic_write, contact_sheet, load_image, to_pil

SHOWN_APART = ("high", "color", "still")  # hybrid parts seen only in the whole image, not on their own


def save_sheet(out: RunDir, picture: Image.Image, name: str) -> str:
    atomic_write(out.file(name), lambda tmp: picture.save(tmp, format="PNG"))
    out.extras.setdefault("sheets", []).append(name)
    return name


def title(task: str, settings: dict) -> str:
    shown = {k: v for k, v in settings.items() if k in ("prompt", "prompts", "views", "kind")}
    return f"{task}: " + ", ".join(f"{k}={v}" for k, v in shown.items())


def seeds(items: Sequence[dict]) -> list[int]:
    return [item["seed"] for item in items]


def grid(images: Tensor, items: list[dict], task: str, settings: dict) -> Image.Image:
    cols = min(8, len(items))
    cells = [(to_pil(img), f"seed {item['seed']}") for img, item in zip(images, items)]
    return contact_sheet([cells[i:i + cols] for i in range(0, len(cells), cols)], title=title(task, settings))


def series(images: Tensor, items: list[dict], task: str, settings: dict) -> Image.Image:
    """SDEdit: one row per seed, the series by start index as the course labels it, then the original."""
    original = to_pil(load_image(settings["image"], size=images.shape[-1], channels=images.shape[1])[0])
    rows = []
    for seed in dict.fromkeys(seeds(items)):
        row = [(to_pil(img), f"i_start={item['start']}") for img, item in zip(images, items) if item["seed"] == seed]
        rows.append(row + [(original, "original")])
    return contact_sheet(rows, title=title(task, settings), row_labels=[f"seed {s}" for s in dict.fromkeys(seeds(items))])


def illusion(views: Sequence) -> Callable:
    """Each view of each result under its prompt."""
    def sheet(images: Tensor, items: list[dict], task: str, settings: dict) -> Image.Image:
        rows = [[(to_pil(v.view(img[None])[0]), f"{v.name}: {p}") for v, p in zip(views, settings["prompts"])]
                for img in images]
        return contact_sheet(rows, title=title(task, settings), row_labels=[f"seed {s}" for s in seeds(items)])
    return sheet


def hybrid(images: Tensor, items: list[dict], task: str, settings: dict) -> Image.Image:
    """Each hybrid and each of its components as a viewer sees it: the full image (close up) and the other
    components alone (from afar: the low pass; without color: the gray part; ...)."""
    parts, prompts = settings["components"], settings["prompts"]
    components = make_components(settings["kind"], images.shape[-1], settings["sigma"])
    rows = []
    for img in images:
        row = [(to_pil(img), "the hybrid")]
        row += [(to_pil(c(img[None])[0].clamp(-1, 1)), f"{part}: {p or 'from the image'}")
                for c, part, p in zip(components, parts, prompts) if part not in SHOWN_APART]
        row.append((to_pil(img).resize((max(8, img.shape[-1] // 4),) * 2), "small (far away)"))
        rows.append(row)
    return contact_sheet(rows, title=title(task, settings), row_labels=[f"seed {s}" for s in seeds(items)])


def candidates(images: Tensor, items: list[dict], heading: str, cols: int = 8, cell: int | None = None) -> Image.Image:
    """Candidates in the order given, each labelled with its rank, seed and score where it has them."""
    def label(item: dict) -> str:
        rank = f"#{item['rank']} " if "rank" in item else ""
        score = f" ({item['score']:.2f})" if "score" in item else ""
        return f"{rank}seed {item['seed']}{score}"
    cells = [(to_pil(img), label(item)) for img, item in zip(images, items)]
    return contact_sheet([cells[i:i + cols] for i in range(0, len(cells), cols)], title=heading,
                         cell=cell or min(96, max(48, 2 * images.shape[-1])))


def best_above_rest(best: Image.Image, images: Tensor, items: list[dict]) -> Image.Image:
    """The best candidate's sheet above the other candidates, small, with their rank and score."""
    rest = candidates(images, items, "the other candidates")
    page = Image.new("RGB", (max(best.width, rest.width), best.height + rest.height), "white")
    page.paste(best, (0, 0))
    page.paste(rest, (0, best.height))
    return page


def animate(out: RunDir, entries: list[dict], images: Tensor, views: Sequence, prompts: Sequence[str]) -> None:
    """For each illusion an animation turning from view to view (GIF, and MP4 where ffmpeg is); each entry
    gets the names of its files."""
    for entry, img in zip(entries, images):
        frames = illusion_animation(img, views, [f"{v.name}: {p}" for v, p in zip(views, prompts)])
        stem = entry["file"].removesuffix(".png")
        entry["animation"] = save_gif(out.file(f"{stem}.gif"), frames).name
        note = save_mp4(out.file(f"{stem}.mp4"), frames)
        if note is None:
            entry["video"] = f"{stem}.mp4"
        else:
            out.extras["mp4_note"] = note
