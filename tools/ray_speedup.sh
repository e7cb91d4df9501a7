#!/usr/bin/env bash
# Issue 26: wall time of `evaluate --attack pgd --n 400` on the paper-width VGG-16, one process
# (one thread) against `--ray --workers 2` (two local workers of one thread, Ray's start-up
# included), PAIRS times, alternating which goes first; results must agree sample by sample.
#   RAY_AUTH_MODE=disabled bash tools/ray_speedup.sh [PAIRS=3] [OUT=out/ray3]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-3}
OUT=${2:-out/ray3}
M=models/vgg16_fmnist_fgsm.onnx
mkdir -p "$OUT"
run() {  # NAME FLAGS...: one timed evaluate, its wall seconds appended to OUT/times.txt
    local name=$1; shift
    rm -rf "$OUT/$name.json" "$OUT/$name.json.shards"
    local t0 t1
    t0=$(date +%s.%N)
    onnx-gdws evaluate $M --attack pgd --n 400 --threads 1 -q -o "$OUT/$name.json" "$@"
    t1=$(date +%s.%N)
    echo "$name $(echo "$t1 - $t0" | bc)" | tee -a "$OUT/times.txt"
}
: > "$OUT/times.txt"
for i in $(seq 1 "$PAIRS"); do
    if [ $((i % 2)) = 1 ]; then run "single$i"; run "ray$i" --ray --workers 2
    else run "ray$i" --ray --workers 2; run "single$i"; fi
done
python - "$OUT" "$PAIRS" <<'PY'
import json, sys
out, pairs = sys.argv[1], int(sys.argv[2])
times = dict(line.split() for line in open(f"{out}/times.txt"))
for i in range(1, pairs + 1):
    s, r = (json.load(open(f"{out}/{k}{i}.json"))["result"] for k in ("single", "ray"))
    same = s["predictions"] == r["predictions"] and s["robust_correct"] == r["robust_correct"]
    ts, tr = float(times[f"single{i}"]), float(times[f"ray{i}"])
    print(f"pair {i}: single {ts:.1f} s, ray {tr:.1f} s, ratio {tr / ts:.3f}, identical per sample: {same}")
PY
