#!/usr/bin/env bash
# The first-GPU check (issue 30, item 7): one prepared script for a lent NVIDIA H100, where a session has
# 15 minutes of device time with the machine's start; it ends inside 8 minutes. Its steps, in this order,
# each under its own timeout, each running whatever the one before it did:
#   env        nvidia-smi, python / torch / transformers / triton, the GPU; era_compile imported from this tree
#   kernels    the tests marked cuda or gpu: every attention kernel on CUDA tensors against float64
#   attention  benchmarks/attention.py --update-ranking: the CUDA ranking that kernel="auto" reads
#   auto       the auto-kernel tests again, on the ranking just measured
#   selection  benchmarks/selection.py: era::select and era::recycle at batch 8, eight image sizes against one
#   llava-7b   era-compile bench llava-7b-shape: pruned vs unpruned vs ideal at LLaVA-1.5-7B's shapes
# Without CUDA (GPU_CHECK_NO_GPU=1 hides a GPU) each GPU step is skipped once what needs no GPU is checked:
# its command line parses and imports, its tests collect. So where it passes here, only the GPU can fail it.
# Under $OUT (else gpu-check-out/): summary.json, gpu-check.log (every step's output) and the results (the
# records, not the plots one can draw from them), no more than the 8 files the device tool brings back.
# Exit status 1 when a step failed or timed out.
#
#   scripts/gpu-check.sh              # here: the skip mode
#   OUT=$OUT scripts/gpu-check.sh     # on the GPU, through the device tool (docs/benchmarks.md)
#
# PYTHON: the interpreter (else .venv/bin/python, else python3 on PATH: on the GPU image, the one with torch).
# GPU_CHECK_STEPS: some steps only (e.g. "kernels auto", to rerun a failed one in the session's time left).
# GPU_CHECK_BENCH_ARGS: the llava-7b-shape sweep's options. GPU_CHECK_BUDGET_S: all steps' time (430 s).
set -uo pipefail # not -e: a failed step must not stop the ones after it
cd "$(dirname "$0")/.." || exit
ROOT=$PWD

now_ms() {
  local t=${EPOCHREALTIME:-}
  if [ -n "$t" ]; then t=${t/[.,]/}; echo $((t / 1000)); else echo $(($(date +%s%N) / 1000000)); fi
}
START_MS=$(now_ms)

BUDGET_S=${GPU_CHECK_BUDGET_S:-430} # the steps' timeouts together: with 5 s of grace each, inside 8 minutes
# One point, the eager inner compiler: Inductor's compiles of the 32-layer model's nine or so graphs
# (prefill and decode, unpruned and pruned, the ideal bound's text prompts and vision tower) outlast the budget.
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---layers 2 --keep 64 --runs 3 --new-tokens 4 --compiler eager}

if [ -n "${OUT:-}" ]; then
  OUT_DIR=$OUT
else
  OUT_DIR=$ROOT/gpu-check-out # git-ignored; this script's own, so emptied first
  rm -rf "$OUT_DIR"
fi
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu-check.log
: >"$LOG"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3 || command -v python || echo python3)
fi
MODE=gpu
if [ "${GPU_CHECK_NO_GPU:-0}" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" # torch then sees no GPU, as on a machine without one
  MODE="skip (GPU_CHECK_NO_GPU=1)"
fi

# era_compile from this working tree, not installed: setuptools installs passes/ as era_compile.passes, so
# PYTHONPATH=. alone finds no era_compile.passes. A folder of links gives Python the installed layout.
mkdir -p "$WORK/import/era_compile"
for entry in "$ROOT"/era_compile/*; do ln -s "$entry" "$WORK/import/era_compile/"; done
ln -s "$ROOT/passes" "$WORK/import/era_compile/passes"
export PYTHONPATH=$WORK/import${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1 # `python -m` must not put ./ first: its era_compile has no passes
export PYTHONUNBUFFERED=1
export PY ROOT OUT_DIR WORK BENCH_ARGS

# --------------------------------------------------------------------------- helpers the steps share

gpu() { [ "$(cat "$WORK/cuda" 2>/dev/null)" = 1 ]; }
note() { printf '%s' "$*" >"$WORK/note"; } # one line for summary.json beside the step's status
has_module() { "$PY" -c "import $1" 2>/dev/null; }
marked_test_files() { grep -lE 'mark\.(cuda|gpu)\b' tests/*.py | tr '\n' ' '; }

# pytest, or the stand-in where the image has none: run_tests SUBSTRING_OR_EMPTY
run_tests() {
  local files k=() options=(-q -rs -p no:cacheprovider)
  files=$(marked_test_files)
  if ! has_module pytest; then
    echo "pytest is not installed: scripts/tests_without_pytest.py runs the tests"
    note "pytest missing: the stand-in runner ran them"
    # shellcheck disable=SC2086
    "$PY" scripts/tests_without_pytest.py $files --marks cuda gpu ${1:+-k "$1"}
    return
  fi
  [ -n "$1" ] && k=(-k "$1")
  has_module xdist && options+=(-n 4)                # Triton compiles each specialisation once per worker
  has_module pytest_timeout && options+=(--timeout 60) # a hung test fails with its stack, the step goes on
  # shellcheck disable=SC2086
  "$PY" -m pytest $files -m "cuda or gpu" "${k[@]}" "${options[@]}"
}

# without CUDA: the selection collects, and pytest and the stand-in runner list the same tests
check_tests_collect() {
  local files k=() n stand_in pytest_rc=0
  files=$(marked_test_files)
  [ -n "$files" ] || {
    echo "no test file in tests/ has tests marked cuda or gpu"
    return 1
  }
  [ -n "$1" ] && k=(-k "$1")
  # side by side: each is an interpreter importing torch, most of the time this takes
  # shellcheck disable=SC2086
  "$PY" scripts/tests_without_pytest.py $files --marks cuda gpu ${1:+-k "$1"} --collect-only >"$WORK/stand-in.out" 2>&1 &
  stand_in=$!
  if has_module pytest; then
    # shellcheck disable=SC2086
    "$PY" -m pytest $files -m "cuda or gpu" "${k[@]}" --collect-only -q -p no:cacheprovider >"$WORK/pytest.out" 2>&1 ||
      pytest_rc=$?
  fi
  wait "$stand_in" || {
    cat "$WORK/stand-in.out"
    return 1
  }
  grep '::' "$WORK/stand-in.out" | sort >"$WORK/stand-in.txt"
  n=$(wc -l <"$WORK/stand-in.txt")
  if has_module pytest; then
    [ "$pytest_rc" = 0 ] || {
      cat "$WORK/pytest.out"
      return 1
    }
    grep '::' "$WORK/pytest.out" | sort >"$WORK/pytest.txt"
    if ! diff "$WORK/pytest.txt" "$WORK/stand-in.txt"; then
      echo "pytest and scripts/tests_without_pytest.py select different tests (< pytest, > stand-in)"
      return 1
    fi
  fi
  echo "$n tests collected from $files"
  [ "$n" -gt 0 ] || return 1
  note "no CUDA: $n tests collected (pytest and the stand-in runner alike), none run"
  return 77
}

# --------------------------------------------------------------------------- the steps
# Each returns 0 (passed), 77 (skipped: no CUDA, what needs none checked) or anything else (failed).

step_env() {
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi || echo "nvidia-smi failed (exit $?)"
  else
    echo "nvidia-smi: not on PATH"
  fi
  "$PY" - <<'EOF'
import importlib, json, os, platform, sys
from pathlib import Path

import torch

work = Path(os.environ["WORK"])
(work / "cuda").write_text("1" if torch.cuda.is_available() else "0")  # what the later steps read
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(), capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
for name in ("transformers", "triton", "tqdm", "matplotlib", "pytest", "xdist", "flash_attn"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        info[name] = None
import era_compile.passes  # noqa: E402  (after torch: a failure above says more)

root = Path(os.environ["ROOT"]).resolve()
info["era_compile"] = str(Path(era_compile.__file__).resolve())
print(json.dumps(info, indent=2))
(work / "env.json").write_text(json.dumps(info))
problems = [f"{name} is not installed" for name in ("transformers", "tqdm", "matplotlib") if info[name] is None]
if torch.cuda.is_available() and info["triton"] is None:
    problems.append("triton is not installed: the triton kernel cannot run")
for module in (era_compile, era_compile.passes):
    if not Path(module.__file__).resolve().is_relative_to(root):
        problems.append(f"{module.__name__} comes from {module.__file__}, not this working tree")
print("\n".join(problems) or "environment: ok")
sys.exit(1 if problems else 0)
EOF
}

step_kernels() {
  gpu || {
    check_tests_collect ""
    return
  }
  run_tests ""
}

step_attention() {
  if ! gpu; then
    "$PY" benchmarks/attention.py --update-ranking --dry-run || return
    note "no CUDA: its command line parses and imports (--dry-run), nothing timed"
    return 77
  fi
  touch "$WORK/attention-start"
  "$PY" benchmarks/attention.py --update-ranking || return
  find benchmarks/results -maxdepth 1 -name 'attention-*' -newer "$WORK/attention-start" -exec cp {} "$OUT_DIR/" \;
  cp era_compile/ops/kernel_ranking.json "$OUT_DIR/" # commit it with the results: what auto reads on CUDA
}

step_auto() {
  gpu || {
    check_tests_collect auto
    return
  }
  run_tests auto
}

step_selection() {
  if ! gpu; then
    "$PY" benchmarks/selection.py --help >/dev/null || return
    note "no CUDA: its command line parses and imports, nothing timed"
    return 77
  fi
  touch "$WORK/selection-start"
  "$PY" benchmarks/selection.py --runs 5 || return
  find benchmarks/results -maxdepth 1 -name 'selection-*' -newer "$WORK/selection-start" -exec cp {} "$OUT_DIR/" \;
}

step_llava_7b() {
  local out rc
  # shellcheck disable=SC2086
  gpu && {
    # the record alone comes back (its plots are drawn from it: `bench.plot`), within the 8 files
    "$PY" -m era_compile.cli bench llava-7b-shape $BENCH_ARGS --out "$WORK/bench" || return
    cp "$WORK"/bench/*.json "$OUT_DIR/"
    return
  }
  # Without CUDA the same command line must parse and reach the model's own CUDA check (exit 2).
  # shellcheck disable=SC2086
  out=$("$PY" -m era_compile.cli bench llava-7b-shape $BENCH_ARGS --out "$WORK/bench" 2>&1)
  rc=$?
  echo "$out"
  if [ "$rc" = 2 ] && grep -q "needs a CUDA device" <<<"$out"; then
    note "no CUDA: its command line parses and stops at the model's CUDA check"
    return 77
  fi
  echo "expected the bench to stop at llava-7b-shape's CUDA check (exit 2), got exit $rc"
  return 1
}

export -f gpu note has_module marked_test_files run_tests check_tests_collect
export -f step_env step_kernels step_attention step_auto step_selection step_llava_7b

# --------------------------------------------------------------------------- running and recording them

STEPS=() STATUSES=() TAKEN=() LIMITS=() EXITS=() NOTES=()

json_text() { # a JSON string's inside: backslashes, quotes and control characters made safe
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '%s' "${s//[$'\t\r\n']/ }"
}

write_summary() {
  local i sep="" ok=true elapsed_ms=$(($(now_ms) - START_MS))
  for i in "${!STATUSES[@]}"; do
    case ${STATUSES[$i]} in passed | skipped) ;; *) ok=false ;; esac
  done
  {
    printf '{\n  "mode": "%s",\n  "python": "%s",\n' "$(json_text "$MODE")" "$(json_text "$PY")"
    printf '  "budget_s": %s,\n  "elapsed_s": %s,\n  "ok": %s,\n  "steps": [' \
      "$BUDGET_S" "$((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100))" "$ok"
    for i in "${!STEPS[@]}"; do
      printf '%s\n    {"step": "%s", "status": "%s", "seconds": %s, "timeout_s": %s, "exit": %s, "note": "%s"}' \
        "$sep" "${STEPS[$i]}" "${STATUSES[$i]}" "${TAKEN[$i]}" "${LIMITS[$i]}" "${EXITS[$i]}" \
        "$(json_text "${NOTES[$i]}")"
      sep=,
    done
    printf '\n  ],\n  "environment": %s\n}\n' "$(cat "$WORK/env.json" 2>/dev/null || echo null)"
  } >"$WORK/summary.json" && cp "$WORK/summary.json" "$OUT_DIR/summary.json" # after every step: a kill keeps it
}

run_step() { # run_step NAME CAP_S: step_NAME under min(CAP_S, what is left of the budget)
  local name=$1 cap=$2 left limit begin rc status taken
  # GPU_CHECK_STEPS="kernels auto": those alone (env always runs: the others read what it found)
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [ "$name" != env ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    return
  fi
  left=$((BUDGET_S - ($(now_ms) - START_MS) / 1000))
  limit=$((cap < left ? cap : left))
  [ "$MODE" = gpu ] || limit=300 # no lent machine's clock runs: a slow CPU must not time the checks out
  printf '\n==== %s (timeout %s s) ====\n' "$name" "$limit" | tee -a "$LOG"
  rm -f "$WORK/note"
  begin=$(now_ms)
  if [ "$limit" -lt 10 ]; then
    echo "no time left in the ${BUDGET_S} s budget" | tee -a "$LOG"
    rc=124
  else
    timeout -k 5 "$limit" bash -c "step_${name//-/_}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  fi
  taken=$(($(now_ms) - begin))
  case $rc in
    0) status=passed ;;
    77) status=skipped ;;
    124 | 137) status="timed out" ;;
    *) status=failed ;;
  esac
  STEPS+=("$name") STATUSES+=("$status") LIMITS+=("$limit") EXITS+=("$rc")
  TAKEN+=("$((taken / 1000)).$((taken % 1000 / 100))")
  NOTES+=("$(cat "$WORK/note" 2>/dev/null)")
  write_summary
}

echo "gpu-check: $PY; results under $OUT_DIR; steps' budget ${BUDGET_S} s" | tee -a "$LOG"
run_step env 50
[ -s "$WORK/cuda" ] || "$PY" -c 'import torch; print(int(torch.cuda.is_available()))' >"$WORK/cuda" # env died early
gpu || [ "$MODE" != gpu ] || MODE="skip (no CUDA)"
run_step kernels 110
run_step attention 80
run_step auto 40
run_step selection 40
run_step llava-7b "$BUDGET_S" # the last step: whatever the budget has left

{
  device=$(sed -n 's/.*"device": "\([^"]*\)".*/\1/p' "$WORK/env.json" 2>/dev/null)
  printf '\ngpu-check, %s%s\n' "$MODE" "${device:+ on $device}"
  printf '%-10s %-10s %8s %8s  %s\n' step status seconds timeout note
  for i in "${!STEPS[@]}"; do
    printf '%-10s %-10s %8s %8s  %s\n' "${STEPS[$i]}" "${STATUSES[$i]}" "${TAKEN[$i]}" "${LIMITS[$i]}" "${NOTES[$i]}"
  done
  files=$(find "$OUT_DIR" -type f | wc -l)
  printf '%s files under %s (the device tool brings back 8)%s\n' "$files" "$OUT_DIR" \
    "$([ "$files" -le 8 ] || echo ': only 8 of them come back')"
} | tee -a "$LOG"
write_summary # the log's last lines are in; the summary's elapsed time counts them
grep -q '"ok": true' "$OUT_DIR/summary.json"
