#!/usr/bin/env bash
# Session 5: the training step replays from a CUDA graph (loop.Trainer.graph), which removes the launch
# overhead of the small UNet's eager step. With PROBE=1, checks the graphed step against the eager one
# (tests/test_train.py on the GPU) and times eager, graph and compile+graph steps; then trains $DATA (fashion:
# 60,000 images, digits: 8,337) at each WIDTHS:BATCH of $CONFIGS ($VARIANT: graph or compile+graph) for the
# epochs that fit $BUDGET seconds at the rate probed just before, and exports it as OUT/NAME-CONFIG.safetensors
# (fp16) with its logs.
# Usage (GPU, repository root, data in .data/): [DATA=... CONFIGS=... VARIANT=... NAME=...] bash train6.sh OUT
set -uo pipefail
OUT=${1:?usage: train6.sh OUT}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-27}
CONFIGS=${CONFIGS:-"32,64,128:1024 40,80,160:1024"}
VARIANT=${VARIANT:-graph}
DATA=${DATA:-fashion}
NAME=${NAME:-${DATA}6}
IMAGES=$([ "$DATA" = digits ] && echo 8337 || echo 60000)
mkdir -p "$OUT"
if [ "${PROBE:-0}" = 1 ]; then
    python -m pytest -q -p no:cacheprovider tests/test_train.py 2>&1 | tail -3 | tee "$OUT/tests6.txt"
    python bench/train_speed.py train --root .data/fashion --widths 32,64,128 --batch 1024 --steps 60 \
        --warmup 10 --variants eager graph compile+graph | tee "$OUT/speed6.txt"
fi
for config in $CONFIGS; do
    widths=${config%:*} batch=${config#*:} name=$NAME-${config//[,:]/-}
    rate=$(python bench/train_speed.py train --data "$DATA" --root ".data/$DATA" --widths "$widths" --batch "$batch" \
        --steps 60 --warmup 10 --variants "$VARIANT" | tee -a "$OUT/speed6.txt" \
        | sed -E 's/.*: ([0-9,]+) img\/s.*/\1/' | tr -d ,)
    epochs=$(( BUDGET * rate / IMAGES ))
    start=$(date +%s.%N)
    mirage train ddpm --classes --data "$DATA" --root ".data/$DATA" --epochs "$epochs" \
        --every $(( epochs / 8 + 1 )) --batch-size "$batch" --widths "$widths" --lr 3e-3 \
        $([[ $VARIANT == compile* ]] && echo --compile) --out "/tmp/runs/$name" 2>&1 | tr '\r' '\n' \
        > "/tmp/runs-$name.log"
    echo "$name ($VARIANT): $rate img/s probed -> $epochs epochs;" \
        "$(python -c "print(round($(date +%s.%N) - $start, 1))") s for the whole command; first and last epoch:" \
        "$(grep epoch_end "/tmp/runs/$name/metrics.jsonl" | sed -n '1p;$p' | tr '\n' ' ')" | tee -a "$OUT/speed6.txt"
    python -c "from pathlib import Path; from mirage.train.runs import export_model as e; \
        e(Path('/tmp/runs/$name/model.safetensors'), Path('$OUT/$name.safetensors'))"
    tail -3 "/tmp/runs-$name.log" > "$OUT/$name.log"
    tar czf "$OUT/runs-$name.tar.gz" -C /tmp/runs --exclude='*.safetensors' "$name"
done
