#!/usr/bin/env bash
# GPU test run + the main job's GPU numbers, in one device call of < 10 min:
#   run(command="bash scripts/gpu_verify.sh", timeout_s=590)
# 1. test files on CUDA, spread over pytest-xdist workers (TESTS, default rope / cascade /
#    moe_routing; WORKERS, default 8; TEST_TIMEOUT seconds, default 290);
# 2. the main job at the issue-5 size with --compare (eager vs reduce-overhead, SDPA peer);
#    DEMO_TIMEOUT=1 skips it.
# Logs land in $OUT (gpu.txt, tests.log, demo.log).
set -uo pipefail
export OUT=${OUT:-/tmp/out} PYTHONPATH=. PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
echo "== tests"
timeout ${TEST_TIMEOUT:-290} python -m pytest ${TESTS:-tests/test_rope.py tests/test_cascade.py tests/test_moe_routing.py} \
  -n ${WORKERS:-8} -q -rfE -p no:cacheprovider --durations=10 > "$OUT/tests.log" 2>&1
echo "rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed|^E  " "$OUT/tests.log" | head -60
grep -A12 "slowest" "$OUT/tests.log"
echo "== demo"
timeout ${DEMO_TIMEOUT:-280} python -m torch_flashops --layers 8 --batch 32 --steps 8 --compare 2>&1 | grep -v "decode: " | tee "$OUT/demo.log" | tail -12
