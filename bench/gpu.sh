#!/usr/bin/env bash
# Everything hrkernels runs on the lent GPU, in one call (see DESIGN.md, "Using the lent GPU"):
#   bench/gpu.sh [tests] [ops] [unet] [e2e] ...      (default: tests ops)
# installs the carried wheels (.whl/: diffusers and what the GPU image lacks), prints the
# environment, runs the test suite on the GPU, the op benchmarks, and the end-to-end benchmarks,
# writes full results under $OUT (default: bench/results/gpu-latest) and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-latest}"
mkdir -p "$OUT"
if [ $# -eq 0 ]; then set -- tests ops; fi

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
status=0

python3 -m hrkernels info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv \
  | tee -a "$OUT/info.txt"

for stage in "$@"; do
  echo "=== $stage ==="
  case "$stage" in
    tests)
      python3 -m pytest ${TESTS:-tests} -q -p no:cacheprovider --durations=15 2>&1 \
        | tee "$OUT/tests.log"
      status=$((status | ${PIPESTATUS[0]}))
      ;;
    ops)
      # Memory-bound families against eager and compiled references; the convolutions against the
      # unfused eager chain (their targets), which keeps the call inside the device's time limit.
      python3 -m hrkernels bench --out-dir "$OUT" --family views blur stats \
        ${FILTER:+--filter $FILTER} 2>&1 | tee "$OUT/ops.log"
      status=$((status | ${PIPESTATUS[0]}))
      python3 -m hrkernels bench --out-dir "$OUT" --family conv --name conv \
        --providers torch hrkernels ${FILTER:+--filter $FILTER} 2>&1 | tee -a "$OUT/ops.log"
      status=$((status | ${PIPESTATUS[0]}))
      ;;
    *)
      # Any other stage is a module under hrkernels/bench with a main(out_dir) function.
      python3 -c "import sys, hrkernels.bench.$stage as m; sys.exit(m.main('$OUT'))" 2>&1 \
        | tee "$OUT/$stage.log"
      status=$((status | ${PIPESTATUS[0]}))
      ;;
  esac
done

echo "=== summary ==="
for f in "$OUT"/*.md; do [ -f "$f" ] && cat "$f"; done
exit $status
