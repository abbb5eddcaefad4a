"""Paged prefill tiles in place (pointer gathers through the page table) against contiguous keys.

    PYTHONPATH=. python scripts/cascade_probe.py time [cascade|prefill]
    PYTHONPATH=. ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section WarpStateStats python scripts/cascade_probe.py ncu

Cases (bf16, D=128, 32 query / 8 KV heads, page 16 with shuffled pages):
  * the attention suite's cascade shared level: a 32k-key prefix shared by B=128 single-token
    requests (one non-causal paged prefill of 128 rows), and the same keys contiguous (ragged,
    TMA key tiles) for comparison;
  * the whole two-level cascade (shared level + 256 unique keys per request), as planned and
    with the two levels launched on two streams (either one on the side stream);
  * the suite's causal paged prefill, B=4 x 4096: as planned (gathered K/V) and in place.
``PAGE`` in the environment sets the page size (default 16). The in-place prefill is planned
with the gathered-K/V path switched off (plan() makes that choice); CUDA-graph replays, two
alternating rounds; outputs are checked against the first variant of each case. ``ncu`` runs each variant once between
cudaProfilerStart/Stop. RESULTS.md (eighteenth session) has the H100 numbers, and those of
page-sized TMA copies, which lost to the pointer gathers and were not kept.
"""
from __future__ import annotations

import os
import sys

import torch

import torch_flashops as fo
from benchmarks.harness import time_fn
from benchmarks.tune_attention import _patched

HQ, HKV, D = 32, 8, 128
PAGE = int(os.environ.get("PAGE", "16"))
DT = torch.bfloat16


def i32(x):
    return torch.tensor(x, dtype=torch.int32, device="cuda")


def workspace():
    return torch.empty(256 << 20, dtype=torch.uint8, device="cuda")


def cascade_cases(g):
    B, prefix, uniq = 128, 32768, 256
    n_pre, n_uq = prefix // PAGE, uniq // PAGE
    P = n_pre + B * n_uq
    cache = torch.empty(P, 2, PAGE, HKV, D, dtype=DT, device="cuda").normal_(generator=g)
    perm = torch.randperm(P, generator=g, device="cuda").int()
    pre, uq = perm[:n_pre], perm[n_pre:].view(B, n_uq)
    q = torch.empty(B, HQ, D, dtype=DT, device="cuda").normal_(generator=g)
    flops = 4 * B * HQ * D * prefix
    ar = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    w = fo.BatchPrefillWithPagedKVCacheWrapper(workspace())
    w.plan(i32([0, B]), i32([0, n_pre]), pre, i32([PAGE]), HQ, HKV, D, PAGE, causal=False, q_data_type=DT)
    shared = {"paged in place": lambda: w.run(q, cache, return_lse=True)[0]}
    c = fo.MultiLevelCascadeAttentionWrapper(2, workspace())
    c.plan([i32([0, B]), ar], [i32([0, n_pre]), ar * n_uq], [pre, uq.reshape(-1)],
           [i32([PAGE]), torch.full((B,), PAGE, dtype=torch.int32, device="cuda")], HQ, HKV, D, PAGE, q_data_type=DT)
    whole = {"as planned": lambda: c.run(q, cache)}
    # the same two levels on two streams (own workspaces): the memory-bound unique level can run
    # beside the compute-bound shared level instead of after it
    lv = [fo.BatchPrefillWithPagedKVCacheWrapper(workspace()) for _ in range(2)]
    lv[0].plan(i32([0, B]), i32([0, n_pre]), pre, i32([PAGE]), HQ, HKV, D, PAGE, causal=False, q_data_type=DT)
    lv[1].plan(ar, ar * n_uq, uq.reshape(-1), torch.full((B,), PAGE, dtype=torch.int32, device="cuda"), HQ, HKV, D,
               PAGE, causal=False, q_data_type=DT)
    side = torch.cuda.Stream()

    def two_streams(first_on_side):
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        a, b = (lv[0], lv[1]) if first_on_side == 0 else (lv[1], lv[0])
        with torch.cuda.stream(side):
            o_side, s_side = a.run(q, cache, return_lse=True)
        o, s = b.run(q, cache, return_lse=True)
        cur.wait_stream(side)
        fo.merge_state_in_place(o, s, o_side, s_side)
        return o

    whole["two streams, shared level on the side"] = lambda: two_streams(0)
    whole["two streams, unique level on the side"] = lambda: two_streams(1)
    kv = cache[pre.long()]
    k = kv[:, 0].reshape(prefix, HKV, D).contiguous()
    v = kv[:, 1].reshape(prefix, HKV, D).contiguous()
    r = fo.BatchPrefillWithRaggedKVCacheWrapper(workspace())
    r.plan(i32([0, B]), i32([0, prefix]), HQ, HKV, D, causal=False, q_data_type=DT)
    shared["ragged TMA (same keys, contiguous)"] = lambda: r.run(q, k, v)
    return [("cascade shared level 128 x 32k", flops, shared), ("whole cascade (2 levels)", None, whole)]


def paged_batch(g, B, L):
    """A 5-D NHD cache of B requests x L keys on shuffled pages: ``(cache, page ids)``."""
    per = L // PAGE
    cache = torch.empty(B * per, 2, PAGE, HKV, D, dtype=DT, device="cuda").normal_(generator=g)
    return cache, torch.randperm(B * per, generator=g, device="cuda").int()


def time_rounds(runs, rounds=2):
    """CUDA-graph replay times (ms) of every variant, the variants alternating, ``rounds`` times."""
    times = {n: [] for n in runs}
    for _ in range(rounds):
        for n, f in runs.items():
            times[n].append(time_fn(f, [()], device="cuda", graph=True))
    return times


def prefill_case(g):
    B, L = 4, 4096
    per = L // PAGE
    cache, ids = paged_batch(g, B, L)
    q = torch.empty(B * L, HQ, D, dtype=DT, device="cuda").normal_(generator=g)
    indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    flops = 4 * D * HQ * B * (L * (L + 1) // 2)
    runs = {}
    for name, in_place in (("as planned (gathered K/V)", False), ("in place", True)):
        with _patched(gather=not in_place):
            w = fo.BatchPrefillWithPagedKVCacheWrapper(workspace())
            w.plan(indptr * L, indptr * per, ids, torch.full((B,), PAGE, dtype=torch.int32, device="cuda"), HQ, HKV,
                   D, PAGE, causal=True, q_data_type=DT)
        runs[name] = (lambda w=w: w.run(q, cache))
    return [(f"causal paged prefill B={B} L={L}", flops, runs)]


def main(argv):
    mode = argv[0] if argv else "time"
    g = torch.Generator(device="cuda").manual_seed(0)
    only = argv[1] if len(argv) > 1 else ""  # "cascade" or "prefill": one family of cases
    cases = (cascade_cases(g) if only != "prefill" else []) + (prefill_case(g) if only != "cascade" else [])
    for title, _, runs in cases:
        outs = [f() for f in runs.values()]
        errs = [(o.float() - outs[0].float()).abs().max().item() for o in outs[1:]]
        print(f"{title}: max |o - first| {' / '.join(f'{e:.1e}' for e in errs)}", flush=True)
    torch.cuda.synchronize()
    if mode == "ncu":
        torch.cuda.profiler.start()
        for _, _, runs in cases:
            for f in runs.values():
                f()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    for title, flops, runs in cases:
        times = time_rounds(runs)
        row = [title]
        for n, ts in times.items():
            rate = f" = {flops / min(ts) / 1e9:.0f} TFLOP/s" if flops else ""
            row.append(f"{n}: {' / '.join(f'{t * 1e3:.1f}' for t in ts)} us{rate}")
        print("\n  ".join(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
