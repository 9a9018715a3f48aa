#!/usr/bin/env bash
# GPU check of every kernel family: bf16 correctness against the reference, then the timings each issue's
# goals need; budgeted to finish in under 8 minutes on a cold H200 (compiles included).
# Self-contained: needs an NVIDIA GPU with PyTorch and Triton; downloads and installs nothing (the package
# is used from this checkout through PYTHONPATH). Steps whose optional package is missing skip that part.
#
#   bench/device_check.sh [--dry-run] [OUTDIR]     (DRY_RUN=1 works too; PYTHON=... picks python)
#
# Steps: env, preflight, kernels, serving, paths, dora, nf4, kinds, bench (docs/device_check.md: what each covers).
# Each writes OUTDIR/<step>.log (and its JSON); OUTDIR/device_check.json and the table printed last give
# every step's status, wall time and budget. --dry-run prints the steps, budgets and preflight only.
# Exit: 0 when every step passed; else the first failing step's status (3: a script or option is
# missing, 4: only budget skips). Env: <STEP>_TIMEOUT=s overrides a budget, DEVICE_CHECK_GUARD=s (450)
# stops starting steps, DEVICE_CHECK_JOBS (4) kernel-check workers, LORA_TRITON_AUTOTUNE=1 autotunes.
set -uo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

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
# Check mode: one launch config per kernel (autotuning would multiply every compile by the config count),
# path decisions measured afresh into OUTDIR rather than read from a cache in $HOME.
export LORA_TRITON_AUTOTUNE="${LORA_TRITON_AUTOTUNE:-0}"
export LORA_TRITON_CACHE_DIR="$outdir/lora_cache"
unset TRITON_INTERPRET
guard="${DEVICE_CHECK_GUARD:-450}"
jobs="${DEVICE_CHECK_JOBS:-4}"

# name | budget s | what it checks (the goal it measures)
STEPS=(env preflight kernels serving paths dora nf4 kinds bench)
declare -A BUDGET=([env]=15 [preflight]=15 [kernels]=65 [serving]=45 [paths]=55 [dora]=70 [nf4]=50 [kinds]=40
                  [bench]=90)
declare -A WHAT=(
  [env]="versions, GPU, optional packages"
  [preflight]="every step's script exists and takes the options passed"
  [kernels]="LoRA fused (TMA + pointer), composed, grouped: bf16/fp16 vs fp32 reference"
  [serving]="multi-adapter kernels bf16, CUDA graph decode, decode/distinct-adapter timings"
  [paths]="#12 fused vs composed vs cuBLAS base vs PEFT, 8 shapes, auto choice"
  [dora]="#10 DoRA kernels bf16, DoRA/LoRA fwd+bwd <= 1.15x"
  [nf4]="#11 NF4 GEMMs + decode GEMV bf16, HBM fraction, vs cuBLAS"
  [kinds]="#13 LoHa/LoKr/Conv2d/Embedding fwd+bwd vs PEFT on CUDA"
  [bench]="harness --suite all (train + DoRA + serve) vs PEFT/base, plot"
)
for s in "${STEPS[@]}"; do
  var="${s^^}_TIMEOUT"
  BUDGET[$s]="${!var:-${BUDGET[$s]}}"
done
ELASTIC=bench  # runs with whatever the guard leaves (>= 60 s), its harness stops starting cases in time
ELASTIC_MIN=60

# step_spec NAME: sets target (file), help_cmd (how to ask for --help), need (options it must take), cmd.
step_spec() {
  local b="${BUDGET[$1]}"
  target=""; help_cmd=(); need=(); cmd=()
  case "$1" in
    env) target="$repo/bench/_device_common.py"; cmd=("$py" "$target" env) ;;
    preflight) ;;
    kernels|serving|paths)
      target="$repo/bench/device_check_$1.py"; help_cmd=("$py" "$target" --help); need=(--out --budget)
      cmd=("$py" "$target" --out "$outdir" --budget $((b > 10 ? b - 5 : b)))  # 5 s to write the JSON
      case "$1" in
        kernels) need+=(--quick --jobs); cmd+=(--quick --jobs "$jobs") ;;
        serving) need+=(--quick); cmd+=(--quick) ;;
      esac ;;
    dora|nf4)
      target="$repo/bench/device_check_$1.py"; help_cmd=("$py" "$target" --help); need=(--quick --out --budget)
      cmd=("$py" "$target" --quick --out "$outdir" --budget $((b > 10 ? b - 5 : b))) ;;
    kinds)
      target="$repo/lora_triton/benchmark/kinds_bench.py"
      help_cmd=("$py" -m lora_triton.benchmark.kinds_bench --help); need=(--device --quick --json)
      cmd=("$py" -m lora_triton.benchmark.kinds_bench --device cuda --quick --json "$outdir/kinds.json") ;;
    bench)
      target="$repo/lora_triton/benchmark/cli.py"
      help_cmd=("$py" -m lora_triton.benchmark.cli --help); need=(--suite --device --time-budget --json --plot)
      cmd=("$py" -m lora_triton.benchmark.cli --suite all --device cuda --time-budget BUDGET_LEFT
           --json "$outdir/bench.json" --plot "$outdir/bench.png") ;;
  esac
}

declare -A STATUS=() WALL=() RC=() PROBLEM=()
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
t_start="$(now)"
elapsed() { awk -v a="$t_start" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }
note() { echo "$*"; if [ "$dry_run" = 0 ]; then echo "$*" >> "$outdir/device_check.log"; fi; }

# Preflight: a step whose script is gone, whose --help fails, or which lacks an option this script passes
# fails here, clearly, instead of passing silently or dying with a usage line minutes later. The --help
# calls run side by side (two of them import torch).
preflight() {
  local s opt help rc tmp
  tmp="$(mktemp -d)"
  for s in "${STEPS[@]}"; do
    step_spec "$s"
    [ -n "$target" ] && [ -f "$target" ] && [ ${#help_cmd[@]} -gt 0 ] || continue
    (cd "$repo" && timeout 60 "${help_cmd[@]}" > "$tmp/$s.help" 2>&1; echo $? > "$tmp/$s.rc") &
  done
  wait
  for s in "${STEPS[@]}"; do
    step_spec "$s"
    [ -n "$target" ] || continue
    if [ ! -f "$target" ]; then PROBLEM[$s]="script missing: ${target#"$repo"/}"; continue; fi
    [ ${#help_cmd[@]} -gt 0 ] || continue
    help="$(cat "$tmp/$s.help")"; rc="$(cat "$tmp/$s.rc")"
    if [ "$rc" -ne 0 ]; then
      PROBLEM[$s]="'${help_cmd[*]:1}' failed (exit $rc): $(tail -n 1 <<< "$help" | cut -c1-160)"; continue
    fi
    for opt in "${need[@]}"; do
      if ! grep -qE -- "(^|[^-[:alnum:]])${opt}([^-[:alnum:]]|$)" <<< "$help"; then
        PROBLEM[$s]="${PROBLEM[$s]:+${PROBLEM[$s]}; }${target#"$repo"/} has no $opt option"
      fi
    done
  done
  rm -rf "$tmp"
}

run_step() {  # run_step NAME: preflight verdict, budget guard, then the command under timeout
  local s="$1" limit="${BUDGET[$1]}" left t0 rc logfile="$outdir/$1.log"
  step_spec "$s"
  if [ -n "${PROBLEM[$s]:-}" ]; then
    STATUS[$s]="MISSING"; RC[$s]=3; WALL[$s]=0.0
    note "[$s] FAIL before starting: ${PROBLEM[$s]}"; return
  fi
  left=$((guard - $(elapsed)))
  if [ "$limit" -gt "$left" ]; then
    if [ "$s" = "$ELASTIC" ] && [ "$left" -ge "$ELASTIC_MIN" ]; then limit="$left"
    else
      STATUS[$s]="SKIPPED"; RC[$s]=4; WALL[$s]=0.0
      note "[$s] skipped: ${BUDGET[$s]} s budget, $left s left before the ${guard} s guard"; return
    fi
  fi
  cmd=("${cmd[@]/BUDGET_LEFT/$((limit - 40))}")  # the harness stops starting cases 40 s early, then reports
  note "[$s] budget ${limit}s: ${cmd[*]}"
  t0="$(now)"
  (cd "$repo" && timeout -k 5 "$limit" "${cmd[@]}") > >(tee "$logfile") 2>&1
  rc=$?
  WALL[$s]="$(secs "$t0" "$(now)")"; RC[$s]=$rc
  case $rc in
    0) STATUS[$s]="ok" ;;
    124|137) STATUS[$s]="TIMEOUT"; note "[$s] killed at its ${limit} s budget (see $logfile)" ;;
    *) STATUS[$s]="FAIL"; note "[$s] failed (exit $rc, see $logfile)" ;;
  esac
}

if [ "$dry_run" = 1 ]; then
  echo "dry run: nothing is executed"
else
  mkdir -p "$outdir"
  : > "$outdir/device_check.log"
fi
rev="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$rev" != unknown ] && ! git -C "$repo" diff --quiet HEAD 2>/dev/null; then rev="$rev+dirty"; fi
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
note "$started repo=$repo ($rev) outdir=$outdir python=$py PYTHONPATH=$PYTHONPATH" \
  "LORA_TRITON_AUTOTUNE=$LORA_TRITON_AUTOTUNE guard=${guard}s"

t0="$(now)"
preflight
WALL[preflight]="$(secs "$t0" "$(now)")"
n_problems=${#PROBLEM[@]}
STATUS[preflight]=$([ "$n_problems" -eq 0 ] && echo ok || echo "FAIL")
RC[preflight]=$([ "$n_problems" -eq 0 ] && echo 0 || echo 3)
if [ "$dry_run" = 0 ]; then
  for s in "${STEPS[@]}"; do echo "$s: ${PROBLEM[$s]:-ready}"; done > "$outdir/preflight.log"
fi

if [ "$dry_run" = 1 ]; then
  total=0
  printf '%-10s %6s  %-8s %s\n' step budget status checks
  for s in "${STEPS[@]}"; do
    step_spec "$s"
    total=$((total + BUDGET[$s]))
    printf '%-10s %5ss  %-8s %s\n' "$s" "${BUDGET[$s]}" "$([ -n "${PROBLEM[$s]:-}" ] && echo MISSING || echo ready)" \
      "${WHAT[$s]}"
    cmd=("${cmd[@]/BUDGET_LEFT/$((BUDGET[$s] - 40))}")
    [ ${#cmd[@]} -eq 0 ] || echo "           + timeout ${BUDGET[$s]} ${cmd[*]}"
    [ -z "${PROBLEM[$s]:-}" ] || echo "           ! would fail before starting: ${PROBLEM[$s]}"
  done
  echo "total budget ${total}s (guard ${guard}s, limit 480s); preflight problems: $n_problems"
  [ "$n_problems" -eq 0 ] || exit 3
  exit 0
fi

for s in "${STEPS[@]}"; do
  [ "$s" = preflight ] || run_step "$s"
done

if [ -f "$outdir/bench.json" ]; then
  echo "+ $py -m lora_triton.benchmark.cli --from-json $outdir/bench.json --compact"
  (cd "$repo" && timeout 30 "$py" -m lora_triton.benchmark.cli --from-json "$outdir/bench.json" --compact) 2>&1 \
    | tee -a "$outdir/device_check.log"
fi

status=0; skipped=0
for s in "${STEPS[@]}"; do
  case "${STATUS[$s]}" in
    ok) ;;
    SKIPPED) skipped=$((skipped + 1)) ;;
    *) [ "$status" -ne 0 ] || status="${RC[$s]}" ;;
  esac
done
[ "$status" -ne 0 ] || [ $skipped -eq 0 ] || status=4
{
  printf '{"started": "%s", "revision": "%s", "outdir": "%s", "guard_s": %s, "total_s": %s, "exit": %s, "steps": [' \
    "$started" "$rev" "$outdir" "$guard" "$(elapsed)" "$status"
  sep=""
  for s in "${STEPS[@]}"; do
    printf '%s\n {"step": "%s", "status": "%s", "exit": %s, "wall_s": %s, "budget_s": %s, "problem": "%s"}' \
      "$sep" "$s" "${STATUS[$s]}" "${RC[$s]}" "${WALL[$s]}" "${BUDGET[$s]}" "$(tr '"\\' "''" <<< "${PROBLEM[$s]:-}")"
    sep=","
  done
  printf '\n]}\n'
} > "$outdir/device_check.json"
{
  echo
  printf '%-10s %-8s %7s %7s  %s\n' step status wall budget "checks (log: OUTDIR/<step>.log)"
  for s in "${STEPS[@]}"; do
    printf '%-10s %-8s %6ss %6ss  %s\n' "$s" "${STATUS[$s]}" "${WALL[$s]}" "${BUDGET[$s]}" \
      "${PROBLEM[$s]:-${WHAT[$s]}}"
  done
  echo "device_check.sh: exit $status after $(elapsed) s; outputs in $outdir"
} | tee -a "$outdir/device_check.log"
exit "$status"
