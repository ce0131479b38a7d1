#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR [--full]
#
# On a CUDA machine: the CUDA tests, the rest of the test suite, the benchmark suite (pytest-benchmark JSON) and
# its report, everything written into OUTDIR; a short summary table is printed last. Installs nothing: run it
# after `pip install --no-deps --no-build-isolation -e .` where torch, triton, pytest, pytest-benchmark and
# matplotlib are already installed. The reduced shape set by default, within a time budget of
# GPU_CHECK_BUDGET_S seconds (default 450, under 8 minutes on an H100): each test step gets at most 120 s, the
# benchmarks what is left less 30 s for the report, and a step stopped at its limit keeps what it wrote (pytest
# writes the benchmark JSON of the cases that ran). --full: every shape, no budget (hours: max-autotune
# compiles each shape).
#
# OUTDIR gets: env.json (device, versions, date, commit), nvidia-smi.txt, tests-cuda.log, tests-general.log,
# bench.log, bench.json, report.md, speedup-*.png, report.log, steps.txt. Exit status: 0 if every step passed.
# GPU_CHECK_CPU_DRY_RUN=1 checks this script's plumbing on a CPU machine (tiny CPU benchmarks, no CUDA).
set -uo pipefail  # no -e: a failing step is recorded and the next one still runs

usage() { echo "usage: $0 OUTDIR [--full]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1
shift
SHAPES=reduced
BUDGET=${GPU_CHECK_BUDGET_S:-450}
for arg in "$@"; do
  case $arg in
    --full) SHAPES=full; BUDGET=86400 ;;
    *) usage ;;
  esac
done

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STARTED=$(date +%s)
: > "$OUT/steps.txt"

# limit CAP RESERVE: seconds a step may take: at most CAP, and RESERVE left over for the steps after it.
limit() {
  local left=$(( BUDGET - ($(date +%s) - STARTED) - $2 ))
  [ "$left" -lt 30 ] && left=30
  [ "$left" -gt "$1" ] && left=$1
  echo "$left"
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, output to OUTDIR/NAME.log, status to steps.txt.
step() {
  local name=$1 limit=$2
  shift 2
  local start rc
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "   $name: stopped at its ${limit}s limit" >> "$OUT/$name.log"
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - start ))" \
    "$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/$name.log" | tail -n 1)" >> "$OUT/steps.txt"
  tail -n 2 "$OUT/$name.log"
  return 0
}

BENCH_SELECT=(-m cuda --bench-shapes "$SHAPES")
if [ "${GPU_CHECK_CPU_DRY_RUN:-0}" = 1 ]; then
  BENCH_SELECT=(-m "not cuda" -k "16x10 and not compile" --bench-shapes smoke --bench-seconds 0.1)
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

step tests-cuda "$(limit 120 240)" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
# The CPU-side tests in parallel where pytest-xdist is installed (the GPU image has it).
XDIST=()
"$PY" -c 'import xdist' 2> /dev/null && XDIST=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
step tests-general "$(limit 120 180)" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "not cuda" tests
step bench "$(limit "$BUDGET" 30)" "$PY" -m pytest -q -p no:cacheprovider benchmarks "${BENCH_SELECT[@]}" \
  --benchmark-json "$OUT/bench.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
if [ -s "$OUT/bench.json" ]; then
  step report 60 "$PY" -m benchmarks.report "$OUT/bench.json" -o "$OUT"
else
  echo "report         rc=-   no bench.json: the benchmark step wrote no results" >> "$OUT/steps.txt"
fi

echo
where=$("$PY" -c 'import json, sys; d = json.load(open(sys.argv[1]))
print(d["gpu"], "| torch", d["torch"], "| triton", d["triton"], "| commit", (d["commit"] or "?")[:12])' \
  "$OUT/env.json" 2>/dev/null)
echo "== gpu_check: $where | shapes $SHAPES | $(( $(date +%s) - STARTED ))s | results in $OUT"
cat "$OUT/steps.txt"
echo
if [ -f "$OUT/report.log" ]; then
  grep -v '^wrote ' "$OUT/report.log"
fi
! grep -qE 'rc=([1-9]|-)' "$OUT/steps.txt"
