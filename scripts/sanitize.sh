#!/usr/bin/env bash
# compute-sanitizer over the kernels' GPU tests, one shard per device call (three calls, SHARD=1/3
# to 3/3, should cover the default selection at the warm-cache rates below; give a fresh
# machine's first call a longer STEP_TIMEOUT):
#   run(command="SHARD=1/3 bash scripts/sanitize.sh", timeout_s=590)
# Each step runs pytest (HYPOTHESIS_PROFILE=ci: small random shapes, few examples) under one
# sanitizer tool, with PyTorch's caching allocator off, so every tensor is its own allocation and
# an access past a tensor's end is reported instead of landing in a neighbour's block.
# CUDA-graph, reduce-overhead, compile and export tests are deselected: graph capture needs the
# caching allocator, and compiled/exported graphs launch the same kernels the eager tests do; so
# are the tests that time plan() against a busy GPU and forbid synchronising calls.
#
# Tests run in one process (no pytest-xdist). On an H100 with torch 2.11 / CUDA 13.0 and
# compute-sanitizer 2025.3.1 (2026-12-07), xdist workers under `--target-processes all` did not
# work: one run crashed the sanitizer (rc 139) within 8 s, and three others logged only the parent
# process and no test result in 125 s. One process under memcheck (H100, 2026-12-08, warm Triton
# cache) ran test_moe.py's 428 tests in 24 s and test_attention_api.py's 85 in 33 s, but only 460 of
# the 624 tests of step 2 and 97 of the 186 of step 3 in 125 s each, so the whole default selection
# takes more than one device call: SHARD=i/n runs every n-th test of each step's selection,
# starting at the i-th, and n calls with i = 1..n cover all of it.
#   STEPS   "tool:files:-k expression" triples separated by ';' (default below); files "check"
#           runs `python -m torch_flashops check --device cuda` (every family's self-check) instead
#           (it is not sharded: shard 1 runs it, the others skip it)
#   SHARD   i/n (default 1/1)
#   STEP_TIMEOUT seconds per step (default 150)
# Per-process sanitizer logs land in $OUT/sanitizer/<step>/; the summary in $OUT/sanitize.txt.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/sanitizer"
SUM="$OUT/sanitize.txt"
SHARD=${SHARD:-1/1}
if ! [[ "$SHARD" =~ ^([0-9]+)/([0-9]+)$ ]] || [ $((10#${BASH_REMATCH[1]})) -lt 1 ] \
    || [ $((10#${BASH_REMATCH[1]})) -gt $((10#${BASH_REMATCH[2]})) ]; then
  echo "SHARD must be i/n with 1 <= i <= n, got '$SHARD'" >&2; exit 2
fi
si=$((10#${BASH_REMATCH[1]})); sn=$((10#${BASH_REMATCH[2]}))
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -z "$CS" ]; then echo "compute-sanitizer not found" | tee "$SUM"; exit 2; fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$CS" --version | tail -n 1
  echo "shard $si of $sn, $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
  date -u
} | tee "$SUM"
# (the two host-timing tests need the caching allocators: without them a free or an allocation can wait
# for the GPU, which is not what they test)
# (test_gpu_decode_one_launch_grid_barrier captures graphs too; test_gpu_decode_refused_cooperative_grid
# provokes the driver's CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE on purpose, which memcheck counts as an error)
NOT="not graph and not capture and not overhead and not compile and not export and not stream and not does_not_wait and not do_not_sync"
NOT+=" and not grid_barrier and not refused_cooperative"
DEFAULT_STEPS="memcheck:check:"
DEFAULT_STEPS+=";memcheck:tests/test_page.py tests/test_rope.py tests/test_cascade.py tests/test_moe_routing.py:$NOT"
DEFAULT_STEPS+=";memcheck:tests/test_attention.py tests/test_attention_api.py:$NOT"
DEFAULT_STEPS+=";memcheck:tests/test_moe.py:$NOT"
IFS=';' read -r -a steps <<< "${STEPS:-$DEFAULT_STEPS}"
rc=0; i=0
for s in "${steps[@]}"; do
  i=$((i + 1))
  tool=${s%%:*}; rest=${s#*:}; files=${rest%%:*}; expr=${rest#*:}
  dir="$OUT/sanitizer/$i-$tool"; mkdir -p "$dir"
  if [ "$files" = check ]; then
    echo "== step $i: $tool on the self-check" | tee -a "$SUM"
    if [ "$si" -ne 1 ]; then echo "skipped (shard 1 runs it)" | tee -a "$SUM"; continue; fi
    cmd=(python -m torch_flashops check --device cuda)
  else
    # this shard's test ids, collected outside the sanitizer (a file that fails to import, or a
    # bad -k expression, fails the step: pytest prints ids before it rejects an expression)
    python -m pytest --collect-only -q -p no:cacheprovider -p no:xdist -p no:warnings $files -k "$expr" \
      >"$dir/collect.log" 2>&1
    crc=$?
    grep -E '^[^ ]+\.py::' "$dir/collect.log" | awk -v i="$si" -v n="$sn" '(NR - 1) % n == i - 1' >"$dir/ids.txt"
    echo "== step $i: $tool on $files -k '$expr': $(wc -l <"$dir/ids.txt") tests in this shard" | tee -a "$SUM"
    if [ $crc -ne 0 ]; then  # (5: nothing selected, also a wrong selection here)
      echo "collection failed (pytest rc=$crc):" | tee -a "$SUM"; tail -n 15 "$dir/collect.log" | tee -a "$SUM"
      rc=1; continue
    fi
    if [ ! -s "$dir/ids.txt" ]; then echo "no test of the selection falls in this shard" | tee -a "$SUM"; continue; fi
    cmd=(python -m pytest "@$dir/ids.txt" -p no:xdist -v -rfE -p no:cacheprovider)
  fi
  t0=$(date +%s)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${STEP_TIMEOUT:-150}" "$CS" --tool "$tool" --target-processes all \
    --print-limit 20 --log-file "$dir/%p.log" "${cmd[@]}" >"$dir/pytest.log" 2>&1
  r=$?; [ $r -ne 0 ] && rc=$r
  echo "rc=$r, $(( $(date +%s) - t0 )) s" | tee -a "$SUM"
  grep -E "^(FAILED|ERROR)| passed| failed| error|FAIL|all .* passed" "$dir/pytest.log" | tail -n 15 | tee -a "$SUM"
  if [ $r -eq 124 ]; then
    done_n=$(grep -cE " (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( |$)" "$dir/pytest.log")
    echo "TIMED OUT after $done_n tests; last: $(grep -E " (PASSED|FAILED|SKIPPED|ERROR)" "$dir/pytest.log" | tail -n 1)" \
      | tee -a "$SUM"
  fi
  # one summary line per sanitized process that exited (memcheck, initcheck, synccheck: ERROR
  # SUMMARY; racecheck: RACECHECK SUMMARY, hazards); any reported error is a finding, also from a
  # process the timeout killed before its summary
  FINDING="^========= (Invalid|Program hit|Race|Barrier|Uninitialized|Error:|Warning:)"
  n=$(cat "$dir"/[0-9]*.log 2>/dev/null | grep -cE "(ERROR|RACECHECK) SUMMARY")
  bad=$(cat "$dir"/[0-9]*.log 2>/dev/null | grep -E "(ERROR|RACECHECK) SUMMARY" \
        | grep -vcE "ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards")
  found=$(cat "$dir"/[0-9]*.log 2>/dev/null | grep -cE "$FINDING")
  echo "sanitizer: $n process summaries, $bad with errors; $found reported errors" | tee -a "$SUM"
  if [ "$bad" != "0" ] || [ "$found" != "0" ]; then
    rc=1
    grep -h -B2 -A12 -E "$FINDING" "$dir"/[0-9]*.log | head -n 80 | tee -a "$SUM"
  fi
done
exit $rc
