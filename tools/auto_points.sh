#!/usr/bin/env bash
# The conv="auto" measurements of docs/auto.md: each zoo model optimized by the default command
# (no budget flag: per-layer error 0.15 where the form pays for it, --payoff 4) and at a ladder of
# per-layer error budgets without the pay-off rule (--payoff 0, how the default was chosen), every
# family timed on this machine's CPU EP, one thread, batch 1; then each result attacked white-box
# against its original (PGD-20, eps 0.1, first N test images, ONNX Runtime as the judge); then the
# INT8 points; then the VGG-16 points timed interleaved at batch 1 and 32.
#
#   sh tools/auto_points.sh [N]          (N = 1000 by default; outputs under out/auto/)
#
# Resumable: a point whose validation report exists is skipped, and so is the validation of a
# point that rewrote nothing (the model is the original). Two validations at a time suit a 2-core
# machine (the optimize runs go first, one at a time, so that their timings are quiet).
set -eu
N=${1:-1000}
OUT=out/auto
mkdir -p "$OUT"
# model:budget (default = no budget flag; a number = --error-budget it with --payoff 0)
POINTS="vgg16_fmnist_fgsm:default vgg_small_fgsm:default resnet18_small_fgsm:default
vgg16_fmnist_fgsm:0.05 vgg16_fmnist_fgsm:0.15 vgg_small_fgsm:0.05 vgg_small_fgsm:0.1 vgg_small_fgsm:0.15
resnet18_small_fgsm:0.05 resnet18_small_fgsm:0.1 resnet18_small_fgsm:0.15"
for p in $POINTS; do
  m=${p%%:*}; e=${p##*:}
  if [ "$e" = default ]; then flags=""; else flags="--error-budget $e --payoff 0"; fi
  [ -f "$OUT/${m}_$e.onnx" ] || onnx-gdws optimize "models/$m.onnx" -o "$OUT/${m}_$e.onnx" --target latency \
    --batch 1 --threads 1 $flags --report "$OUT/${m}_$e.json" > "$OUT/${m}_$e.txt"
done
validate() {
  m=${1%%:*}; e=${1##*:}
  # unchanged (the report's summary rewrote 0 convs): nothing to attack
  if python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['summary']['rewritten'] != 0)" \
    "$OUT/${m}_$e.json"; then return 0; fi
  [ -f "$OUT/val_${m}_$e.json" ] || onnx-gdws validate "models/$m.onnx" "$OUT/${m}_$e.onnx" --n "$N" \
    --attack pgd --threads 1 --report "$OUT/val_${m}_$e.json" > "$OUT/val_${m}_$e.txt"
}
set -- $POINTS
while [ $# -gt 0 ]; do
  validate "$1" &
  [ $# -gt 1 ] && validate "$2" &
  wait
  shift; [ $# -gt 0 ] && shift
done
# INT8: alone, on the default point, and on 0.15 without the pay-off rule (--data calibrates them);
# each attacked through straight-through (BPDA) gradients with Square beside, as `evaluate` does
M=models/vgg16_fmnist_fgsm.onnx
# every conv INT8, as docs/auto.md measured it (before mixed precision, the default since; tools/int8_mixed.sh)
INT8="--quantize int8 --no-mixed-precision --data fashion-mnist:train --batch 1 --threads 1"
[ -f "$OUT/int8_alone.onnx" ] || onnx-gdws optimize $M -o "$OUT/int8_alone.onnx" --conv off $INT8 > /dev/null
[ -f "$OUT/vgg16_int8_default.onnx" ] || onnx-gdws optimize $M -o "$OUT/vgg16_int8_default.onnx" $INT8 \
  --report "$OUT/vgg16_int8_default.json" > "$OUT/vgg16_int8_default.txt"
[ -f "$OUT/vgg16_int8_0.15.onnx" ] || onnx-gdws optimize $M -o "$OUT/vgg16_int8_0.15.onnx" $INT8 \
  --error-budget 0.15 --payoff 0 --report "$OUT/vgg16_int8_0.15.json" > "$OUT/vgg16_int8_0.15.txt"
for m in original:$M int8_default:$OUT/vgg16_int8_default.onnx int8_0.15:$OUT/vgg16_int8_0.15.onnx; do
  [ -f "$OUT/ev_${m%%:*}.json" ] || onnx-gdws evaluate "${m#*:}" --n "$N" --shard-size "$N" --attack pgd \
    --queries 200 --threads 1 -o "$OUT/ev_${m%%:*}.json" > "$OUT/ev_${m%%:*}.txt"
done
onnx-gdws validate "$OUT/ev_original.json" "$OUT/ev_int8_default.json" --markdown > "$OUT/val_int8_default.md"
# latency: all of them interleaved with the original in one run, at batch 1 and 32
onnx-gdws bench $M "$OUT/int8_alone.onnx" "$OUT/vgg16_fmnist_fgsm_default.onnx" "$OUT/vgg16_int8_default.onnx" \
  "$OUT/vgg16_fmnist_fgsm_0.15.onnx" "$OUT/vgg16_int8_0.15.onnx" --batch 1,32 --threads 1 --runs 60 \
  --report "$OUT/bench_all.json" > "$OUT/bench_all.txt"
# the default point alone against the original (a second, independent run)
onnx-gdws bench $M "$OUT/vgg16_fmnist_fgsm_default.onnx" --batch 1,32 --threads 1 --runs 40 \
  --report "$OUT/bench_default.json" > "$OUT/bench_default.txt"
# what README.md and docs/auto.md quote, recorded for tools/measured_claims.py --check (the claims
# in docs/measured/claims.json name candidates by these paths: update them if they changed)
python tools/measured_claims.py --record auto_bench "$OUT/bench_all.json"
python tools/measured_claims.py --record auto_bench_default_alone "$OUT/bench_default.json"
python tools/measured_claims.py --record auto_val_default "$OUT/val_vgg16_fmnist_fgsm_default.json"
python tools/measured_claims.py --record auto_ev_int8_default "$OUT/ev_int8_default.json"
python tools/measured_claims.py --record auto_ev_original "$OUT/ev_original.json"
python tools/measured_claims.py --record auto_default "$OUT/vgg16_fmnist_fgsm_default.json"
python tools/measured_claims.py --check
# AA=1: AutoAttack on the default point, 500 test images in resumable shards of 100 (about an hour
# of one core per shard; compare with the original's in docs/results.md)
if [ "${AA:-0}" = 1 ]; then
  onnx-gdws evaluate "$OUT/vgg16_fmnist_fgsm_default.onnx" --attack autoattack --n 500 --shard-size 100 \
    --threads 1 --resume -o "$OUT/aa_default.json"
fi
