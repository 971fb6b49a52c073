import re
from html import unescape

import pytest

from mirage.app.report import Block, Figure, Section, line_chart, render, write
from mirage.errors import MirageError


def page(*figures, raw=""):
    return render("t", [Section("s", "S", [Block("h", "n", list(figures), raw=raw)])])


def test_captions_and_paths_are_escaped():
    html = page(Figure('a "b".png', "<script>alert(1)</script> & co", {"prompt": "<b>x</b>"}))
    assert "<script>" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
    assert 'src="a &quot;b&quot;.png"' in html


def test_settings_are_shown_in_the_caption():
    html = page(Figure("x.png", "title", {"seed": 3, "guidance": 5.0, "prompt": "", "views": ["identity", "flip"]}))
    settings = unescape(re.search(r'<span class="settings">(.*?)</span>', html).group(1))
    assert settings == 'seed=3, guidance=5, prompt="", views=[identity, flip]'


def test_sections_keep_their_order_and_the_toc_links_them():
    html = render("t", [Section("b", "Second"), Section("a", "First")])
    assert html.index('id="b"') < html.index('id="a"')
    assert re.findall(r'href="#(\w)"', html) == ["b", "a"]


def test_shown_width_and_smooth_scaling():
    html = page(Figure("x.png", "far", width=28, smooth=True), Figure("y.png", "near"))
    assert '<figure class="smooth"><img src="x.png" alt="far" style="width: 28px">' in html
    assert '<figure><img src="y.png" alt="near">' in html


def test_write_is_atomic_and_never_overwrites(tmp_path):
    path = write(tmp_path / "report.html", "title", [Section("s", "S")], meta="m")
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left
    with pytest.raises(MirageError, match="never overwrites"):
        write(path, "other", [])
    assert "<title>title</title>" in path.read_text()


def test_line_chart_plots_every_point_and_skips_non_positive_on_log_scale():
    svg = line_chart({"loss": [(0, 1.0), (10, 0.1), (20, 0.0), (30, 0.01)]}, "step", "loss", log_y=True)
    points = re.search(r'points="([^"]*)"', svg).group(1).split()
    assert len(points) == 3
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys)  # falling loss goes down the chart: y grows in SVG
    assert ">1</text>" in svg and ">0.01</text>" in svg  # the log axis labels its ends in loss units
    assert line_chart({"loss": []}, "step", "loss") == ""
