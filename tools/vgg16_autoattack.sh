#!/bin/sh
# AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; eps 0.1) on the paper-width VGG-16, on
# its chosen GDWS model (forward alphas, mismatch budget 0.01: the decisive table's fastest GDWS
# point within 1 pt) and on spatial SVD at MACs / 8 (the fastest float point within 1 pt),
# white-box with ONNX Runtime as the judge, in shards of 100 test images (on one CPU thread about
# 45-56 min per shard for the first two, 11 min for spatial SVD). Resumable: `evaluate --resume`
# keeps every finished shard in OUT/NAME.json.shards. RAY=1 runs the shards as Ray tasks, one per
# free core (RAY=ADDRESS: on that cluster; `pip install "onnx-gdws[ray]"`).
#   sh tools/vgg16_autoattack.sh [N_TOTAL=500] [OUT=out/vgg16/aa]
# AA_MODELS="original gdws" limits a run to those models (default: all three).
# then docs/results.md's table (McNemar on the same images, lost / gained against the original):
#   onnx-gdws validate OUT/original.json OUT/gdws.json OUT/ssvd8.json --markdown
set -e
TOTAL=${1:-500}
OUT=${2:-out/vgg16/aa}
M=models/vgg16_fmnist_fgsm.onnx
A=out/vgg16/alphas_forward.npz
G=out/sweep_vgg16/models/gdws_fwd_mismatch_0.01.onnx
S=out/sweep_vgg16/models/ssvd_mac_8.onnx
mkdir -p "$OUT" "$(dirname $G)"
[ -f $A ] || onnx-gdws sensitivity $M -o $A --method forward --data fashion-mnist:train --n 256 --threads 1
[ -f $G ] || onnx-gdws optimize $M -o $G --alphas $A --width-multiple 16 --mismatch-budget 0.01 --target macs --threads 1
[ -f $S ] || onnx-gdws optimize $M -o $S --conv ssvd --mac-reduction 8 --threads 1
case "${RAY:-}" in
    "") RAY_FLAG="" ;;
    1) RAY_FLAG="--ray" ;;
    *) RAY_FLAG="--ray=$RAY" ;;
esac
for pair in "original:$M" "gdws:$G" "ssvd8:$S"; do
    name=${pair%%:*}; model=${pair#*:}
    case " ${AA_MODELS:-original gdws ssvd8} " in *" $name "*) ;; *) continue ;; esac
    onnx-gdws evaluate "$model" --attack autoattack --n "$TOTAL" --shard-size 100 --threads 1 --resume \
        -o "$OUT/$name.json" $RAY_FLAG
done
