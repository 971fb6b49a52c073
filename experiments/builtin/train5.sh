#!/usr/bin/env bash
# Session 3: `digits` retrained as train4.sh retrained `fashion` (compiled, batch 1024), for the epochs that
# fit 27 s at the compiled rate train4.sh measured (51.5k img/s; 8,337 images); no probe, so the compile
# is cold and lands in epoch 1's time. Usage (GPU, repository root, data in .data/): bash train5.sh OUT
set -uo pipefail
OUT=${1:?usage: train5.sh OUT}
export PYTHONPATH=src PYTHONUNBUFFERED=1
epochs=$(( 27 * 51489 / 8337 ))
start=$(date +%s.%N)
mirage train ddpm --classes --data digits --root .data/digits --epochs "$epochs" --every 20 \
    --batch-size 1024 --lr 3e-3 --compile --out /tmp/runs/digits5 2>&1 | tr '\r' '\n' > /tmp/runs-digits5.log
echo "digits5: $epochs epochs, $(python -c "print(round($(date +%s.%N) - $start, 1))") s for the whole command;" \
    "first and last epoch: $(grep epoch_end /tmp/runs/digits5/metrics.jsonl | sed -n '1p;$p' | tr '\n' ' ')" \
    | tee "$OUT/speed5.txt"
python -c "from pathlib import Path; from mirage.train.runs import export_model as e; \
    e(Path('/tmp/runs/digits5/model.safetensors'), Path('$OUT/digits5.safetensors'))"
cp /tmp/runs-digits5.log "$OUT/"
tar czf "$OUT/runs5.tar.gz" -C /tmp/runs --exclude='*.safetensors' digits5
python bench/small_quality.py --device cuda --chunk 2000 --model "$OUT/digits5.safetensors" --steps 100 \
    --guidance 1.5 2 3 --interval none 150-850 --only samples | tee "$OUT/quality5.jsonl"
python bench/small_quality.py --device cuda --chunk 2000 --model "$OUT/digits5.safetensors" --candidates 1 8 \
    --illusion-guidance 5 --pair-seeds 2 --only anagrams hybrids | tee -a "$OUT/quality5.jsonl"
