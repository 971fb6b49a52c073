"""`mirage ui` in a real browser: the server started as a user starts it, on a free localhost port, driven by
Debian's headless Chromium through playwright (no browser download). MIRAGE_UI_SCREENSHOT=PATH also writes
the anagram tab's screenshot there (docs/ui-anagram.png is made so); it is always kept in the test's tmp
folder as an artifact."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import mirage
from mirage.app.main import main

CHROMIUM = Path("/usr/bin/chromium")
ASSETS = Path(mirage.__file__).parent / "assets"
MISSING = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
needs_browser = pytest.mark.skipif(bool(MISSING) or not CHROMIUM.is_file(),
                                   reason=f"the UI tests need {', '.join(MISSING) or 'gradio and playwright'} "
                                          f"(pip install -e '.[test]') and Debian's {CHROMIUM} "
                                          f"(apt-get install chromium)"
                                   if MISSING or not CHROMIUM.is_file() else "")
RUN_S = 120_000  # ms a generation may take on a busy 2-core machine


def test_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["ui", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'mirage[ui]'" in err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path):
    """`mirage ui` on a free port, serving from `root`: (process, url, its log file)."""
    port = _free_port()
    log = open(root / "server.log", "w+")
    env = dict(os.environ, GRADIO_TEMP_DIR=str(root / "gradio-tmp"), MIRAGE_CACHE=str(root / "cache"),
               PYTHONUNBUFFERED="1")
    # Ctrl-C reaches it as in a terminal, also where pytest itself was started in the background (which
    # ignores SIGINT for everything it starts, and Python keeps an ignored SIGINT ignored)
    proc = subprocess.Popen([sys.executable, "-m", "mirage", "ui", "--port", str(port), "--out", "runs"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc, url, log
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"mirage ui did not start: {log.read()[-2000:]}")
        time.sleep(0.3)


def _stop(proc) -> int:
    """Ctrl-C, then its exit code (a loaded 2-core machine may take a while to close the server)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    proc, url, log = _start(root)
    yield dict(url=url, root=root / "runs", log=root / "server.log", proc=proc)
    if proc.poll() is None:
        _stop(proc)
    log.close()


@pytest.fixture(scope="module")
def browser(server):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.outside = []  # every request the page makes that leaves this machine
    page.on("request", lambda r: page.outside.append(r.url)
            if not r.url.startswith((server["url"], "data:", "blob:")) else None)
    page.goto(server["url"])
    page.wait_for_selector("#sample-run", state="attached", timeout=60_000)
    yield page
    context.close()


def fill(page, elem_id: str, value: str, settle_ms: int = 300) -> None:
    """Type `value` into the field and commit it (blur): under load a click was seen to outrun a number field's
    new value. Gradio mounts what a closed accordion or an unseen tab holds only when it opens, a moment after
    the click (render_previously_invisible_children), and that puts back the field's first value: what was
    typed in that moment is lost. So the value is checked after a moment, and typed again if it was lost."""
    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    for _ in range(5):
        field.fill(value)
        field.press("Tab")
        page.wait_for_timeout(settle_ms)
        if field.input_value() == value:
            return
    raise AssertionError(f"#{elem_id} does not keep {value!r}: it shows {field.input_value()!r}")


def value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def wait_status(page, task: str, text: str, timeout: int = RUN_S) -> str:
    page.wait_for_function("([sel, text]) => { const e = document.querySelector(sel); "
                           "return e !== null && e.value.includes(text); }",
                           arg=[f"#{task}-status textarea", text], timeout=timeout)
    return value(page, f"{task}-status")


def wait_images(page, selector: str, n: int = 1) -> None:
    """At least n images under `selector`, loaded and of natural size > 0."""
    page.wait_for_function("([sel, n]) => Array.from(document.querySelectorAll(sel + ' img'))"
                           ".filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length >= n",
                           arg=[selector, n], timeout=30_000)


def download(page, task: str, name_end: str) -> bytes:
    links = page.locator(f"#{task}-files a")
    hrefs = [links.nth(k).get_attribute("href") for k in range(links.count())]
    (href,) = [h for h in hrefs if h and h.split("?")[0].endswith(name_end)]
    response = page.request.get(href)
    assert response.ok, href
    return response.body()


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


@needs_browser
def test_anagram_shows_both_views_the_animation_and_its_records(page, server, tmp_path):
    page.get_by_text("more settings").first.click()
    fill(page, "tries", "1")  # one try: the test's time; else the CLI's defaults (30 steps, classifier guidance)
    page.get_by_text("more settings").first.click()
    tab(page, "anagram")
    fill(page, "anagram-prompt-1", "bag")
    fill(page, "anagram-prompt-2", "sneaker")
    page.locator("#anagram-run").click()
    status = wait_status(page, "anagram", "wrote 1 image")
    wait_images(page, "#anagram-views", 2)
    wait_images(page, "#anagram-animation")
    wait_images(page, "#anagram-results")
    seed = int(value(page, "anagram-seed"))
    result = json.loads(download(page, "anagram", "result.json"))
    (entry,) = result["images"]
    assert entry["seed"] == seed == 0 and entry["views"] == ["identity", "flip"]
    assert entry["prompts"] == ["bag", "sneaker"] and entry["animation"].endswith(".gif")
    png = Image.open(io.BytesIO(download(page, "anagram", entry["file"])))
    assert "seed: 0" in png.text["parameters"] and "bag" in png.text["parameters"]
    gif = Image.open(io.BytesIO(download(page, "anagram", entry["animation"])))
    assert gif.n_frames > 1
    folder = Path(status.split(":")[0])
    assert (server["root"] / folder / "result.json").is_file()  # the run folder, as the command writes it
    assert result["command"] == value(page, "anagram-command")
    assert "--out" in result["command"] and "--view flip" in result["command"] and "--tries 1" in result["command"]
    assert not page.outside, page.outside  # nothing fetched from outside: no fonts, no analytics
    for path in {tmp_path / "ui-anagram.png", *([Path(os.environ["MIRAGE_UI_SCREENSHOT"])]
                                                if os.environ.get("MIRAGE_UI_SCREENSHOT") else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)

    # "reuse settings" loads the result's settings back into the form
    fill(page, "anagram-prompt-1", "something else")
    fill(page, "seed", "5")
    page.locator("#anagram-reuse").click()
    page.wait_for_function("() => document.querySelector('#anagram-prompt-1 input').value === 'bag'")
    assert value(page, "seed") == "0" and value(page, "anagram-prompt-2") == "sneaker"


@needs_browser
def test_hybrid_and_inpaint_from_an_uploaded_image(page, server):
    fill(page, "steps", "5")
    page.get_by_text("more settings").first.click()
    fill(page, "tries", "1")
    tab(page, "hybrid")
    page.locator("#hybrid-image input[type=file]").set_input_files(str(ASSETS / "fashion_test.png"))
    wait_images(page, "#hybrid-preview")
    fill(page, "hybrid-high", "sneaker")
    page.locator("#hybrid-run").click()
    status = wait_status(page, "hybrid", "wrote 1 image")
    wait_images(page, "#hybrid-results")
    wait_images(page, "#hybrid-sheet")
    (entry,) = json.loads(download(page, "hybrid", "result.json"))["images"]
    assert entry["image_component"] == "low" and entry["prompts"] == ["", "sneaker"]
    assert (server["root"].parent / entry["image"]).read_bytes() == (ASSETS / "fashion_test.png").read_bytes()

    tab(page, "inpaint")
    page.locator("#inpaint-image input[type=file]").set_input_files(str(ASSETS / "photo.png"))
    fill(page, "inpaint-box", "8,8,40,40")
    fill(page, "inpaint-prompt", "bag")
    page.locator("#inpaint-run").click()
    wait_status(page, "inpaint", "wrote 1 image")
    wait_images(page, "#inpaint-results")
    (entry,) = json.loads(download(page, "inpaint", "result.json"))["images"]
    assert entry["box"] == "8,8,40,40" and entry["prompt"] == "bag" and entry["stages"][0]["steps"] == 5
    assert status.split(":")[0] != value(page, "inpaint-status").split(":")[0]  # each run its own folder


@needs_browser
def test_bad_input_is_one_message_and_the_server_keeps_serving(page, server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture\n")
    tab(page, "edit")
    page.locator("#edit-image input[type=file]").set_input_files(str(broken))
    page.locator("#edit-run").click()
    message = wait_status(page, "edit", "error")
    assert "cannot read" in message and "broken.png" in message and "\n" not in message.strip()

    tab(page, "sample")
    fill(page, "steps", "0")
    page.locator("#sample-run").click()
    message = wait_status(page, "sample", "error")
    assert "steps" in message and "\n" not in message.strip()

    fill(page, "steps", "5")  # the next request is served
    page.get_by_text("more settings").first.click()
    fill(page, "tries", "1")
    fill(page, "sample-prompt", "bag")
    page.locator("#sample-run").click()
    wait_status(page, "sample", "wrote 1 image")
    wait_images(page, "#sample-results")
    assert "Traceback" not in server["log"].read_text()


@needs_browser
def test_two_tabs_at_once_each_get_their_own_results(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pages = [context.new_page(), context.new_page()]
    asked = [("bag", 3), ("sneaker", 7)]
    for page, (prompt, seed) in zip(pages, asked):
        page.goto(server["url"])
        page.wait_for_selector("#sample-run", state="attached", timeout=60_000)
        fill(page, "steps", "5")
        fill(page, "seed", str(seed))
        page.get_by_text("more settings").first.click()
        fill(page, "tries", "1")
        fill(page, "sample-prompt", prompt)
    for page in pages:  # both submitted before either finishes: the queue runs one, then the other
        page.locator("#sample-run").click()
    folders = set()
    for page, (prompt, seed) in zip(pages, asked):
        folders.add(wait_status(page, "sample", "wrote 1 image").split(":")[0])
        assert int(value(page, "sample-seed")) == seed
        (entry,) = json.loads(download(page, "sample", "result.json"))["images"]
        assert entry["seed"] == seed and entry["prompt"] == prompt
    assert len(folders) == 2
    context.close()


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="needs gradio (pip install -e '.[test]')")
def test_ctrl_c_stops_the_server_cleanly(tmp_path):
    """A server of its own stops on SIGINT with exit code 0 and one line, no traceback."""
    proc, _, log = _start(tmp_path)
    assert _stop(proc) == 0
    log.close()
    text = (tmp_path / "server.log").read_text()
    assert "mirage ui: stopped" in text and "Traceback" not in text
