#!/usr/bin/env bash
# Does `--pick best` (the best of K candidates by the shipped classifier) reach issue 4's quality targets, and
# does its choice hold up before a judge it was not chosen by? Trains an independent judge classifier (other
# widths, other seed), then scores best-of-K samples, anagrams and hybrids of the built-ins with both.
# Run on a GPU from the repository root with the data in .data/. Usage: bash bench/pick_quality.sh OUT
set -uo pipefail
OUT=${1:?usage: pick_quality.sh OUT}
export PYTHONPATH=src PYTHONUNBUFFERED=1
mirage train classifier --data fashion --root .data/fashion --channels 48,96,192 --seed 1 \
    --epochs 8 --out /tmp/judge 2>&1 | tail -2 | tee "$OUT/judge.log"
cp /tmp/judge/classifier.safetensors "$OUT/judge_fashion.safetensors"
Q="python bench/small_quality.py --device cuda --chunk 2000 --model fashion --candidates 1 2 4 8 \
   --classifier fashion /tmp/judge/classifier.safetensors"
{
    $Q --steps 100 --only samples --guidance 1.5 2 --interval none 150-850
    $Q --steps 30 --only anagrams --illusion-guidance 5 7 --pair-seeds 2
    $Q --steps 30 --only hybrids --illusion-guidance 5 --hybrid-sigma 2 3 --pair-seeds 2
    python bench/small_quality.py --device cuda --chunk 2000 --model digits --candidates 1 4 8 --steps 100 \
        --guidance 2 --illusion-guidance 5 7 --pair-seeds 2
} | tee "$OUT/pick.jsonl"
