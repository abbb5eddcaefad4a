"""Where the large-KV decode gap to SDPA lives: page order, cache form, or the kernel's loop.

    PYTHONPATH=. python scripts/decode_read_probe.py [B L ...]

For each (B, L) case (bf16, D=128, 32 query / 8 KV heads, page 16; default B=64 L=4096,
B=16 L=32768, B=256 L=2048, each about 1 GB of KV) it times, as CUDA-graph replays, two
alternating rounds:
  * ``sdpa``: SDPA over the dense ``[B, H_kv, L, D]`` K/V (the attention suite's peer);
  * ``paged shuffled``: our decode over a 5-D cache with shuffled pages (the suite's case);
  * ``paged in order``: the same cache with page ids 0, 1, 2, ... in request order;
  * ``tuple in order``: separate K and V caches, pages in order, so each request's keys are one
    contiguous ``[L, H_kv, D]`` run (the dense layout, read through the page table);
  * ``ragged``: the ragged wrapper (one query row per request) over contiguous K/V;
  * ``read sum`` / ``read triton``: the same K and V bytes read by ``torch.sum`` and by the
    harness's streaming Triton read (its read ceiling is the faster of the two).
GB/s counts K and V once (B x L x H_kv x D x 2 bytes x 2). Outputs are checked against ``paged
shuffled``.
"""
from __future__ import annotations

import sys

import torch
import triton

import torch_flashops as fo
from benchmarks.harness import stream_read, time_fn

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of the checks only


def ws():
    return torch.empty(256 << 20, dtype=torch.uint8, device=DEV)


def case(B, L, g):
    per = L // PAGE
    P = B * per
    kv_bytes = 2 * B * L * HKV * D * 2
    k = torch.empty(P, PAGE, HKV, D, dtype=DT, device=DEV).normal_(generator=g)
    v = torch.empty_like(k).normal_(generator=g)
    cache5 = torch.stack([k, v], dim=1)  # [P, 2, page, H, D]
    q = torch.empty(B, HQ, D, dtype=DT, device=DEV).normal_(generator=g)
    indptr = torch.arange(B + 1, dtype=torch.int32, device=DEV) * per
    last = torch.full((B,), PAGE, dtype=torch.int32, device=DEV)
    perm = torch.randperm(P, generator=g, device=DEV).int()
    inorder = torch.arange(P, dtype=torch.int32, device=DEV)
    variants = {}

    w_sh = fo.BatchDecodeWithPagedKVCacheWrapper(ws())
    w_sh.plan(indptr, perm, last, HQ, HKV, D, PAGE, q_data_type=DT)
    # the shuffled cache holds page perm[j] where the in-order cache holds page j: same keys
    cache_sh = torch.empty_like(cache5)
    cache_sh[perm.long()] = cache5
    variants["paged shuffled"] = lambda: w_sh.run(q, cache_sh)
    w_in = fo.BatchDecodeWithPagedKVCacheWrapper(ws())
    w_in.plan(indptr, inorder, last, HQ, HKV, D, PAGE, q_data_type=DT)
    variants["paged in order"] = lambda: w_in.run(q, cache5)
    variants["tuple in order"] = lambda: w_in.run(q, (k, v))

    kd = k.view(B, L, HKV, D).transpose(1, 2).contiguous()  # [B, H, L, D]
    vd = v.view(B, L, HKV, D).transpose(1, 2).contiguous()
    qs = q.view(B, 1, HQ, D).transpose(1, 2)
    variants["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, kd, vd, enable_gqa=True).transpose(1, 2).reshape(B, HQ, D)

    kr, vr = k.view(B * L, HKV, D), v.view(B * L, HKV, D)
    w_rg = fo.BatchPrefillWithRaggedKVCacheWrapper(ws())
    qo = torch.arange(B + 1, dtype=torch.int32, device=DEV)
    w_rg.plan(qo, qo * L, HQ, HKV, D, causal=False, q_data_type=DT)
    variants["ragged"] = lambda: w_rg.run(q, kr, vr)

    sink = torch.empty(1 << 20, dtype=torch.float32, device=DEV)
    variants["read sum"] = lambda: (k.sum(dtype=torch.float32), v.sum(dtype=torch.float32))
    variants["read triton"] = lambda: (stream_read(k, sink), stream_read(v, sink))

    want = variants["paged shuffled"]().float()
    for name in ("paged in order", "tuple in order", "sdpa", "ragged"):
        err = (variants[name]().float() - want).abs().max().item()
        assert err < 2e-2, (name, err)
    if DEV != "cuda":
        print(f"B={B} L={L}: outputs agree (cpu smoke run, not timed)")
        return
    times = {n: [] for n in variants}
    for _ in range(2):
        for n, fn in variants.items():
            times[n].append(time_fn(lambda: fn(), [()], device="cuda", graph=True) * 1e3)
    print(f"B={B} L={L} ({kv_bytes / 1e9:.2f} GB of KV)")
    for n, ts in times.items():
        best = min(ts)
        print(f"  {n:16s} {'/'.join(f'{t:.1f}' for t in ts)} us  {kv_bytes / best / 1e3:.0f} GB/s  "
              f"{min(times['sdpa']) / best:.3f}x sdpa")
    del variants, w_sh, w_in, w_rg, cache5, cache_sh, k, v, kd, vd
    torch.cuda.empty_cache()


def main(argv):
    g = torch.Generator(device=DEV).manual_seed(0)
    nums = [int(a) for a in argv]
    cases = list(zip(nums[::2], nums[1::2])) or [(64, 4096), (16, 32768), (256, 2048)]
    print(torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch.__version__, triton.__version__)
    for B, L in cases:
        case(B, L, g)


if __name__ == "__main__":
    main(sys.argv[1:])
