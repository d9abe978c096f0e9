#!/usr/bin/env bash
# Everything the GPU machine should run, as one command. From the repo root there:
#
#   bash benchmarks/gpu_check.sh [STEP ...]
#
# STEPs (default: all, in this order): install, info, tests, bench (every benchmarks/bench_*.py),
# or one benchmark by name (moe, linear, ...). Logs and results go to $OUT (default ./gpu_out).
# BENCH_ARGS is appended to every benchmark's command line (e.g. BENCH_ARGS="--tokens 1 16").
# STEP_TIMEOUT (seconds, default 1500) bounds each step. A failing step does not stop the rest;
# the exit codes are summarised at the end, and the script exits non-zero if any step failed.
set +e
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package is used from the tree, not installed
export PYTHONUNBUFFERED=1
STEP_TIMEOUT=${STEP_TIMEOUT:-1500}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(install info tests bench)
SUMMARY=()
FAILED=0

run_step() {  # run_step NAME CMD...: tee output to $OUT/NAME.log, record the exit code
  local name=$1; shift
  echo "=== [$name] $* ($(date -u +%H:%M:%S))"
  timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc ($(date -u +%H:%M:%S))"
  SUMMARY+=("$name: exit $rc")
  [ "$rc" -ne 0 ] && FAILED=1
}

info() {
  nvidia-smi
  python3 - <<'PY'
import sys, torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
      "SMs", torch.cuda.get_device_properties(0).multi_processor_count,
      "L2 MiB", torch.cuda.get_device_properties(0).L2_cache_size / 2**20)
for name in ("triton", "transformers", "humming"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, exc)
PY
  command -v nvcc >/dev/null && nvcc --version | tail -2
  return 0
}

install() {
  shopt -s nullglob
  local wheels=(carry/wheels/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in carry/wheels (run benchmarks/fetch_wheels.sh here and carry carry/wheels)"
    return 0
  fi
  python3 -m pip install --no-index --no-deps "${wheels[@]}"
}

export -f info install  # so that `timeout bash -c NAME` can run them

for step in "${STEPS[@]}"; do
  case "$step" in
    install) run_step install bash -c install ;;
    info) run_step info bash -c info ;;
    tests) run_step tests python3 -m pytest -q -m cuda tests/ ;;
    bench)
      for f in benchmarks/bench_*.py; do
        name=$(basename "$f" .py)
        run_step "$name" python3 "$f" --out "$OUT" $BENCH_ARGS
      done ;;
    *)
      f=benchmarks/bench_${step#bench_}.py
      if [ -f "$f" ]; then
        run_step "$(basename "$f" .py)" python3 "$f" --out "$OUT" $BENCH_ARGS
      else
        echo "unknown step '$step' (install, info, tests, bench, or a benchmark name)"
        SUMMARY+=("$step: unknown"); FAILED=1
      fi ;;
  esac
done

echo
echo "=== summary (logs and results in $OUT)"
printf '  %s\n' "${SUMMARY[@]}"
exit $FAILED
