#!/usr/bin/env bash
# The long fuzz run (docs/fuzzing.md): all five targets at once on N cores, each split into
# libFuzzer workers (-jobs/-workers) sized from measured per-core rates so that every target
# reaches EXECS executions within SECONDS (each worker stops at its share, -runs, or at
# SECONDS); then a summary per target and a non-zero exit if
# any target found a crash, a timeout, an OOM or a leak, or a worker ended without its stats.
#
#   fuzz/long-run.sh BUNDLE [N] [SECONDS] [EXECS]
#
# BUNDLE holds bin/<target> and bin-notc/<target> (cargo fuzz build output, see BIN below) and
# corpus/<target>/ (copied to the output directory first; the bundle itself is not written). N defaults to the number of
# cores, SECONDS to 450, EXECS to 10000000. Output (logs, corpora, artifacts) goes to
# $OUT_DIR, default ./long-run-<date>. PLAN_ONLY=1 prints the split and stops. Needs bash,
# awk and coreutils only.
set -euo pipefail

usage() { echo "usage: $0 BUNDLE [N] [SECONDS] [EXECS]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 4 ]] || usage
BUNDLE=$(cd "$1" && pwd)
N=${2:-$(nproc)}
SECONDS_BUDGET=${3:-450}
EXECS=${4:-10000000}
[[ $N =~ ^[0-9]+$ && $SECONDS_BUDGET =~ ^[0-9]+$ && $EXECS =~ ^[0-9]+$ ]] || usage
TARGETS=(model_load tokenizer gguf_parse cli_parse chat_template)

# Executions per second per core of each target, measured on the 2-core development VM (AMD
# EPYC), one fuzzer at a time for 45 s on the bundle's corpora while other engineers built
# (load average 5.5-7.7, so likely below an idle core's rate; docs/fuzzing.md). The split assumes the remote cores are as fast; PLAN_MARGIN only
# sets when the plan warns.
#
# BIN selects the build: bin (default: every target with libFuzzer's compare tracing except
# model_load, the slowest, built with --no-trace-compares) or bin-notc (every target without
# compare tracing: 2-3x the executions, less guided mutation).
BIN=${BIN:-bin}
declare -A RATE
case $BIN in
  bin) RATE=(
    [model_load]=1754
    [tokenizer]=3750
    [gguf_parse]=13070
    [cli_parse]=7963
    [chat_template]=7202
  ) ;;
  bin-notc) RATE=(
    [model_load]=1754
    [tokenizer]=7863
    [gguf_parse]=27391
    [cli_parse]=14913
    [chat_template]=14581
  ) ;;
  *) echo "BIN must be bin or bin-notc" >&2; exit 2 ;;
esac
PLAN_MARGIN=${PLAN_MARGIN:-1.3}

for t in "${TARGETS[@]}"; do
  [[ -x $BUNDLE/$BIN/$t ]] || { echo "missing $BUNDLE/$BIN/$t" >&2; exit 2; }
  [[ -d $BUNDLE/corpus/$t ]] || { echo "missing $BUNDLE/corpus/$t" >&2; exit 2; }
done
(( N >= 1 )) || usage
if (( N < ${#TARGETS[@]} )); then
  echo "note: fewer cores than targets: one worker per target, sharing $N cores" >&2
fi

# Workers per target proportional to the core-seconds it needs (EXECS / rate), at least one
# each, OVERSUB x N in all, so that when a target reaches its runs early its cores go to the
# others (the kernel shares the cores); runs per worker so that the workers together reach EXECS.
OVERSUB=${OVERSUB:-1.5}
plan=$(for t in "${TARGETS[@]}"; do echo "$t ${RATE[$t]}"; done | awk -v n="$N" -v o="$OVERSUB" -v e="$EXECS" '
  { t[NR] = $1; r[NR] = $2; need[NR] = e / $2 }
  END {
    left = int(n * o + 0.5)
    for (i = 1; i <= NR; i++) { w[i] = 1; left-- }
    # Hand out the remaining workers one at a time to the target with the most work per worker.
    while (left > 0) {
      best = 1
      for (i = 2; i <= NR; i++) if (need[i] / w[i] > need[best] / w[best]) best = i
      w[best]++; left--
    }
    for (i = 1; i <= NR; i++) printf "%s %d %d %.0f\n", t[i], w[i], int((e + w[i] - 1) / w[i]), need[i]
  }')

OUT_DIR=${OUT_DIR:-$PWD/long-run-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT_DIR"
echo "long run: $BIN, $N cores, at most $SECONDS_BUDGET s, $EXECS executions per target, output $OUT_DIR"
printf '%-14s %8s %14s %14s\n' target workers runs/worker core-seconds
total=0
while read -r t w runs need; do
  printf '%-14s %8d %14d %14d\n' "$t" "$w" "$runs" "$need"
  total=$((total + need))
done <<< "$plan"
predicted=$((total / N))
echo "predicted wall time at the measured rates: $predicted s ($total core-seconds on $N cores)"
if awk -v s="$predicted" -v m="$PLAN_MARGIN" -v b="$SECONDS_BUDGET" 'BEGIN { exit !(s * m > b) }'; then
  hint=""; [[ $BIN == bin ]] && hint=" (BIN=bin-notc is faster)"
  echo "warning: less than a ${PLAN_MARGIN}x margin within $SECONDS_BUDGET s: targets may stop short of $EXECS$hint" >&2
fi

[[ ${PLAN_ONLY:-0} == 1 ]] && exit 0

start=$(date +%s)
pids=()
while read -r t w runs need; do
  d=$OUT_DIR/$t
  mkdir -p "$d/corpus" "$d/artifacts" "$d/logs"
  cp -r "$BUNDLE/corpus/$t/." "$d/corpus/"
  # -jobs writes each worker's output to fuzz-<i>.log in the working directory.
  (
    cd "$d/logs"
    "$BUNDLE/$BIN/$t" "$d/corpus" -jobs="$w" -workers="$w" -runs="$runs" \
      -max_total_time="$SECONDS_BUDGET" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$d/artifacts/" > "$d/main.log" 2>&1 || true
    echo $(( $(date +%s) - start )) > "$d/wall"
  ) &
  pids+=($!)
done <<< "$plan"
for p in "${pids[@]}"; do wait "$p" || true; done
wall=$(( $(date +%s) - start ))

echo
printf '%-14s %14s %8s %8s %6s %6s %6s %7s\n' target executions workers "no stats" crash timeout oom "wall s"
failed=0
while read -r t w runs need; do
  d=$OUT_DIR/$t
  execs=0; stats=0
  for log in "$d"/logs/fuzz-*.log; do
    [[ -e $log ]] || continue
    v=$(awk '$1 == "stat::number_of_executed_units:" { v = $2 } END { print v }' "$log")
    if [[ -n $v ]]; then execs=$((execs + v)); stats=$((stats + 1)); fi
  done
  count() { find "$d/artifacts" -maxdepth 1 -type f -name "$1" | wc -l; }
  crash=$(( $(count 'crash-*') + $(count 'leak-*') + $(count 'deadly-*') ))
  timeout=$(count 'timeout-*')
  oom=$(count 'oom-*')
  missing=$(( w - stats ))
  status=ok
  if (( crash + timeout + oom + missing > 0 )); then status=FOUND; failed=1; fi
  if (( execs < EXECS )); then status="$status,SHORT"; failed=1; fi
  printf '%-14s %14d %8d %8d %6d %6d %6d %7s  %s\n' "$t" "$execs" "$w" "$missing" "$crash" "$timeout" "$oom" "$(cat "$d/wall")" "$status"
done <<< "$plan"
echo "wall time, all targets: $wall s; artifacts under $OUT_DIR/<target>/artifacts/, worker logs under $OUT_DIR/<target>/logs/"
if (( failed )); then
  echo "long run FAILED: a target found something, a worker died without stats, or a target ran fewer than $EXECS executions" >&2
  exit 1
fi
echo "long run ok: every target ran at least $EXECS executions and found nothing"
