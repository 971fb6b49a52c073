#!/usr/bin/env bash
# Session 3: the default UNet is launch-bound on the H100 (20 ms a step at batch 512, 27 ms at 1024), so
# torch.compile and a larger batch should fit more epochs into the same ~27 s of training steps. Probes the
# compiled throughput at batch 1024, trains `fashion` for the epochs that fit, and scores it as
# bench/pick_quality.sh scored the shipped one (shipped classifier and the independent judge in .data/).
# Usage (GPU, repository root, data in .data/): bash experiments/builtin/train4.sh OUT
set -uo pipefail
OUT=${1:?usage: train4.sh OUT}
export PYTHONPATH=src PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-27}
python bench/train_speed.py train --root .data/fashion --batch 1024 --compile --steps 60 --warmup 20 \
    | tee "$OUT/speed4.txt"
rate=$(grep 'compile=True' "$OUT/speed4.txt" | sed -E 's/.*: ([0-9,]+) img\/s.*/\1/' | tr -d ,)
epochs=$(( BUDGET * rate / 60000 ))
echo "compiled: $rate img/s -> $epochs epochs" | tee -a "$OUT/speed4.txt"
start=$(date +%s.%N)
mirage train ddpm --classes --data fashion --root .data/fashion --epochs "$epochs" --every 1 \
    --batch-size 1024 --lr 3e-3 --compile --out /tmp/runs/fashion4 2>&1 | tr '\r' '\n' > /tmp/runs-fashion4.log
echo "fashion4: $(python -c "print(round($(date +%s.%N) - $start, 1))") s for the whole command; last epoch:" \
    "$(grep epoch_end /tmp/runs/fashion4/metrics.jsonl | tail -1)" | tee -a "$OUT/speed4.txt"
python -c "from pathlib import Path; from mirage.train.runs import export_model as e; \
    e(Path('/tmp/runs/fashion4/model.safetensors'), Path('$OUT/fashion4.safetensors'))"
cp /tmp/runs-fashion4.log "$OUT/"
tar czf "$OUT/runs4.tar.gz" -C /tmp/runs --exclude='*.safetensors' fashion4
python bench/small_quality.py --device cuda --chunk 2000 --model "$OUT/fashion4.safetensors" --candidates 1 2 \
    --classifier fashion .data/judge_fashion.safetensors --steps 100 --only samples --guidance 1.5 2 3 \
    --interval none 150-850 | tee "$OUT/quality4.jsonl"
python bench/small_quality.py --device cuda --chunk 2000 --model "$OUT/fashion4.safetensors" --candidates 1 8 \
    --classifier fashion .data/judge_fashion.safetensors --only anagrams hybrids --illusion-guidance 7 \
    --hybrid-sigma 2 3 --pair-seeds 2 | tee -a "$OUT/quality4.jsonl"
