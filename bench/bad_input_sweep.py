"""The bad-input sweep as a new user would run it, each case a fresh `mirage` process: every one must end with
exit 0, 1 or 2; a failure must say one line (no traceback, no "internal error"); and no case may leave a
half-written file or an output folder with nothing in it. Prints one row per case and a summary.

    python bench/bad_input_sweep.py [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = str(ROOT / "src/mirage/assets/photo.png")
FAST = ["--steps", "2", "--quiet"]  # given first: a case's own value of an option wins
ONE_TRY = ("sample", "anagram", "hybrid")  # the tasks a built-in classifier checks: one try each
HYBRID = ["hybrid", "--low", "bag", "--high", "sneaker"]


def cases(tmp: Path) -> list[tuple[list[str], int]]:
    """(arguments, expected exit code)."""
    afile = tmp / "afile"
    afile.write_text("x")
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    pickle = tmp / "model.pt"
    pickle.write_bytes(b"not to be unpickled")
    state = tmp / "state.safetensors"
    state.write_bytes(b"{}")
    long_prompt = "x" * 10000
    return [
        (["sample", "--steps", "1001"], 2), (["sample", "--steps", "0"], 2), (["sample", "--steps", "-3"], 2),
        (["sample", "--steps", "1000000000"], 2), (["sample", "--seeds", "3,3,3"], 2), (["sample", "--seeds", "5-2"], 2),
        (["sample", "--seeds", "0-"], 2), (["sample", "--seeds", "a-b"], 2), (["sample", "--seed", "-1"], 2),
        (["sample", "--n", "0"], 2), (["sample", "--guidance", "inf"], 2), (["sample", "--guidance", "nan"], 2),
        (["sample", "--guidance", "-1"], 2), (["sample", "--sampler", "ddim", "--eta", "nan"], 2),
        (["sample", "--eta", "-1"], 2), (["sample", "--eta", "2"], 2), (["sample", "--memory", "bogus"], 2),
        (["sample", "--batch-size", "0"], 2), (["sample", "--device", "bogus"], 2), (["sample", "--device", "cuda:7"], 2),
        (["sample", "--prompt", "bag", "--prompt", "sneaker"], 2), (["sample", "--prompt", long_prompt], 2),
        (["sample", "--prompt", "bag", "--confidence", "-0.5"], 2), (["sample", "--prompt", "bag", "--confidence", "1"], 2),
        (["sample", "--prompt", "bag", "--tries", "0"], 2), (["sample", "--guidance-interval", "9-1"], 2),
        (["sample", "--guidance-interval", "5000-6000"], 2), (["sample", "--classifier-guidance", "-1"], 2),
        (["sample", "--model", str(pickle)], 2), (["sample", "--model", str(state)], 1),
        (["sample", "--model", str(tmp / "missing.safetensors")], 1), (["sample", "--model", "nobody/nothing"], 1),
        (["sample", "--out", "/proc/mirage-x"], 1), (["sample", "--out", str(afile / "sub")], 1),
        (["sample", "--out", str(afile)], 2), (["sample", "--schedule", "bogus"], 2),
        (["sample", "--schedule", "smart27", "--steps", "5"], 2), (["sample", "--noise-level", "5000"], 0),
        (["edit", "--image", PHOTO, "--start", "1,1,2"], 2), (["edit", "--image", PHOTO, "--start", "40"], 2),
        (["edit", "--image", PHOTO, "--start", "-1"], 2), (["edit", "--image", PHOTO, "--start", "x"], 2),
        (["edit", "--image", str(tmp / "missing.png")], 1), (["edit", "--image", str(corrupt)], 1),
        (["edit", "--image", str(tmp)], 1),
        (["inpaint", "--image", PHOTO], 2), (["inpaint", "--image", PHOTO, "--mask", str(tmp / "nomask.png")], 1),
        (["inpaint", "--image", PHOTO, "--box", "1,2"], 2), (["inpaint", "--image", PHOTO, "--box", "0,0,0,0"], 2),
        (["inpaint", "--image", PHOTO, "--box", "0,0,10,10", "--resample", "0"], 2),
        (["anagram", "--prompt", "bag"], 2), (["anagram", "--prompt", "bag", "--prompt", "sneaker", "--view", "bogus",
                                                "--view", "flip"], 2),
        (["anagram", "--prompt", "bag", "--prompt", "sneaker", "--view-seed", "-1"], 2),
        (["anagram", "--prompt", "bag", "--prompt", "bogus"], 2),
        ([*HYBRID, "--sigma", "nan"], 2), ([*HYBRID, "--sigma", "inf"], 2), ([*HYBRID, "--sigma", "-1"], 2),
        ([*HYBRID, "--mid", "dress"], 2), (["hybrid", "--low", "bag"], 2),
        (["hybrid", "--kind", "graycolor", "--gray", "bag", "--color", "sneaker"], 2),
        (["hybrid", "--kind", "bogus"], 2),
        (["denoise", "--image", PHOTO, "--levels", "-5"], 2), (["denoise", "--image", PHOTO, "--levels", "2000"], 2),
        (["denoise", "--image", PHOTO, "--every", "0"], 2), (["denoise", "--image", PHOTO, "--i-start", "500"], 2),
        (["train", "ddpm", "--subset", "0"], 2), (["train", "ddpm", "--subset", "-5"], 2),
        (["score", str(tmp / "no-run")], 2), (["again", str(tmp / "nothing.png")], 2),
        (["bogus"], 2), (["sample", "--bogus"], 2),
        (["sample", "--prompt", "bag", "--n", "2"], 0), (HYBRID, 0),
    ]


def run(argv: list[str], out: Path, env: dict) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    has_out = "--out" in argv or argv[0] in ("score", "again", "train", "bogus")
    extra = ([] if has_out else ["--out", str(out)])
    if argv[0] in ("sample", "edit", "inpaint", "anagram", "hybrid", "denoise"):
        extra += FAST + (["--tries", "1"] if argv[0] in ONE_TRY else [])
    p = subprocess.run([sys.executable, "-m", "mirage", argv[0], *extra, *argv[1:]], capture_output=True, text=True,
                       env=env, timeout=600)
    return p.returncode, p.stderr, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="run only the cases whose arguments contain this")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    bad = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        chosen = [c for c in cases(tmp) if args.only is None or args.only in " ".join(c[0])]
        for k, (argv, expected) in enumerate(chosen):
            out = tmp / f"out{k}"
            code, err, seconds = run(argv, out, env)
            lines = [line for line in err.strip().splitlines() if line.strip()]
            problems = []
            if code != expected:
                problems.append(f"exit {code}, expected {expected}")
            if code and len(lines) != 1:
                problems.append(f"{len(lines)} lines on stderr")
            if "Traceback" in err or "internal error" in err:
                problems.append("traceback or internal error")
            leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".tmp-")] if out.exists() else []
            if leftovers or (code and out.exists() and not any(out.iterdir())):
                problems.append(f"left behind: {leftovers or 'an empty folder'}")
            bad += bool(problems)
            shown = " ".join(a if len(a) < 40 else a[:20] + "..." for a in argv)
            print(f"{'FAIL' if problems else 'ok  '} exit {code} {seconds:5.1f} s  mirage {shown}"
                  + (f"  <- {'; '.join(problems)}" if problems else "")
                  + (f"\n       {lines[-1][:150]}" if code and lines else ""), flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} cases as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
