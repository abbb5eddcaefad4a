#!/usr/bin/env bash
# One device call: GPU tests + benchmark suites, logs and results under $OUT.
#   TESTS="tests/test_rope.py ..." SUITES="rope merge" bash scripts/gpu_run.sh
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
rc=0
# each test file gets its own time limit, so one slow file cannot hide the others' results
for t in ${TESTS:-}; do
  echo "== $t" | tee -a "$OUT/tests.log"
  timeout ${TEST_TIMEOUT:-240} python -m pytest "$t" -q -rfE -p no:cacheprovider ${PYTEST_ARGS:-} >"$OUT/t.log" 2>&1
  r=$?; [ $r -ne 0 ] && rc=$r
  grep -E "^(FAILED|ERROR)|passed|failed|error|Timeout|^E " "$OUT/t.log" | head -n 40 | tee -a "$OUT/tests.log"
  [ $r -eq 124 ] && echo "TIMED OUT after ${TEST_TIMEOUT:-240}s: $(tail -c 300 $OUT/t.log)" | tee -a "$OUT/tests.log"
done
rm -f "$OUT/t.log"
if [ -n "${SUITES:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python -m benchmarks ${SUITES} --out "$OUT/bench" >"$OUT/bench_raw.log" 2>&1
  grep -v "it/s\]" "$OUT/bench_raw.log" | grep -v "^|" | tail -n 30
  rm -f "$OUT/bench_raw.log"
  # one file per suite comes back: the Markdown table (JSON/PNG stay unless asked for)
  mkdir -p "$OUT/md"; for f in "$OUT"/bench/*.md; do [ -f "$f" ] && cp "$f" "$OUT/md/"; done
  [ -n "${KEEP_BENCH:-}" ] || rm -rf "$OUT/bench"
fi
exit $rc
