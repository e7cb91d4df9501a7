#!/bin/sh
# AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; eps 0.1) on the paper-width VGG-16, on
# its chosen GDWS model (forward alphas, mismatch budget 0.01: the decisive table's fastest GDWS
# point within 1 pt) and on spatial SVD at MACs / 8 (the fastest float point within 1 pt),
# white-box with ONNX Runtime as the judge, in chunks of 100 test images (on one CPU thread about
# 45-56 min per chunk for the first two, 11 min for spatial SVD). Resumable: finished chunks are kept. Run it
# once per free core: each run claims the next chunk no other run has claimed (a .lock folder,
# removed when the chunk ends; remove a stale one left by a killed run).
#   sh tools/vgg16_autoattack.sh [N_TOTAL=500] [OUT=out/vgg16/aa]
# AA_MODELS="original gdws" limits a run to those models (default: all three).
# then compare (McNemar on the same images):
#   python tools/robust_eval.py --compare $(ls OUT/original_*.json | paste -sd,) $(ls OUT/gdws_*.json | paste -sd,)
set -e
TOTAL=${1:-500}
OUT=${2:-out/vgg16/aa}
M=models/vgg16_fmnist_fgsm.onnx
A=out/vgg16/alphas_forward.npz
G=out/sweep_vgg16/models/gdws_fwd_mismatch_0.01.onnx
S=out/sweep_vgg16/models/ssvd_mac_8.onnx
mkdir -p "$OUT" "$(dirname $G)"
[ -f $A ] || onnx-gdws sensitivity $M -o $A --method forward --data fashion-mnist:train --n 256 --threads 1
[ -f $G ] || onnx-gdws optimize $M -o $G --alphas $A --width-multiple 16 --mismatch-budget 0.01 --threads 1
[ -f $S ] || onnx-gdws optimize $M -o $S --conv ssvd --mac-reduction 8 --threads 1
start=0
while [ $start -lt "$TOTAL" ]; do
    tag=$(printf %03d $start)
    for pair in "original:$M" "gdws:$G" "ssvd8:$S"; do
        name=${pair%%:*}; model=${pair#*:}; chunk="$OUT/${name}_$tag"
        case " ${AA_MODELS:-original gdws ssvd8} " in *" $name "*) ;; *) continue ;; esac
        [ -f "$chunk.json" ] && continue
        mkdir "$chunk.lock" 2>/dev/null || continue  # another run has it
        python tools/robust_eval.py "$model" --attack autoattack --start $start --n 100 --threads 1 \
            -o "$chunk.json" || { rmdir "$chunk.lock"; exit 1; }
        rmdir "$chunk.lock"
    done
    start=$((start + 100))
done
