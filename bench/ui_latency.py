"""The web UI's latency and memory against the command line, on the built-in model (CPU).

    python bench/ui_latency.py [--runs 3] [--generations 20] [--steps N]

1. Wall time from the click on "make anagram" to a shown 2-view anagram (status updated, both view images and
   the animation loaded in the page), in headless Chromium, against the same `mirage anagram` command run
   as a user runs it (a new process: start-up, model load, the run). Same seeds, same settings; the images'
   pixels are compared (their PNG text differs only in the --out folder). The UI's first click (which loads the model) is reported apart.
2. The server's resident memory (RSS) after 2 generations and after `--generations` of them.

Needs gradio, playwright and Debian's /usr/bin/chromium (as tests/test_ui.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
PROMPTS = ("bag", "sneaker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(root / "gradio-tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "mirage", "ui", "--port", str(port), "--out", str(root / "ui")],
                            stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"mirage ui did not start: {(root / 'server.log').read_text()[-2000:]}")


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first


def click_to_shown(page, seed: int, extra: dict[str, str]) -> tuple[float, str]:
    """Seconds from the click to the anagram shown; the run folder's name."""
    field(page, "seed").fill(str(seed))
    for elem_id, value in extra.items():
        field(page, elem_id).fill(value)
    before = field(page, "anagram-status").input_value()
    t0 = time.perf_counter()
    page.locator("#anagram-run").click()
    page.wait_for_function(
        """([before]) => {
            const s = document.querySelector('#anagram-status textarea');
            if (!s || s.value === before || !s.value.includes('wrote')) return false;
            const ok = sel => Array.from(document.querySelectorAll(sel + ' img'))
                .filter(i => i.complete && i.naturalWidth > 0).length;
            return ok('#anagram-views') >= 2 && ok('#anagram-animation') >= 1;
        }""", arg=[before], timeout=600_000, polling=20)
    shown = time.perf_counter() - t0
    status = field(page, "anagram-status").input_value()
    if not status.split(":")[0].endswith("anagram"):
        raise SystemExit(f"the UI did not make the anagram: {status}")
    return shown, status.split(":")[0]


def cli_run(root: Path, seed: int, flags: list[str]) -> tuple[float, Path]:
    out = root / f"cli-seed{seed}"
    argv = ["mirage", "anagram", "--model", "fashion", "--seed", str(seed), "--view", "identity", "--prompt",
            PROMPTS[0], "--view", "flip", "--prompt", PROMPTS[1], *flags, "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="timed anagrams each way (default 3)")
    p.add_argument("--generations", type=int, default=20, help="generations before the second RSS reading")
    p.add_argument("--steps", type=int, default=None, help="--steps for every run (default: the CLI's default)")
    p.add_argument("--tries", type=int, default=None, help="--tries for every run (default: the CLI's default)")
    args = p.parse_args()
    extra = {k: str(v) for k, v in (("steps", args.steps), ("tries", args.tries)) if v is not None}
    flags = [tok for k, v in extra.items() for tok in (f"--{k}", v)]
    root = Path(tempfile.mkdtemp(prefix="mirage-ui-bench-"))
    print(f"settings: 2-view anagram on fashion, prompts {PROMPTS}, {shlex.join(flags) or 'CLI defaults'}; "
          f"{os.cpu_count()} CPU cores; work in {root}")
    proc, url = start_server(root)
    seeds = list(range(args.runs))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#sample-run", state="attached", timeout=120_000)
            page.get_by_role("tab", name="anagram", exact=True).click()
            if "tries" in extra:
                page.get_by_text("more settings").first.click()
            field(page, "anagram-prompt-1").fill(PROMPTS[0])
            field(page, "anagram-prompt-2").fill(PROMPTS[1])
            # the first click loads the model (reported apart); then the timed seeds; then more to --generations
            order = [100, *seeds, *range(1000, 1000 + max(0, args.generations - 1 - len(seeds)))]
            times, folders, rss = {}, {}, []
            for seed in order:
                times[seed], folders[seed] = click_to_shown(page, seed, extra)
                rss.append(rss_mib(proc.pid))
            rss_2 = rss[1]
            generations = len(order)
            rss_n = rss_mib(proc.pid)
            first, ui_times = times[100], [times[s] for s in seeds]
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)

    cli_times, same = [], []
    for seed in seeds:
        t, out = cli_run(root, seed, flags)
        cli_times.append(t)
        cli_entry = json.loads((out / "result.json").read_text())["images"][0]
        ui_folder = root / "ui" / folders[seed]
        ui_entry = json.loads((ui_folder / "result.json").read_text())["images"][0]
        with Image.open(out / cli_entry["file"]) as a, Image.open(ui_folder / ui_entry["file"]) as b:
            same.append(a.tobytes() == b.tobytes() and cli_entry["try"] == ui_entry["try"]
                        if "try" in cli_entry else a.tobytes() == b.tobytes())

    ui, cli = statistics.median(ui_times), statistics.median(cli_times)
    print(f"UI, click to a shown 2-view anagram: median {ui:.2f} s over {len(ui_times)} "
          f"({', '.join(f'{t:.2f}' for t in ui_times)}); first click, loading the model: {first:.2f} s")
    print(f"CLI, the same `mirage anagram`:      median {cli:.2f} s over {len(cli_times)} "
          f"({', '.join(f'{t:.2f}' for t in cli_times)})")
    print(f"UI / CLI: {ui / cli:.2f}x (target <= 1.5x); first click / CLI: {first / cli:.2f}x")
    print(f"same pixels from the UI and the CLI, per seed: {same}")
    print(f"server RSS after 2 generations: {rss_2:.0f} MiB; after {generations}: {rss_n:.0f} MiB "
          f"({rss_n - rss_2:+.0f} MiB); after each: {', '.join(f'{r:.0f}' for r in rss)}")


if __name__ == "__main__":
    main()
