#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR [--full]
#
# On a CUDA machine: the CUDA tests, the dispatch-table tuner, the benchmark suite (with the tuned table), the cold
# start, the report, the host-time benchmark and the rest of the test suite, everything written into OUTDIR; a compact
# host-time table and the table of both clocks (wall / host / GPU time per shape, eager vs fused) are printed last. Installs nothing: run it after
# `pip install --no-deps --no-build-isolation -e .` where torch, triton, pytest, pytest-benchmark and matplotlib
# are already installed.
#
# Time: one budget of GPU_CHECK_BUDGET_S seconds (default 420; the lender allows 8 minutes for the whole script)
# shared by the steps in order (host-time takes 45 s of the benchmark step's share); each step gets at most its cap and leaves the reserve of the steps after it
# (a step past its limit gets SIGINT, then SIGKILL 10 s later). The benchmark step runs the reduced shape set in
# priority order (cases.priority: the measurement file's shapes, eager vs fused, first) and appends a JSON line
# per finished case to bench.jsonl, so when the budget stops it, everything it measured is kept and reported
# (steps.txt says `rc=stop`; that is not a failure). --full: every shape, no budget (hours).
#
# GPU_CHECK_SKIP="tests-cuda tests-general ...": steps to leave out (e.g. to give the benchmarks the whole budget).
# GPU_CHECK_CPU_DRY_RUN=1: checks this script's plumbing on a CPU machine (tiny CPU benchmarks, a CPU cold start).
# FUSED_RESIDUAL_COMMIT: the commit of this tree, where it is not its own git checkout (env.json records it).
#
# OUTDIR gets: env.json (device, versions, date, commit), nvidia-smi.txt, tests-cuda.log, tests-general.log,
# tune.log, dispatch_table.json, bench.log, bench.jsonl (a line per finished case), raw/pytest-benchmark.json
# (pytest-benchmark's full dump, every round's time, only if the step finished; git ignores raw/ under
# benchmarks/results), cold-start.log, cold_start.jsonl, report.md, speedup-*.png, report.log, host-time.log,
# host_time.jsonl, steps.txt. Each step starts with a progress line: "[k of 7] name, elapsed, the most the rest
# may take". Exit status: 0 if every step that ran passed.
set -uo pipefail  # no -e: a failing step is recorded and the next one still runs

usage() { echo "usage: $0 OUTDIR [--full]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
shift
SHAPES=reduced
BUDGET=${GPU_CHECK_BUDGET_S:-420}
for arg in "$@"; do
  case $arg in
    --full) SHAPES=full; BUDGET=86400 ;;
    *) usage ;;
  esac
done
# Order and caps (seconds), most important first: tests-cuda 110 (every kernel on the GPU), tune 130 (the
# dispatch table, bf16 first), bench at least 120 (the 32 pairs of the measured shapes first), cold-start 50,
# report 25, host-time 45 (CPU only: the host side of a cached call with the driver stubbed, on this host's CPU,
# beside the real clocks above), then tests-general with whatever is left (CI runs those tests on every commit;
# here they add CUDA as the default device).
TESTS_CUDA_CAP=110
TUNE_CAP=130
COLD_CAP=50
REPORT_CAP=25
HOST_CAP=45
BENCH_MIN=120
KILL_AFTER=10

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)
: > "$OUT/steps.txt"
rm -f "$OUT/bench.jsonl" "$OUT/raw/pytest-benchmark.json" "$OUT/cold_start.jsonl"  # results of this run only
mkdir -p "$OUT/raw"
STEPS=7  # tests-cuda, tune, bench, cold-start, report, host-time, tests-general
STEP_NO=0

# announce NAME: the progress line of the next step, with what is left of the budget.
announce() {
  STEP_NO=$(( STEP_NO + 1 ))
  local elapsed=$(( $(date +%s) - STARTED ))
  local left=$(( BUDGET - elapsed ))
  [ "$left" -lt 0 ] && left=0
  echo "== [$STEP_NO of $STEPS] $1: ${elapsed}s elapsed, ETA at most ${left}s (the budget)"
}

# limit CAP RESERVE: seconds a step may take: at most CAP, and RESERVE left over for the steps after it.
limit() {
  local left=$(( BUDGET - ($(date +%s) - STARTED) - $2 ))
  [ "$left" -lt 30 ] && left=30
  [ "$left" -gt "$1" ] && left=$1
  echo "$left"
}

wanted() { [[ " ${GPU_CHECK_SKIP:-} " != *" $1 "* ]]; }

skipped() { announce "$1"; printf '%-14s skipped   %s\n' "$1" "$2" | tee -a "$OUT/steps.txt"; }

# step NAME LIMIT COMMAND...: runs COMMAND with a time limit, output to OUTDIR/NAME.log, status to steps.txt.
# STOP_OK=1 step ...: being stopped at the limit is expected (the step keeps what it finished): rc=stop.
step() {
  local name=$1 limit=$2
  shift 2
  local start rc
  announce "$name"
  start=$(date +%s)
  echo "   $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   $name: stopped at its ${limit}s limit" >> "$OUT/$name.log"
    [ "${STOP_OK:-0}" = 1 ] && rc=stop
  fi
  printf '%-14s rc=%-4s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" \
    "$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran|stopped at its' "$OUT/$name.log" \
      | tail -n 1)" \
    >> "$OUT/steps.txt"
  tail -n 2 "$OUT/$name.log"
  return 0
}

DRY=${GPU_CHECK_CPU_DRY_RUN:-0}
BENCH_SELECT=(-m cuda --bench-shapes "$SHAPES")
COLD_ARGS=()
HOST_ARGS=(--quick)
if [ "$DRY" = 1 ]; then
  BENCH_SELECT=(-m "not cuda" -k "16x10 and not compile" --bench-shapes smoke --bench-seconds 0.1)
  COLD_ARGS=(--device cpu)
  HOST_ARGS=(--quick --widths 64 --routes whole_block --rounds 2 --inner 3)
elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" >&2
  exit 1
fi
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("triton", "pytest", "pytest_benchmark", "matplotlib", "fused_residual")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "gpu_check: missing Python packages: $missing (this script installs nothing)" >&2
  exit 1
fi

"$PY" -m benchmarks.env_info "$OUT/env.json" > /dev/null
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

AFTER_BENCH=$(( COLD_CAP + REPORT_CAP + HOST_CAP + 2 * KILL_AFTER ))  # what the benchmark step leaves
if wanted tests-cuda; then
  step tests-cuda "$(limit "$TESTS_CUDA_CAP" $(( BENCH_MIN + AFTER_BENCH )))" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
else
  skipped tests-cuda "GPU_CHECK_SKIP"
fi

# ---- The dispatch-table tuner (`python -m fused_residual.tune`). ---------------------------------------------
# Before the benchmarks, which then run with its table (FUSED_RESIDUAL_DISPATCH_TABLE): the fused block as auto
# dispatches it on this machine. It stops itself within its limit and keeps every entry it measured.
if ! wanted tune; then
  skipped tune "GPU_CHECK_SKIP"
elif [ "$DRY" = 1 ]; then
  skipped tune "CPU dry run"
else
  tune_limit=$(limit "$TUNE_CAP" $(( BENCH_MIN + AFTER_BENCH )))
  step tune "$tune_limit" "$PY" -m fused_residual.tune --budget-s "$(( tune_limit - 25 ))" \
    --out "$OUT/dispatch_table.json"
  [ -s "$OUT/dispatch_table.json" ] && export FUSED_RESIDUAL_DISPATCH_TABLE="$OUT/dispatch_table.json"
fi

if wanted bench; then
  STOP_OK=1 step bench "$(limit "$BUDGET" "$AFTER_BENCH")" "$PY" -m pytest -q -p no:cacheprovider benchmarks \
    "${BENCH_SELECT[@]}" --bench-jsonl "$OUT/bench.jsonl" --benchmark-json "$OUT/raw/pytest-benchmark.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name
else
  skipped bench "GPU_CHECK_SKIP"
fi

if wanted cold-start; then
  cold_limit=$(limit "$COLD_CAP" $(( REPORT_CAP + HOST_CAP + 2 * KILL_AFTER )))
  # Three processes (empty, then warm Triton cache, then warm with the autotuners' choices on disk too), each
  # stopped after half the step's limit (the warm ones compile nothing; a stopped step keeps what finished).
  step cold-start "$cold_limit" "$PY" -m benchmarks.cold_start "${COLD_ARGS[@]}" \
    --timeout "$(( (cold_limit - 10) / 2 ))" --out "$OUT/cold_start.jsonl"
else
  skipped cold-start "GPU_CHECK_SKIP"
fi

RESULTS=()
for name in bench.jsonl cold_start.jsonl; do
  [ -s "$OUT/$name" ] && RESULTS+=("$OUT/$name")
done
if [ ! -s "$OUT/bench.jsonl" ] && [ -s "$OUT/raw/pytest-benchmark.json" ]; then
  RESULTS+=("$OUT/raw/pytest-benchmark.json")
fi
if [ ${#RESULTS[@]} -gt 0 ]; then
  step report "$(limit "$REPORT_CAP" $(( HOST_CAP + KILL_AFTER )))" "$PY" -m benchmarks.report "${RESULTS[@]}" -o "$OUT"
else
  announce report
  echo "report         rc=-    no results: neither the benchmark nor the cold-start step wrote any" >> "$OUT/steps.txt"
fi

# ---- Host time per cached call with the GPU stubbed (benchmarks/host_time.py), on this host's CPU. -------------
# The same measurement as on a CPU-only machine, so the stub's figures can be set beside the real host clock of the
# benchmark step. A line per finished case goes to host_time.jsonl; a stopped run prints what it measured.
if wanted host-time; then
  rm -f "$OUT/host_time.jsonl"
  STOP_OK=1 step host-time "$(limit "$HOST_CAP" 0)" env -u TRITON_INTERPRET "$PY" -m benchmarks.host_time \
    "${HOST_ARGS[@]}" --jsonl "$OUT/host_time.jsonl"
else
  skipped host-time "GPU_CHECK_SKIP"
fi

if wanted tests-general; then
  # The CPU-side tests (CUDA as their default device here) in parallel where pytest-xdist is installed.
  XDIST=()
  "$PY" -c 'import xdist' 2> /dev/null && XDIST=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
  if [ $(( BUDGET - ($(date +%s) - STARTED) )) -ge 60 ]; then
    STOP_OK=1 step tests-general "$(limit 600 0)" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "not cuda" \
      tests
  else
    skipped tests-general "under 60 s of the budget left"
  fi
else
  skipped tests-general "GPU_CHECK_SKIP"
fi

echo
where=$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
print(d["gpu"] or d["cpu"], "| torch", d["torch"], "| triton", d["triton"], "| commit", (d["commit"] or "?")[:12])' \
  "$OUT/env.json" 2>/dev/null)
echo "== gpu_check: $where | shapes $SHAPES | $(( $(date +%s) - STARTED ))s | results in $OUT"
cat "$OUT/steps.txt"
echo
if [ -s "$OUT/host_time.jsonl" ]; then
  echo "== host time per cached call, GPU stubbed, on this host's CPU (benchmarks/host_time.py)"
  sed -n '/^case /,$p' "$OUT/host-time.log"
  echo
fi
if [ -f "$OUT/report.log" ]; then
  grep -v '^wrote ' "$OUT/report.log"  # ends with the compact table of both clocks
fi
! grep -qE 'rc=([1-9]|-)' "$OUT/steps.txt"
