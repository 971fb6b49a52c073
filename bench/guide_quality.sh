#!/usr/bin/env bash
# Does classifier guidance (--classifier-guidance S, steered by the shipped guides) lift a single try of the
# built-ins' illusions and samples, and does the independent judge agree? Sweeps S for fashion (judged by the
# shipped classifier and the judge of bench/pick_quality.sh, in .data/) and digits (its shipped classifier),
# then adds tries (rejection sampling) at the likely strengths. Run on a GPU from the repository root.
# Usage: bash bench/guide_quality.sh OUT
set -uo pipefail
OUT=${1:?usage: guide_quality.sh OUT}
export PYTHONPATH=src PYTHONUNBUFFERED=1
Q="python bench/small_quality.py --device cuda --chunk 2000 --pair-seeds 4"
F="$Q --model fashion --classifier fashion .data/judge_fashion.safetensors"
D="$Q --model digits --classifier digits"
{
    $F --only anagrams --illusion-guidance 5 7 --classifier-guidance 0 100 200 300 500 800
    $F --only hybrids --illusion-guidance 5 7 --hybrid-sigma 2.5 2.8 3 3.2 --classifier-guidance 0 100 200 300 500
    $F --only samples --steps 100 --guidance 1 1.5 --interval 150-850 --classifier-guidance 0 5 10 20
    $D --only anagrams --illusion-guidance 5 7 --classifier-guidance 0 50 100 200 300 500
    $D --only hybrids --illusion-guidance 5 7 --hybrid-sigma 1.6 2 2.4 --classifier-guidance 0 50 100 200 300
    $D --only samples --steps 100 --guidance 1 1.5 --interval 150-850 --classifier-guidance 0 5 10 20
    $F --only anagrams --illusion-guidance 7 --classifier-guidance 300 500 --candidates 4 8 --pick first \
        --min-prob 0 0.9
    $F --only hybrids --illusion-guidance 7 --hybrid-sigma 2.8 3 --classifier-guidance 200 300 --candidates 4 8 \
        --pick first --min-prob 0 0.9
} | tee "$OUT/guide.jsonl"
# then (experiments/builtin/logs/guides/qualityN.jsonl is $OUT/guideN.jsonl): blurrier hybrids and tries at g 5 (2), digits
# hybrids without guidance (3), fashion hybrids' low prompt (4), the chosen defaults on 8 seeds per pair (5)
{
    $F --only hybrids --illusion-guidance 5 7 --hybrid-sigma 3.5 4 4.5 --classifier-guidance 200 300 500
    $F --only hybrids --illusion-guidance 5 --hybrid-sigma 3.2 3.5 4 --classifier-guidance 300 --candidates 4 8 \
        --pick first --min-prob 0.9
    $F --only anagrams --illusion-guidance 5 --classifier-guidance 300 --candidates 1 4 8 --pick first --min-prob 0.9
    $D --only anagrams --illusion-guidance 5 --classifier-guidance 100 --candidates 4 8 --pick first --min-prob 0.9
    $D --only hybrids --illusion-guidance 5 --hybrid-sigma 2.4 --classifier-guidance 10 20 30
} | tee "$OUT/guide2.jsonl"
$D --only hybrids --illusion-guidance 5 --hybrid-sigma 2 2.4 3.5 --classifier-guidance 0 --candidates 1 8 \
    --pick first --min-prob 0.9 | tee "$OUT/guide3.jsonl"
H="$F --only hybrids --hybrid-sigma 3.5"
{
    $H --steps 30 --illusion-guidance 3 5 --classifier-guidance 300 500 1000 --candidates 1 8 --pick first \
        --min-prob 0.9
    $H --steps 100 --illusion-guidance 5 --classifier-guidance 300 --candidates 1 8 --pick first --min-prob 0.9
    $H --steps 30 --illusion-guidance 5 --classifier-guidance 300 --candidates 16 --pick first --min-prob 0 0.9
} | tee "$OUT/guide4.jsonl"
C="${F/--pair-seeds 4/--pair-seeds 8} --illusion-guidance 5 --classifier-guidance 300 --pick first --min-prob 0.9"
{
    $C --only hybrids --hybrid-sigma 3.5 --steps 100 --candidates 8 16
    $C --only hybrids --hybrid-sigma 3.5 --steps 30 --candidates 16
    $C --only anagrams --steps 30 --candidates 1 8
} | tee "$OUT/guide5.jsonl"
