"""Where the cascade benchmark's shared level spends its time (one device call).

    PYTHONPATH=. python scripts/cascade_probe.py time
    PYTHONPATH=. ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section Occupancy --section LaunchStats python scripts/cascade_probe.py ncu

The shape is the attention suite's cascade case: a 32k-key prefix (page 16, shuffled pages)
shared by B=128 single-token requests, 32 query / 8 KV heads, D=128, bf16. ``time`` prints the
shared level's CUDA-graph replay time (TFLOP/s of its 4*B*Hq*D*prefix flops) as planned, and a
ragged (contiguous, TMA key tiles) run of the same keys for comparison; ``ncu`` runs each once
between cudaProfilerStart/Stop so Nsight Compute profiles only those kernels.
"""
from __future__ import annotations

import sys

import torch

import torch_flashops as fo
from benchmarks.harness import time_fn

B, PREFIX, HQ, HKV, D, PAGE = 128, 32768, 32, 8, 128, 16
DT = torch.bfloat16


def build():
    g = torch.Generator(device="cuda").manual_seed(0)
    n_pages = PREFIX // PAGE
    cache = torch.empty(n_pages, 2, PAGE, HKV, D, dtype=DT, device="cuda").normal_(generator=g)
    pages = torch.randperm(n_pages, generator=g, device="cuda").int()
    q = torch.empty(B, HQ, D, dtype=DT, device="cuda").normal_(generator=g)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    paged = fo.BatchPrefillWithPagedKVCacheWrapper(ws)
    paged.plan(i32([0, B]), i32([0, n_pages]), pages, i32([PAGE]), HQ, HKV, D, PAGE, causal=False, q_data_type=DT)
    kv = cache[pages.long()]  # [n, 2, PAGE, HKV, D] in key order
    k = kv[:, 0].reshape(PREFIX, HKV, D).contiguous()
    v = kv[:, 1].reshape(PREFIX, HKV, D).contiguous()
    ws2 = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    ragged = fo.BatchPrefillWithRaggedKVCacheWrapper(ws2)
    ragged.plan(i32([0, B]), i32([0, PREFIX]), HQ, HKV, D, causal=False, q_data_type=DT)
    runs = {"paged in place": lambda: paged.run(q, cache, return_lse=True),
            "ragged (same keys, contiguous)": lambda: ragged.run(q, k, v, return_lse=True)}
    return runs, paged


def main(argv):
    mode = argv[0] if argv else "time"
    runs, paged = build()
    outs = {n: f() for n, f in runs.items()}
    (o0, s0), (o1, s1) = outs.values()
    print(f"paged vs ragged: max |o| diff {(o0.float() - o1.float()).abs().max().item():.2e}, "
          f"max |lse| diff {(s0 - s1).abs().max().item():.2e}; plan block_m {paged._plan.block_m}, "
          f"split items {int((paged._t.split_work[::4] >= 0).sum())}", flush=True)
    torch.cuda.synchronize()
    flops = 4 * B * HQ * D * PREFIX
    if mode == "ncu":
        torch.cuda.profiler.start()
        for f in runs.values():
            f()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    for n, f in runs.items():
        t = time_fn(f, [()], device="cuda", graph=True)
        print(f"{n}: {t * 1e3:.1f} us = {flops / t / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
