#!/bin/sh
# The decisive table of the paper-width robust VGG-16 (docs/results.md, "Paper width"): GDWS plain, with
# forward alphas (allocated across the network; also under --target latency, which keeps a
# layer only where its measured realization is faster) and data-aware + forward alphas,
# latency-targeted GDWS, spatial SVD, pruning, INT8 and GDWS + INT8, each attacked white-box (PGD-20, eps 0.1) and
# timed interleaved with the original. Resumable: rerun the same command after an interruption.
#   sh tools/vgg16_sweep.sh [OUT] [extra sweep flags, e.g. --retime --threads 2]
set -e
OUT=${1:-out/sweep_vgg16}
[ $# -gt 0 ] && shift
M=models/vgg16_fmnist_fgsm.onnx
A=out/vgg16/alphas_forward.npz
mkdir -p out/vgg16
[ -f $A ] || onnx-gdws sensitivity $M -o $A --method forward --data fashion-mnist:train --n 256 --threads 1
FWD="--alphas $A --width-multiple 16"  # points planned by MACs unless they say --target latency
DA="--data-aware 1.0 --data fashion-mnist:train"
# timed against INT8 alone; every conv INT8, as docs/results.md measured it (before mixed precision)
INT8="--quantize int8 --no-mixed-precision --data fashion-mnist:train"
onnx-gdws sweep $M --n 1000 --n-quantized 200 --threads 1 --runs 50 --batch 1,32 --out "$OUT" \
    --budget error:0.02 --budget error:0.05 --budget error:0.1 --budget error:0.2 \
    --point "fwd mismatch 0.002: $FWD --mismatch-budget 0.002 --target macs" \
    --point "fwd mismatch 0.005: $FWD --mismatch-budget 0.005 --target macs" \
    --point "fwd mismatch 0.01: $FWD --mismatch-budget 0.01 --target macs" \
    --point "data-aware+fwd mismatch 0.002: $DA $FWD --mismatch-budget 0.002 --target macs" \
    --point "data-aware+fwd mismatch 0.005: $DA $FWD --mismatch-budget 0.005 --target macs" \
    --point "fwd mismatch 0.005 latency: $FWD --mismatch-budget 0.005 --target latency" \
    --point "fwd mismatch 0.01 latency: $FWD --mismatch-budget 0.01 --target latency" \
    --point "fwd mismatch 0.02 latency: $FWD --mismatch-budget 0.02 --target latency" \
    --point "fwd mismatch 0.005 latency int8: $FWD --mismatch-budget 0.005 --target latency $INT8" \
    --point "fwd mismatch 0.01 latency int8: $FWD --mismatch-budget 0.01 --target latency $INT8" \
    --point "latency error 0.05: --target latency --error-budget 0.05" \
    --point "latency 1.5x: --target latency --latency-reduction 1.5" \
    --point "latency 2x: --target latency --latency-reduction 2" \
    --point "latency 3x: --target latency --latency-reduction 3" \
    --peer ssvd --peer prune --peer int8 --peer gdws+int8 --peer ssvd:2.5 --peer ssvd:3 --peer ssvd:4 --peer ssvd:6 --peer ssvd:8 --peer ssvd:12 --peer ssvd:16 \
    --match-at "gdws fwd mismatch 0.005" --match-at "gdws error:0.1" --match-at "gdws fwd mismatch 0.01 latency" \
    --match-at "gdws latency 2x" \
    "$@"
