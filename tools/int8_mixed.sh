#!/usr/bin/env bash
# Mixed precision in the INT8 step (docs/recovery.md, "18x with INT8: mixed precision"): the
# README's INT8 points of the VGG-16 built twice from the same float model, with every conv INT8
# (--no-mixed-precision) and with the default mixed precision (convs whose INT8 kernel ORT runs
# slower left float where the whole model then measures faster); all timed in one interleaved run
# at batch 1 and 32; the mixed models attacked white-box (BPDA PGD-20 + Square over ORT, first N
# test images) against the original in the same evaluation.
#
#   bash tools/int8_mixed.sh            (from the repository root; outputs under $OUT)
#
# Points: INT8 alone; spatial SVD at MACs / 4 then INT8; the default command with INT8 (the
# planner times INT8 forms); the recovered VGG-16 at every rank 16 ($REC, written by
# `OUT=out/s4 REWRITE=b16_floor REWRITE_FLAGS="--conv ssvd --mac-reduction 16 --width-multiple 16"
# FT_NAME=b16_floor_ft bash tools/recovery_points.sh`) then INT8. Resumable: existing outputs are
# kept. About 10 min per INT8 evaluation at N = 1000 on one core; two run at a time.
set -euo pipefail
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$(dirname "$0")/.."

M=models/vgg16_fmnist_fgsm.onnx
OUT=${OUT:-out/int8_mixed}
REC=${REC:-out/s4/b16_floor_ft.onnx}
N=${N:-1000}
QUERIES=${QUERIES:-100}
mkdir -p "$OUT"
INT8=(--quantize int8 --data fashion-mnist:train --threads 1 --batch 1)

# float parents (deterministic: --target macs)
[[ -f "$OUT/ssvd4.onnx" ]] || onnx-gdws optimize "$M" -o "$OUT/ssvd4.onnx" --conv ssvd --mac-reduction 4 \
    --target macs --threads 1 > /dev/null
build() {  # NAME PARENT [optimize flags...]: NAME_all (every conv INT8) and NAME_mixed
    local name=$1 parent=$2
    shift 2
    for mode in all mixed; do
        local flag=()
        [[ $mode == all ]] && flag=(--no-mixed-precision)
        [[ -f "$OUT/${name}_$mode.onnx" ]] || onnx-gdws optimize "$parent" -o "$OUT/${name}_$mode.onnx" "$@" \
            "${INT8[@]}" "${flag[@]}" --report "$OUT/${name}_$mode.json" > "$OUT/${name}_$mode.txt"
    done
}
build int8_alone "$M" --conv off --target macs
build ssvd4_int8 "$OUT/ssvd4.onnx" --conv off --target macs
build default_int8 "$M"
build rec_int8 "$REC" --conv off --target macs
grep -h "mixed precision:" "$OUT"/*_mixed.txt

# latency first, on a quiet machine: every model interleaved with the original
onnx-gdws bench "$M" "$OUT"/int8_alone_{all,mixed}.onnx "$OUT"/ssvd4_int8_{all,mixed}.onnx \
    "$OUT"/default_int8_{all,mixed}.onnx "$REC" "$OUT"/rec_int8_{all,mixed}.onnx --batch 1,32 --threads 1 \
    --runs 100 --report "$OUT/bench.json" > "$OUT/bench.txt"
cat "$OUT/bench.txt"

# accuracy: the original once, then each mixed model, two at a time
evaluate() {  # NAME MODEL
    [[ -f "$OUT/ev_$1.json" ]] || onnx-gdws evaluate "$2" --data fashion-mnist:test --n "$N" --attack pgd \
        --queries "$QUERIES" --threads 1 --resume -o "$OUT/ev_$1.json" > "$OUT/ev_$1.txt" 2>&1
}
evaluate original "$M" &
evaluate int8_alone_mixed "$OUT/int8_alone_mixed.onnx" &
wait
evaluate ssvd4_int8_mixed "$OUT/ssvd4_int8_mixed.onnx" &
evaluate default_int8_mixed "$OUT/default_int8_mixed.onnx" &
wait
evaluate rec_int8_mixed "$OUT/rec_int8_mixed.onnx"
for name in int8_alone_mixed ssvd4_int8_mixed default_int8_mixed rec_int8_mixed; do
    onnx-gdws validate "$OUT/ev_original.json" "$OUT/ev_$name.json" --threads 1 --report "$OUT/val_$name.json" \
        > "$OUT/val_$name.txt"
    echo "== $name"; grep -E "clean|robust" "$OUT/val_$name.txt" | head -4
done
