#!/usr/bin/env bash
# Second session: pick the fastest layout and batch size, retrain `fashion` within the same ~27 s budget,
# and measure issue 4's quality targets for every candidate on the GPU (bench/small_quality.py) with the
# scoring classifiers in .data/. Usage: bash experiments/builtin/train2.sh OUT
set -uo pipefail
OUT=${1:?usage: train2.sh OUT}
export PYTHONPATH=src
mkdir -p /tmp/runs

# 1. which layout and batch size train fastest
python bench/train_speed.py train --root .data/fashion --widths 32,64,128 --batch 512 1024 --channels-last \
    --steps 60 --warmup 15 | tee "$OUT/speed2.txt"
read -r batch layout rate <<<"$(python - "$OUT/speed2.txt" <<'PY'
import re, sys
rows = [re.search(r"batch=(\d+) compile=\w+ (\w+): ([\d,]+) img/s", l) for l in open(sys.argv[1])]
best = max((r for r in rows if r), key=lambda r: int(r.group(3).replace(",", "")))
print(best.group(1), best.group(2), best.group(3).replace(",", ""))
PY
)"
BUDGET=${BUDGET:-27}
epochs=$(( BUDGET * rate / 60000 ))
lr=$([ "$batch" = 1024 ] && echo 3e-3 || echo 2e-3)
cl=$([ "$layout" = channels_last ] && echo --channels-last || true)
echo "fastest: batch $batch, $layout, $rate img/s -> $epochs epochs at lr $lr"

# 2. the retrained fashion model
start=$(date +%s.%N)
mirage train ddpm --classes --data fashion --root .data/fashion --epochs "$epochs" \
    --batch-size "$batch" --lr "$lr" $cl --out /tmp/runs/fashion2 2>&1 | tr '\r' '\n' > /tmp/runs/fashion2.log
echo "fashion2: $(python -c "print(round($(date +%s.%N) - $start, 1))") s for the whole command" \
    | tee -a /tmp/runs/fashion2.log
grep epoch_end /tmp/runs/fashion2/metrics.jsonl | tail -1
cp /tmp/runs/fashion2/model.safetensors "$OUT/fashion2.safetensors"
tar czf "$OUT/runs2.tar.gz" -C /tmp/runs --exclude='*.safetensors' .

# 3. quality of every candidate: samples at several guidance scales, anagrams and hybrids
Q="python bench/small_quality.py --device cuda --chunk 1000"
$Q --model src/mirage/builtin/fashion.safetensors .data/fashion-long.safetensors /tmp/runs/fashion2/model.safetensors \
    --classifier .data/clf_fashion.safetensors --guidance 1.5 2 3 --illusion-guidance 3 5 7 | tee "$OUT/quality.jsonl"
$Q --model src/mirage/builtin/digits.safetensors --classifier .data/clf_digits.safetensors \
    --guidance 1.5 2 3 --illusion-guidance 3 5 7 | tee -a "$OUT/quality.jsonl"
$Q --model .data/fashion-long.safetensors /tmp/runs/fashion2/model.safetensors --only samples --steps 50 \
    --classifier .data/clf_fashion.safetensors --guidance 1.5 2 | tee -a "$OUT/quality.jsonl"
