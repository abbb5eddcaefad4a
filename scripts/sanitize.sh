#!/usr/bin/env bash
# compute-sanitizer over the kernels' GPU tests, in one device call:
#   run(command="bash scripts/sanitize.sh", timeout_s=590)
# Each step runs pytest (HYPOTHESIS_PROFILE=ci: small random shapes, few examples) under one
# sanitizer tool, with PyTorch's caching allocator off, so every tensor is its own allocation and
# an access past a tensor's end is reported instead of landing in a neighbour's block.
# CUDA-graph, reduce-overhead, compile and export tests are deselected: graph capture needs the
# caching allocator, and compiled/exported graphs launch the same kernels the eager tests do; so
# are the tests that time plan() against a busy GPU and forbid synchronising calls.
#   STEPS   "tool:files:-k expression" triples separated by ';' (default below); files "check"
#           runs `python -m torch_flashops check --device cuda` (every family's self-check) instead
#   STEP_TIMEOUT seconds per step (default 150); WORKERS pytest-xdist workers (default 8)
# Per-process sanitizer logs land in $OUT/sanitizer/<step>/; the summary in $OUT/sanitize.txt.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/sanitizer"
SUM="$OUT/sanitize.txt"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$CS" ]; then echo "compute-sanitizer not found" | tee "$SUM"; exit 2; fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$CS" --version | tail -n 1
  date -u
} | tee "$SUM"
# (the two host-timing tests need the caching allocators: without them a free or an allocation can wait
# for the GPU, which is not what they test)
NOT="not graph and not capture and not overhead and not compile and not export and not stream and not does_not_wait and not do_not_sync"
BOUNDS="bounds or outside or out_of_range or bad or garbage or guard"
DEFAULT_STEPS="memcheck:tests/test_page.py tests/test_attention.py tests/test_moe.py tests/test_moe_routing.py tests/test_cascade.py tests/test_rope.py:($BOUNDS) and ($NOT)"
DEFAULT_STEPS+=";memcheck:tests/test_page.py tests/test_rope.py tests/test_cascade.py:$NOT"
DEFAULT_STEPS+=";memcheck:tests/test_attention.py tests/test_attention_api.py:$NOT"
DEFAULT_STEPS+=";memcheck:tests/test_moe_routing.py tests/test_moe.py:$NOT"
IFS=';' read -r -a steps <<< "${STEPS:-$DEFAULT_STEPS}"
rc=0; i=0
for s in "${steps[@]}"; do
  i=$((i + 1))
  tool=${s%%:*}; rest=${s#*:}; files=${rest%%:*}; expr=${rest#*:}
  dir="$OUT/sanitizer/$i-$tool"; mkdir -p "$dir"
  echo "== step $i: $tool on $files -k '$expr'" | tee -a "$SUM"
  t0=$(date +%s)
  if [ "$files" = check ]; then cmd=(python -m torch_flashops check --device cuda)
  else cmd=(python -m pytest $files -k "$expr" -n "${WORKERS:-8}" -q -rfE -p no:cacheprovider); fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${STEP_TIMEOUT:-150}" "$CS" --tool "$tool" --target-processes all \
    --print-limit 20 --log-file "$dir/%p.log" "${cmd[@]}" >"$dir/pytest.log" 2>&1
  r=$?; [ $r -ne 0 ] && rc=$r
  echo "rc=$r, $(( $(date +%s) - t0 )) s" | tee -a "$SUM"
  grep -E "^(FAILED|ERROR)| passed| failed| error|FAIL|all .* passed" "$dir/pytest.log" | tail -n 15 | tee -a "$SUM"
  [ $r -eq 124 ] && echo "TIMED OUT: $(tail -c 300 "$dir/pytest.log")" | tee -a "$SUM"
  # one ERROR SUMMARY line per sanitized process; anything but "0 errors" is a finding
  n=$(cat "$dir"/*.log 2>/dev/null | grep -c "ERROR SUMMARY")
  bad=$(cat "$dir"/[0-9]*.log 2>/dev/null | grep "ERROR SUMMARY" | grep -vc "ERROR SUMMARY: 0 errors")
  echo "sanitizer: $n process summaries, $bad with errors" | tee -a "$SUM"
  if [ "$bad" != "0" ]; then
    rc=1
    grep -h -B2 -A12 -E "^========= (Invalid|Program hit|Race|Barrier|Uninitialized)" "$dir"/[0-9]*.log | head -n 80 | tee -a "$SUM"
  fi
done
exit $rc
