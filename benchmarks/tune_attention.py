"""Launch-parameter sweep for the attention kernel (one device call: checks, then times).

    PYTHONPATH=. python -m benchmarks.tune_attention [decode] [prefill] [split]

For each case, every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) is checked against
torch SDPA and timed (CUDA-graph replays for decode, ``do_bench`` for prefill); the table shows
GB/s (decode) or TFLOP/s (prefill). ``ops.attention.attn_config`` / ``tile_m`` /
``resident_programs`` are patched per candidate, so the heuristics in ``ops/attention.py``
are what the winners get written back into.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import torch_flashops as fo
from benchmarks.harness import time_fn
from benchmarks.suites.attention import _Paged, _sdpa_decode, _visible_pairs
from torch_flashops.ops import attention as A

DT = torch.bfloat16


def _patched(block_m=None, cfg=None, split=None):
    class P:
        def __enter__(self):
            self.saved = (A.attn_config, A.tile_m, A.resident_programs)
            if cfg is not None:
                A.attn_config = lambda *a, **k: cfg
            if block_m is not None:
                A.tile_m = lambda *a, **k: block_m
            if split is not None:
                A.resident_programs = lambda *a, **k: split

        def __exit__(self, *exc):
            A.attn_config, A.tile_m, A.resident_programs = self.saved

    return P()


def decode(g):
    cases = [(64, 4096, 32, 8), (16, 16384, 32, 8), (1, 32768, 32, 8), (256, 2048, 32, 4)]
    cfgs = [None, (64, 4, 2), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 3), (128, 4, 2)]
    for B, L, Hq, Hkv in cases:
        kv_bytes = 2 * B * L * Hkv * 128 * 2
        d = _Paged(B, L, Hq, Hkv, 128, 16, DT, "cuda", g, max(1, min(8, math.ceil((256 << 20) / kv_bytes))))
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        ref = _sdpa_decode(d.sets[0][0], d.sets[0][2], d.sets[0][3]).transpose(1, 2).reshape(B, Hq, 128)
        sd = time_fn(lambda q, c, k, v: _sdpa_decode(q, k, v), d.sets, device="cuda", graph=True)
        row = [f"decode B={B} L={L} {Hq}/{Hkv}: sdpa {kv_bytes / sd / 1e6:.0f} GB/s"]
        for cfg in cfgs:
            with _patched(cfg=cfg):
                w = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
                w.plan(d.indptr, d.indices, d.last, Hq, Hkv, 128, 16, q_data_type=DT)
                o = w.run(d.sets[0][0], d.sets[0][1])
                err = (o.float() - ref.float()).abs().max().item()
                ms = time_fn(lambda q, c, k, v: w.run(q, c), d.sets, device="cuda", graph=True)
            row.append(f"{cfg or 'default'}: {kv_bytes / ms / 1e6:.0f} GB/s ({sd / ms:.2f}x sdpa, err {err:.1e})")
        print("\n  ".join(row), flush=True)
        del d


def split(g):
    """Split-KV target (resident programs per SM the planner assumes) at small batch / long context."""
    for B, L in ((1, 32768), (4, 16384), (16, 8192)):
        d = _Paged(B, L, 32, 8, 128, 16, DT, "cuda", g, 4)
        kv_bytes = 2 * B * L * 8 * 128 * 2
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        row = [f"split B={B} L={L}"]
        for sp in (1, 2, 4, 8):
            with _patched(split=sp):
                w = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
                w.plan(d.indptr, d.indices, d.last, 32, 8, 128, 16, q_data_type=DT)
                n_split = int((w._t.split_work[::4] >= 0).sum())
                ms = time_fn(lambda q, c, k, v: w.run(q, c), d.sets, device="cuda", graph=True)
            row.append(f"{sp}/SM ({n_split} split items): {kv_bytes / ms / 1e6:.0f} GB/s")
        print("\n  ".join(row), flush=True)
        del d


def prefill(g):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, L, Hq, Hkv, D = 4, 4096, 32, 8, 128
    q = torch.randn(B * L, Hq, D, device="cuda", dtype=DT)
    k = torch.randn(B * L, Hkv, D, device="cuda", dtype=DT)
    v = torch.randn(B * L, Hkv, D, device="cuda", dtype=DT)
    indptr = torch.arange(B + 1, device="cuda", dtype=torch.int32) * L
    flops = 4 * D * Hq * _visible_pairs([L] * B, [L] * B, True)
    qd = q.view(B, L, Hq, D).transpose(1, 2).contiguous()
    kd = k.view(B, L, Hkv, D).transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
    vd = v.view(B, L, Hkv, D).transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        sd = time_fn(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), [()], device="cuda")
    ref = ref.transpose(1, 2).reshape(B * L, Hq, D)
    row = [f"prefill causal B={B} L={L}: sdpa-flash {flops / sd / 1e9:.0f} TFLOP/s"]
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for bm, cfg in [(128, None), (128, (128, 8, 3)), (128, (64, 8, 2)), (128, (128, 8, 2)), (64, (64, 4, 3)),
                    (64, (128, 4, 3)), (128, (64, 4, 3))]:
        with _patched(block_m=bm, cfg=cfg):
            w = fo.BatchPrefillWithRaggedKVCacheWrapper(ws)
            w.plan(indptr, indptr, Hq, Hkv, D, causal=True, q_data_type=DT)
            o = w.run(q, k, v)
            err = (o.float() - ref.float()).abs().max().item()
            ms = time_fn(lambda: w.run(q, k, v), [()], device="cuda")
        row.append(f"BM={bm} {cfg or 'default'}: {flops / ms / 1e9:.0f} TFLOP/s ({sd / ms:.2f}x sdpa, err {err:.1e})")
    print("\n  ".join(row), flush=True)


def main(argv):
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in argv or ["decode", "split", "prefill"]:
        globals()[name](g)


if __name__ == "__main__":
    main(sys.argv[1:])
