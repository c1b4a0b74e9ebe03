#!/usr/bin/env bash
# Parallel expert-training sweep: one single-threaded job per line of a job list.
# Usage: scripts/sweep.sh JOBS OUTDIR [PARALLEL]
# Each job line: NAME DOMAIN OBJECTIVE PARAM LR TARGETS SEED [EXTRA TRAIN ARGS...]
set -uo pipefail
JOBS=$1; OUT=$2; P=${3:-$(nproc)}
BIN=${BIN:-target/release/bitsvf}
mkdir -p "$OUT"
export RAYON_NUM_THREADS=1 BITSVF_CACHE="$OUT/cache"
ALL=add,brackets,compare,convert,copy,count,mul,parity,program,reverse,sort,sub,successor
"$BIN" eval --domains $ALL --n ${BASE_N:-500} --split test --json > "$OUT/base.eval.json" 2>"$OUT/base.err" &
one() {
  read -r name dom obj par lr tg seed rest <<<"$1"
  d="$OUT/$name"; mkdir -p "$d"
  s=$(date +%s)
  "$BIN" train --domain "$dom" --objective "$obj" --parameterization "$par" --lr "$lr" \
     --targets "$tg" --seed "$seed" --val-n ${VAL_N:-300} ${EXTRA:-} ${rest:-} --out "$d/expert.safetensors" --json \
     > "$d/train.json" 2> "$d/train.err" || return
  "$BIN" eval --expert "$d/expert.safetensors" --domains $ALL --n 500 --split test --json \
     > "$d/eval.json" 2> "$d/eval.err"
  echo "$(( $(date +%s) - s ))" > "$d/seconds"
}
export -f one; export OUT BIN ALL EXTRA
grep -v '^#' "$JOBS" | grep . | xargs -P "$P" -I{} bash -c 'one "$@"' _ {}
wait
