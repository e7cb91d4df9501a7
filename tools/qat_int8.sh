#!/usr/bin/env bash
# Issue 28, item 4 ("through INT8"): fine-tune the default INT8 point of the paper-width VGG-16
# through its QDQ graph (fake-quantized integer weights, clipped straight-through, scales fixed),
# distilling the original, then attack both INT8 models and the original on the same 1000 test
# images (PGD-20 through straight-through gradients, Square beside) and time them.
#   bash tools/qat_int8.sh            (from the repository root; writes out/qat/)
# Every step on ONE thread. The default INT8 point is re-planned by measured latency, so its
# layers can differ from run to run on a noisy machine. Every conv INT8, as docs/recovery.md measured it
# (before mixed precision, the default since: tools/int8_mixed.sh).
set -euo pipefail
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$(dirname "$0")/.."
M=models/vgg16_fmnist_fgsm.onnx
OUT=out/qat
N=1000
STEPS=${STEPS:-150}
LR=${LR:-0.005}
mkdir -p "$OUT"
[ -f "$OUT/int8_default.onnx" ] || onnx-gdws optimize $M -o "$OUT/int8_default.onnx" --quantize int8 --no-mixed-precision \
    --data fashion-mnist:train --batch 1 --threads 1 --report "$OUT/int8_default.json" > "$OUT/int8_default.txt"
onnx-gdws finetune "$OUT/int8_default.onnx" -o "$OUT/int8_qat.onnx" --data fashion-mnist:train --teacher $M \
    --attack pgd-2 --steps "$STEPS" --train all --lr "$LR" --threads 1 --report "$OUT/int8_qat.json"
for m in original:$M int8_default:$OUT/int8_default.onnx int8_qat:$OUT/int8_qat.onnx; do
    [ -f "$OUT/ev_${m%%:*}.json" ] || onnx-gdws evaluate "${m#*:}" --n "$N" --shard-size "$N" --attack pgd \
        --queries 200 --threads 1 -o "$OUT/ev_${m%%:*}.json" > "$OUT/ev_${m%%:*}.txt"
done
onnx-gdws validate "$OUT/ev_original.json" "$OUT/ev_int8_default.json" "$OUT/ev_int8_qat.json" --markdown \
    > "$OUT/val.md"
onnx-gdws bench $M "$OUT/int8_default.onnx" "$OUT/int8_qat.onnx" --batch 1 --threads 1 --runs 40 \
    --report "$OUT/bench.json" > "$OUT/bench.txt"
