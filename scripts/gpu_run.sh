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
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest ${TESTS} -q -x -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tail -n 60 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
fi
if [ -n "${SUITES:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python -m benchmarks ${SUITES} --out "$OUT/bench" 2>&1 | grep -v "it/s\]" | tail -n 150 | tee "$OUT/bench.log"
fi
exit $rc
