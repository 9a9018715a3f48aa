#!/usr/bin/env bash
# GPU check: bf16 kernel correctness, then the benchmark suites on CUDA; < 8 minutes in all.
# Self-contained: needs an NVIDIA GPU with PyTorch and Triton installed; downloads nothing and
# installs nothing (the package is used from this checkout through PYTHONPATH). Providers whose
# package is missing (peft, say) are skipped and listed as such in the table and the JSON.
#
#   bench/device_check.sh [--dry-run] [OUTDIR]     (DRY_RUN=1 works too; PYTHON=... picks python)
#
# Writes OUTDIR/{kernels.log,serving.log,paths.log,paths.json,bench.json,bench.png,bench.log,device_check.log}
# and prints a short table last (the fused/composed table and the path auto chose are in paths.log). Exit status: 0 when every step passed, else the first failing step's status.
set -uo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run="${DRY_RUN:-0}"
outdir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|-n) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "device_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [ -n "$outdir" ]; then echo "device_check.sh: one OUTDIR only (got '$outdir' and '$1')" >&2; exit 2; fi
       outdir="$1" ;;
  esac
  shift
done
case "$dry_run" in 0|1) ;; *) echo "device_check.sh: DRY_RUN must be 0 or 1, got '$dry_run'" >&2; exit 2 ;; esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
outdir="${outdir:-$repo/bench/results/gpu-$(date -u +%Y-%m-%d)}"
py="${PYTHON:-python}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Budgets (seconds) keep the whole script under 8 minutes: 140 + 60 + 100 + 160 + ~15 for the rest.
kernels_timeout="${KERNELS_TIMEOUT:-140}"
serving_timeout="${SERVING_TIMEOUT:-60}"
paths_timeout="${PATHS_TIMEOUT:-100}"
bench_timeout="${BENCH_TIMEOUT:-160}"
bench_budget=$((bench_timeout - 60))  # the harness stops starting cases after this; the rest is slack

status=0
log=""

run() {  # run STEP_TIMEOUT LOGFILE CMD...: prints it; in dry mode only prints
  local limit="$1" logfile="$2"; shift 2
  echo "+ timeout $limit $*"
  [ "$dry_run" = 1 ] && return 0
  timeout "$limit" "$@" > >(tee "$logfile") 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "device_check.sh: step failed (exit $rc): $*" | tee -a "$log"
    [ $status -eq 0 ] && status=$rc
  fi
  return 0
}

if [ "$dry_run" = 1 ]; then
  echo "dry run: nothing is executed"
else
  mkdir -p "$outdir"
  log="$outdir/device_check.log"
  : > "$log"
fi
echo "repo=$repo outdir=$outdir python=$py PYTHONPATH=$PYTHONPATH"

# 1. Environment (no network needed).
echo "+ $py -c <versions and GPU>"
if [ "$dry_run" = 0 ]; then
  "$py" - <<'PY' 2>&1 | tee -a "$log"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
for name in ("triton", "peft", "matplotlib"):
    spec = importlib.util.find_spec(name)
    print(name, "ok" if spec else "MISSING (its provider/output is skipped)")
PY
fi

# 2. bf16 kernel correctness (written separately; skipped when absent).
if [ -f "$repo/bench/device_check_kernels.py" ]; then
  run "$kernels_timeout" "${outdir}/kernels.log" "$py" "$repo/bench/device_check_kernels.py" "$outdir"
else
  echo "skip: bench/device_check_kernels.py not found (kernel correctness check)" | tee -a "${log:-/dev/null}"
fi
if [ -f "$repo/bench/device_check_serving.py" ]; then
  run "$serving_timeout" "${outdir}/serving.log" "$py" "$repo/bench/device_check_serving.py" "$outdir"
else
  echo "skip: bench/device_check_serving.py not found (multi-adapter kernel check)" | tee -a "${log:-/dev/null}"
fi

# Fused vs composed training path vs the frozen base and PEFT, and the path auto picks here.
if [ -f "$repo/bench/device_check_paths.py" ]; then
  run "$paths_timeout" "${outdir}/paths.log" "$py" "$repo/bench/device_check_paths.py" "$outdir"
else
  echo "skip: bench/device_check_paths.py not found (fused vs composed paths)" | tee -a "${log:-/dev/null}"
fi

# 3. Benchmarks: all suites on CUDA, capped by a time budget.
plot_args=(--plot "$outdir/bench.png")
if [ "$dry_run" = 0 ] && ! "$py" -c "import matplotlib" 2>/dev/null; then
  echo "skip: matplotlib missing, no plot" | tee -a "$log"; plot_args=()
fi
run "$bench_timeout" "${outdir}/bench.log" "$py" -m lora_triton.benchmark.cli --suite all --device cuda \
  --time-budget "$bench_budget" --json "$outdir/bench.json" "${plot_args[@]}"

# 4. The short table, last.
echo "+ $py -m lora_triton.benchmark.cli --from-json $outdir/bench.json --compact"
if [ "$dry_run" = 0 ]; then
  [ -f "$outdir/bench.json" ] || { echo "no bench.json was written" | tee -a "$log"; [ $status -ne 0 ] || status=1; }
  echo "device_check.sh: exit $status; outputs in $outdir" | tee -a "$log"
  if [ -f "$outdir/bench.json" ]; then
    "$py" -m lora_triton.benchmark.cli --from-json "$outdir/bench.json" --compact 2>&1 | tee -a "$log"
  fi
fi
exit $status
