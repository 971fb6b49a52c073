"""The demo end to end in its quick size on the CPU (one run shared by the tests), and its page in Chromium."""
import argparse
import json
import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mirage.app import demo
from mirage.io import read_settings

ORDER = ["denoising", "sampling", "edits", "anagrams", "hybrids", "part-b"]
# what the captions of each section must name, besides the model
SETTINGS = {"denoising": ["t="], "sampling": ["seed=", "steps=", "guidance=", "prompt="],
            "edits": ["i_start=", "prompt="], "anagrams": ["views=", "seed="],
            "hybrids": ["low=", "high=", "seed="], "part-b": ["sigma=", "prompt="]}


class Page(HTMLParser):
    """The figures of the page: per section, each figure's image sources and caption texts."""

    def __init__(self):
        super().__init__()
        self.sections, self.figures, self.srcs = [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "figure":
            self.figures.append(dict(section=self.sections[-1], src=None, title="", settings=""))
        elif tag == "img":
            self.srcs.append(attrs["src"])
            if self.figures and self.figures[-1]["src"] is None:
                self.figures[-1]["src"] = attrs["src"]
        elif tag == "figcaption":
            self._in = "title"
        elif tag == "span" and attrs.get("class") == "settings":
            self._in = "settings"

    def handle_endtag(self, tag):
        if tag in ("figcaption", "span"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.figures[-1][self._in] += data


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The quick demo through the command's own parser and handler."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo.handler(parser.parse_args(["--out", str(out), "--quick", "--quiet", "--device", "cpu"])) == 0
    return out


@pytest.fixture(scope="module")
def page(run) -> Page:
    parsed = Page()
    parsed.feed((run / "report.html").read_text(encoding="utf-8"))
    return parsed


def test_sections_come_in_the_course_order(page):
    assert page.sections == ORDER


def test_every_image_is_a_file_in_the_run_folder(run, page):
    assert len(page.srcs) >= 60
    for src in page.srcs:
        assert not re.match(r"^([a-z]+:|/)", src), f"{src} is not a relative link"
        assert (run / src).is_file(), src
    gifs = [s for s in page.srcs if s.endswith(".gif")]
    assert len(gifs) == 4  # three anagram animations and the training run's samples by epoch


def test_every_caption_names_its_settings(page):
    for fig in page.figures:
        assert fig["title"].strip() and fig["settings"].strip(), fig
    for section, needed in SETTINGS.items():
        text = " ".join(f["settings"] for f in page.figures if f["section"] == section)
        for key in needed:
            assert key in text, f"no caption in {section} names {key}"
    assert all("i_start=" in f["settings"] for f in page.figures
               if f["section"] == "edits" and f["title"].startswith("i_start"))


def test_every_png_carries_its_settings_and_result_json_lists_them(run):
    result = json.loads((run / "result.json").read_text())
    assert result["task"] == "demo" and result["report"] == "report.html" and result["quick"] is True
    files = [e["file"] for e in result["images"]]
    assert len(files) == len(set(files)) >= 50
    for entry in result["images"][:: max(1, len(files) // 10)]:
        assert read_settings(run / entry["file"])["model"] == "fashion"


def test_the_anagram_views_are_one_image_flipped(run):
    from mirage.io import load_image

    up = load_image(run / "a-anagram0-identity.png", 28, channels=1)
    flipped = load_image(run / "a-anagram0-flip.png", 28, channels=1)
    assert (up.flip(-2) - flipped).abs().max() < 1e-6


def test_the_training_curve_is_drawn_from_the_shipped_log(run):
    html = (run / "report.html").read_text()
    points = re.search(r'<svg class="chart".*?points="([^"]*)"', html, re.S).group(1).split()
    logged = [line for line in (Path(demo.__file__).parents[1] / "builtin/logs/fashion/metrics.jsonl")
              .read_text().splitlines() if '"loss"' in line and "epoch_end" not in line]
    assert len(points) == len(logged)


def test_a_second_run_gets_a_numbered_folder(run, monkeypatch):
    monkeypatch.setattr(demo, "PARTS", ())  # only the folder logic: no model work
    page = demo.run_demo(run, quick=True, progress=False)
    assert page.parent == run.with_name(f"{run.name}-2")
    assert (run / "report.html").is_file()


CHECK = """<script>
window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = JSON.stringify({total: document.images.length, bad: bad});
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_every_image_and_animation_loads_in_chromium(run, tmp_path):
    # a copy beside the page with a check script, so the page itself stays script-free
    check = run / "check.html"
    check.write_text((run / "report.html").read_text().replace("</body>", CHECK), encoding="utf-8")
    try:
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
             check.as_uri()], capture_output=True, text=True, timeout=90).stdout
    finally:
        check.unlink()
    found = re.search(r'<pre id="img-check">(.*?)</pre>', dom)
    assert found, "the page did not finish loading in Chromium"
    result = json.loads(found.group(1).replace("&quot;", '"'))
    assert result["bad"] == [] and result["total"] >= 60


def test_the_same_page_is_made_with_an_if_model(tiny_if_models, tmp_path):
    page = demo.run_demo(tmp_path / "if", model=str(tiny_if_models.stage_1), device="cpu", quick=True,
                         progress=False)
    parsed = Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    assert parsed.sections == ORDER
    assert all((page.parent / src).is_file() for src in parsed.srcs)
    prompts = {read_settings(page.parent / "a-anagram0-identity.png")["prompts"][0]}
    assert prompts == {demo.PLANS["if"].anagrams[0][0]}
    assert "Part B trains mirage's own small UNets" in unescape(page.read_text())
