"""Launch-parameter sweep for the attention kernel (one device call: checks, then times).

    PYTHONPATH=. python -m benchmarks.tune_attention [decode] [large] [ahead_split] [tma128] [decode_mid] [unique]
        [decode_256] [little] [split] [chunks] [ahead] [merge] [warps] [small] [b16] [b16_more] [warps16]
        [evict] [merge_programs] [pdl] [regs] [fold] [tma] [paged_prefill] [prefill] [cascade] [profile] [lean]

For each case, every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages, split target, minimum
split chunk, page ids ahead, merge config) is checked against torch SDPA and timed (CUDA-graph
replays for decode, ``do_bench`` for prefill); each line shows GB/s (decode) or TFLOP/s
(prefill) and the ratio to SDPA in the same run. ``ops.attention.attn_config`` / ``tile_m`` /
``resident_programs`` / ``split_min_chunk`` / ``page_ahead`` / ``merge_config`` are patched per
candidate, so the heuristics in ``ops/attention.py`` are what the
winners get written back into ("default" rows run those heuristics unpatched). ``profile``
prints the device time per kernel of one decode call, ours and SDPA's (torch.profiler).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

import torch_flashops as fo
from benchmarks.harness import time_fn
from benchmarks.suites.attention import _Paged, _sdpa_decode, _visible_pairs
from torch_flashops import prefill as prefill_mod
from torch_flashops.ops import attention as A

DT = torch.bfloat16


# keyword of _patched -> the ops.attention heuristic it pins to a constant
_CONSTANT_HEURISTICS = dict(cfg="attn_config", block_m="tile_m", split="resident_programs",
                            min_chunk="split_min_chunk", page_ahead="page_ahead", merge="merge_config",
                            fold="fold_scale", min_keys="split_min_keys", d_split="merge_d_split",
                            evict="kv_eviction", pdl="merge_pdl")


@contextlib.contextmanager
def _patched(gather=True, tma=None, **constants):
    """Pin heuristics of ``ops.attention`` for one candidate: each keyword of
    ``_CONSTANT_HEURISTICS`` given a value (not None) makes that function return it; ``tma``
    True/False loads ragged tiles by TMA wherever eligible (CUDA included) / never;
    ``gather=False`` keeps paged prefill in place (no gathered-K/V path)."""
    with contextlib.ExitStack() as stack:
        for key, value in constants.items():
            if value is not None:
                stack.enter_context(mock.patch.object(A, _CONSTANT_HEURISTICS[key], lambda *a, _v=value, **k: _v))
        if tma is not None:
            stack.enter_context(mock.patch.object(A, "use_tma", lambda *a: tma and A.tma_eligible(*a[:4])))
        if not gather:
            stack.enter_context(mock.patch.object(prefill_mod, "PAGED_GATHER_MIN_ROWS_PER_KEY", float("inf")))
        yield


# (name, (BLOCK_N, num_warps, num_stages) or None for the heuristics' choice)
_DECODE_CFGS = [("default", None), ("(64,4,2)", (64, 4, 2)), ("(64,4,3)", (64, 4, 3)), ("(32,4,3)", (32, 4, 3)),
                ("(32,4,4)", (32, 4, 4)), ("(128,4,2)", (128, 4, 2)), ("(64,8,3)", (64, 8, 3))]


def _decode_rows(g, cases, cfgs, splits=(None,), min_chunks=(None,), aheads=(None,), merges=(None,),
                 min_keys=(None,), d_splits=(None,), evicts=(None,), pdls=(None,), caps=(None,), leans=(None,)):
    for B, L, Hq, Hkv in cases:
        kv_bytes = 2 * B * L * Hkv * 128 * 2
        d = _Paged(B, L, Hq, Hkv, 128, 16, DT, "cuda", g, max(1, min(16, math.ceil((256 << 20) / kv_bytes))))
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        ref = _sdpa_decode(d.sets[0][0], d.sets[0][2], d.sets[0][3]).transpose(1, 2).reshape(B, Hq, 128)
        sd = time_fn(lambda q, c, k, v: _sdpa_decode(q, k, v), d.sets, device="cuda", graph=True)
        row = [f"decode B={B} L={L} {Hq}/{Hkv}: sdpa {kv_bytes / sd / 1e6:.0f} GB/s {sd * 1e3:.1f} us"]
        for name, cfg in cfgs:
            for sp, mc, pa, mg, mk, ds, ev, pd, rc, ln in [
                    (a, b, c, e, f, h, i, j, k, m) for a in splits for b in min_chunks for c in aheads for e in merges
                    for f in min_keys for h in d_splits for i in evicts for j in pdls for k in caps for m in leans]:
                with _patched(cfg=cfg, split=sp, min_chunk=mc, page_ahead=pa, merge=mg, min_keys=mk, d_split=ds,
                              evict=ev, pdl=pd), \
                        (mock.patch.object(A, "register_cap", lambda *a: None) if rc else contextlib.nullcontext()), \
                        (mock.patch.object(A, "LEAN_ADDRESSING", ln) if ln is not None else contextlib.nullcontext()):
                    w = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
                    w.plan(d.indptr, d.indices, d.last, Hq, Hkv, 128, 16, q_data_type=DT)
                    o = w.run(d.sets[0][0], d.sets[0][1])
                    err = (o.float() - ref.float()).abs().max().item()
                    ns = int((w._t.split_work[::4] >= 0).sum())
                    ms = time_fn(lambda q, c, k, v: w.run(q, c), d.sets, device="cuda", graph=True)
                row.append(f"{name}{'' if sp is None else f' sp={sp}'}{'' if mc is None else f' mc={mc}'}"
                           f"{'' if pa is None else f' page_ahead={pa}'}{'' if mg is None else f' merge={mg}'}"
                           f"{'' if mk is None else f' min_keys={mk}'}{'' if ds is None else f' d_split={ds}'}"
                           f"{'' if ev is None else f' evict={ev or None}'}{'' if pd is None else f' pdl={pd}'}"
                           f"{'' if rc is None else f' {rc}'}{'' if ln is None else f' lean={ln}'}"
                           f": {kv_bytes / ms / 1e6:.0f} GB/s "
                           f"{ms * 1e3:.1f} us ({sd / ms:.2f}x sdpa, {ns} split items, err {err:.1e})")
        print("\n  ".join(row), flush=True)
        del d


def decode(g):
    """Large and small batches: the heuristics' choice, then fixed launch configs."""
    _decode_rows(g, [(1, 32768, 32, 8), (16, 8192, 32, 8), (16, 512, 32, 8),
                     (64, 4096, 32, 8), (256, 2048, 32, 4)], _DECODE_CFGS)


def large(g):
    """KV >= 1 GB, where the grid fills the machine: deeper pipelines and wider key tiles (more
    bytes in flight per program, fewer per-tile instructions per byte) against the heuristics'
    choice, for a card with more bandwidth than the one the defaults were tuned on (H200)."""
    _decode_rows(g, [(64, 4096, 32, 8), (16, 32768, 32, 8), (64, 16384, 32, 4), (256, 2048, 32, 4),
                     (16, 8192, 32, 8)],
                 _DECODE_CFGS + [("(64,4,4)", (64, 4, 4)), ("(128,4,3)", (128, 4, 3)), ("(128,8,2)", (128, 8, 2)),
                                 ("(128,8,3)", (128, 8, 3)), ("(64,8,2)", (64, 8, 2))])
    _decode_rows(g, [(64, 4096, 32, 8), (16, 32768, 32, 8)],
                 [("default", None), ("(64,4,3)", (64, 4, 3)), ("(128,4,2)", (128, 4, 2))], aheads=(1, 2))


def ahead_split(g):
    """Page ids one or two tiles ahead at the split and few-program decode cases (the
    heuristics' configs), where two ahead was measured faster on an H100."""
    _decode_rows(g, [(1, 32768, 32, 8), (1, 32768, 32, 4), (16, 4096, 32, 8), (16, 4096, 32, 4), (4, 4096, 32, 8),
                     (16, 1024, 32, 8), (1, 4096, 32, 8), (8, 256, 32, 8), (16, 512, 32, 8), (16, 8192, 32, 8)],
                 _DECODE_CFGS[:1] + [("(32,4,3)", (32, 4, 3))], aheads=(1, 2))


def tma128(g):
    """Ragged key tiles by TMA with 128-key tiles (BM=128, 8 warps, 2-3 stages) against pointer
    loads at the heuristics' tiles, alternating; paged prefill through its gathered-K/V path."""
    v = [("pointer loads", None, None, True, None, None, False),
         ("tma BM=128 (128,8,3)", 128, (128, 8, 3), True, None, None, True),
         ("tma BM=128 (128,8,2)", 128, (128, 8, 2), True, None, None, True)] * 2
    _prefill_row(g, 4, 4096, False, v)
    _prefill_row(g, 1, 16384, False, v)
    _prefill_row(g, 4, 4096, True, v[:2] * 2)
    _prefill_row(g, 16, 1024, False, v[:2] * 2)


def little(g):
    _decode_rows(g, [(1, 128, 32, 8), (8, 256, 32, 8), (32, 64, 32, 8)], _DECODE_CFGS)


def unique(g):
    """Large batches of short requests (the cascade's unique level: B=128 x 256 keys; plain
    decode at B=64/256 x 512): the heuristics' choice against fixed configs."""
    _decode_rows(g, [(128, 256, 32, 8), (256, 512, 32, 8), (64, 512, 32, 8)],
                 _DECODE_CFGS + [("(128,8,2)", (128, 8, 2)), ("(64,8,2)", (64, 8, 2))])


def decode_mid(g):
    """The cases between 'few programs' and 'a full machine' (1-3 programs per SM), where neither
    the pipeline (2 stages) nor occupancy hides the latency."""
    _decode_rows(g, [(16, 1024, 32, 8), (1, 4096, 32, 8), (16, 1024, 32, 4), (64, 4096, 32, 4), (1, 32768, 32, 4),
                     (32, 4096, 32, 8), (64, 512, 32, 4)],
                 _DECODE_CFGS[:6], min_chunks=(None, 256, 1024))


def decode_256(g):
    """~2 programs per SM unsplit: split in two (the default) or not (sp=1), and with which config."""
    _decode_rows(g, [(32, 4096, 32, 8), (64, 4096, 32, 4), (16, 1024, 32, 8), (1, 32768, 32, 4)],
                 _DECODE_CFGS[:6], splits=(None, 1))


def b16(g):
    """The issue's little-KV batch cases (B=16 x 512 / 4096 keys) and B=1 x 4096: configs x
    split floors (unsplit: sp=1)."""
    _decode_rows(g, [(16, 512, 32, 8), (16, 512, 32, 4), (16, 1024, 32, 8), (16, 4096, 32, 8), (1, 4096, 32, 8),
                     (1, 512, 32, 8)], _DECODE_CFGS[:2] + [("(64,8,2)", (64, 8, 2)), ("(64,8,3)", (64, 8, 3))],
                 min_keys=(None, 0))


def b16_more(g):
    """Deeper pipelines for the whole 512-key requests; split targets for B=16 x 4096 keys."""
    _decode_rows(g, [(16, 512, 32, 8), (16, 512, 32, 4)],
                 [("default", None), ("(64,8,4)", (64, 8, 4)), ("(32,8,5)", (32, 8, 5)), ("(32,4,5)", (32, 4, 5)),
                  ("(64,4,4)", (64, 4, 4)), ("(128,8,3)", (128, 8, 3)), ("(32,8,3)", (32, 8, 3))])
    _decode_rows(g, [(16, 4096, 32, 8), (16, 4096, 32, 4)],
                 [("default", None), ("(64,4,3)", (64, 4, 3)), ("(64,8,3)", (64, 8, 3)), ("(32,4,3)", (32, 4, 3))],
                 splits=(None, 2, 3, 6))


def warps16(g):
    """16 warps per decode tile for launches of about one program per SM (whole requests)."""
    _decode_rows(g, [(16, 512, 32, 8), (16, 512, 32, 4), (8, 256, 32, 8), (1, 128, 32, 8), (1, 4096, 32, 8)],
                 [("default", None), ("(64,16,3)", (64, 16, 3)), ("(128,16,3)", (128, 16, 3)),
                  ("(64,16,2)", (64, 16, 2)), ("(128,8,2)", (128, 8, 2))])


def evict(g):
    """K/V loads marked evict_first (the default for split launches) or not, at the split decode
    cases; then the little cases at the heuristics' choice and at (64,8,2)."""
    _decode_rows(g, [(1, 32768, 32, 4), (1, 32768, 32, 8), (16, 4096, 32, 8), (16, 4096, 32, 4), (1, 4096, 32, 8),
                     (16, 1024, 32, 8), (4, 4096, 32, 8)], _DECODE_CFGS[:1], evicts=("evict_first", ""))
    _decode_rows(g, [(1, 128, 32, 8), (4, 128, 32, 8), (8, 256, 32, 8), (32, 64, 32, 8), (1, 512, 32, 8)],
                 _DECODE_CFGS[:1] + [("(64,8,2)", (64, 8, 2))])


def merge_programs(g):
    """Merge programs per (merge row, KV head): the heuristic's, 1 (every column chunk in one
    program) and 8 (one per chunk); merge configs at 4 KV heads x 128 splits."""
    _decode_rows(g, [(16, 512, 32, 8), (1, 4096, 32, 8), (16, 1024, 32, 8), (1, 32768, 32, 4), (1, 32768, 32, 8)],
                 _DECODE_CFGS[:1], min_keys=(0,), d_splits=(None, 1, 2, 8))
    _decode_rows(g, [(1, 32768, 32, 4)], _DECODE_CFGS[:1],
                 merges=((4, 64, 16, 4), (4, 32, 32, 4), (4, 16, 32, 4), (4, 32, 16, 4), (4, 16, 64, 4), (4, 64, 16, 8)))


def pdl(g):
    """The merge kernel launched with programmatic dependent launch (default on sm_90+) or
    plainly, at the split decode cases; then split targets of 3 and 4 programs per SM (a
    4-warp decode tile takes 152 registers: 3 fit an SM's register file)."""
    _decode_rows(g, [(1, 4096, 32, 8), (1, 32768, 32, 8), (1, 32768, 32, 4), (1, 512, 32, 8), (16, 1024, 32, 8),
                     (16, 4096, 32, 8), (4, 4096, 32, 8), (16, 512, 32, 4)], _DECODE_CFGS[:1], pdls=(None, False))
    _decode_rows(g, [(16, 4096, 32, 8), (1, 32768, 32, 8), (16, 1024, 32, 8), (4, 4096, 32, 8)], _DECODE_CFGS[:1],
                 splits=(3, 4))


def regs(g):
    """4-warp decode tiles with page ids two ahead (152 registers: 3 programs per SM) capped at
    128 registers (the default: 4 per SM, ~20 bytes spilled) or not ("uncapped"), alternating,
    at the split decode cases that take them; B=64 x 1024 (unsplit, not capped) as a control."""
    _decode_rows(g, [(16, 4096, 32, 8), (1, 32768, 32, 8), (16, 1024, 32, 8), (4, 4096, 32, 8), (1, 32768, 32, 4),
                     (16, 4096, 32, 4), (64, 1024, 32, 8)], _DECODE_CFGS[:1], caps=(None, "uncapped", None, "uncapped"))


def lean(g):
    """K/V row addressing in int32 page/slot arithmetic (``LEAN_ADDRESSING``, the default) or
    int64, alternating twice: little-KV, split and KV >= 1 GB decode, then causal prefill (paged
    in place and through its default path, ragged)."""
    _decode_rows(g, [(16, 512, 32, 8), (16, 512, 32, 4), (1, 512, 32, 8), (4, 1024, 32, 8), (1, 4096, 32, 8),
                     (1, 32768, 32, 8), (16, 4096, 32, 8), (128, 256, 32, 8), (64, 4096, 32, 8), (16, 32768, 32, 8),
                     (256, 2048, 32, 4)], _DECODE_CFGS[:1], leans=(True, False, True, False))
    for flag in (True, False, True, False):
        with mock.patch.object(A, "LEAN_ADDRESSING", flag):
            print(f"LEAN_ADDRESSING={flag}", flush=True)
            _prefill_row(g, 4, 4096, True, [("paged in place BM=128 (64,8,3)", 128, (64, 8, 3), False),
                                            ("default", None, None, True)])
            _prefill_row(g, 4, 4096, False, [("default", None, None, True)])


def split(g):
    """Split-KV target (resident programs per SM the planner assumes) at small batch / long context."""
    _decode_rows(g, [(1, 32768, 32, 8), (4, 16384, 32, 8), (16, 8192, 32, 8)],
                 _DECODE_CFGS[:3], splits=(2, 3, 4, 6))


def _prefill_row(g, B, L, paged, variants):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Hq, Hkv, D = 32, 8, 128
    flops = 4 * D * Hq * _visible_pairs([L] * B, [L] * B, True)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    d = _Paged(B, L, Hq, Hkv, D, 16 if paged else 1, DT, "cuda", g, 1, qo_len=L)
    q, cache, kd, vd = d.sets[0]
    qd = q.view(B, L, Hq, D).transpose(1, 2)
    kd, vd = kd.repeat_interleave(Hq // Hkv, 1), vd.repeat_interleave(Hq // Hkv, 1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        sd = time_fn(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True), [()], device="cuda")
    ref = ref.transpose(1, 2).reshape(B * L, Hq, D)
    row = [f"prefill causal {'paged' if paged else 'ragged'} B={B} L={L}: sdpa-flash {flops / sd / 1e9:.0f} TFLOP/s"]
    for name, bm, cfg, gather, *extra in variants:
        pa, fold, tma = (list(extra) + [None, None, None])[:3]
        with _patched(block_m=bm, cfg=cfg, gather=gather, page_ahead=pa, fold=fold, tma=tma):
            if paged:
                w = fo.BatchPrefillWithPagedKVCacheWrapper(ws)
                w.plan(d.qo_indptr, d.indptr, d.indices, d.last, Hq, Hkv, D, 16, causal=True, q_data_type=DT)
                run = lambda: w.run(q, cache)  # noqa: E731
            else:
                k, v = cache[:, 0, 0], cache[:, 1, 0]  # page size 1: rows in order of the shuffled ids
                rows = d.indices.long()
                k, v = k[rows].contiguous(), v[rows].contiguous()
                w = fo.BatchPrefillWithRaggedKVCacheWrapper(ws)
                w.plan(d.qo_indptr, d.qo_indptr, Hq, Hkv, D, causal=True, q_data_type=DT)
                run = lambda: w.run(q, k, v)  # noqa: E731
            o = run()
            err = (o.float() - ref.float()).abs().max().item()
            ms = time_fn(run, [()], device="cuda")
        row.append(f"{name}: {flops / ms / 1e9:.0f} TFLOP/s ({sd / ms:.2f}x sdpa, err {err:.1e})")
    print("\n  ".join(row), flush=True)
    del d


# (name, BLOCK_M, (BLOCK_N, num_warps, num_stages) or None, gathered-K/V path allowed?[, page ids ahead])
_PREFILL = [("BM=128 (64,8,3)", 128, (64, 8, 3), False), ("BM=128 (128,8,3)", 128, (128, 8, 3), False),
            ("BM=128 (64,8,4)", 128, (64, 8, 4), False), ("BM=64 (64,4,3)", 64, (64, 4, 3), False),
            ("BM=128 (64,8,2)", 128, (64, 8, 2), False), ("BM=128 (32,8,3)", 128, (32, 8, 3), False),
            ("BM=128 (64,4,3)", 128, (64, 4, 3), False), ("default", None, None, True)]


def prefill(g):
    _prefill_row(g, 4, 4096, False, _PREFILL)


def fold(g):
    """Scale folded into the row max and exp2's FMA (default) or applied to every logit first."""
    v = [("default", None, None, True), ("no fold", None, None, True, None, False)] * 2
    _prefill_row(g, 4, 4096, False, v)
    _prefill_row(g, 1, 16384, False, v)
    _prefill_row(g, 4, 4096, True, v)


def tma(g):
    """Ragged key tiles by TMA bulk copies (forced on wherever ``tma_eligible``, at the tile
    config the heuristics give TMA launches) or pointer loads, alternating; paged prefill
    reaches the ragged kernel through its gathered-K/V path."""
    v = [("tma", None, None, True, None, None, True), ("pointer loads", None, None, True, None, None, False)] * 2
    v += [("tma BM=128 (128,8,3)", 128, (128, 8, 3), True, None, None, True),
          ("tma BM=128 (64,8,4)", 128, (64, 8, 4), True, None, None, True)]
    _prefill_row(g, 4, 4096, False, v)
    _prefill_row(g, 1, 16384, False, v)
    _prefill_row(g, 4, 4096, True, v[:4])


def paged_prefill(g):
    """The paged kernel in place at several configs, then the default (gathered K/V when it pays)."""
    _prefill_row(g, 4, 4096, True, _PREFILL)


def cascade(g):
    """32k shared prefix x B=128 + 256 unique: the levels timed apart, prefix-level configs."""
    B, prefix, uniq, Hq, Hkv, D, page = 128, 32768, 256, 32, 8, 128, 16
    np_, nu = prefix // page, uniq // page
    P = np_ + B * nu
    cache = torch.randn(P, 2, page, Hkv, D, dtype=DT, device="cuda")
    perm = torch.randperm(P, device="cuda").int()
    pre, uq = perm[:np_], perm[np_:].view(B, nu)
    q = torch.randn(B, Hq, D, dtype=DT, device="cuda")
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    ar = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    dec = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
    dec.plan(ar * (np_ + nu), torch.cat([pre.expand(B, np_), uq], 1).reshape(-1).contiguous(),
             torch.full((B,), page, dtype=torch.int32, device="cuda"), Hq, Hkv, D, page, q_data_type=DT)
    want = dec.run(q, cache)
    tdec = time_fn(lambda: dec.run(q, cache), [()], device="cuda", graph=True)
    row = [f"cascade: plain decode {tdec * 1e3:.0f} us"]
    flops = 4 * B * Hq * D * prefix
    variants = [("default", None, None, None), ("(64,8,3) sp=2", None, (64, 8, 3), 2),
                ("(128,8,3) sp=1", None, (128, 8, 3), 1), ("BM=64 (64,4,3) sp=1", 64, (64, 4, 3), 1)]
    variants += [(f"{n} page_ahead={pa}", bm, cfg, sp, pa) for n, bm, cfg, sp in variants[:1] for pa in (1, 2)]
    # the shared level (128 query rows per key) through the gathered-K/V path: its K/V copied
    # into contiguous scratch, then the ragged kernel (TMA key tiles)
    variants += [("gather", None, None, None, None, 64), ("gather (128,8,3) sp=1", None, (128, 8, 3), 1, None, 64),
                 ("default", None, None, None)]
    for name, bm, cfg, sp, *extra in variants:
        pa = extra[0] if extra else None
        min_rows = extra[1] if len(extra) > 1 else prefill_mod.PAGED_GATHER_MIN_ROWS_PER_KEY
        with _patched(block_m=bm, cfg=cfg, split=sp, page_ahead=pa), \
                mock.patch.object(prefill_mod, "PAGED_GATHER_MIN_ROWS_PER_KEY", min_rows):
            casc = fo.MultiLevelCascadeAttentionWrapper(2, ws)
            casc.plan([i32([0, B]), ar], [i32([0, np_]), ar * nu], [pre, uq.reshape(-1)],
                      [i32([page]), torch.full((B,), page, dtype=torch.int32, device="cuda")], Hq, Hkv, D, page,
                      q_data_type=DT)
            err = (casc.run(q, cache).float() - want.float()).abs().max().item()
            w0, w1 = casc._batch_prefill_wrappers
            t = time_fn(lambda: casc.run(q, cache), [()], device="cuda", graph=True)
            t0 = time_fn(lambda: w0.run(q, cache, return_lse=True), [()], device="cuda", graph=True)
            t1 = time_fn(lambda: w1.run(q, cache, return_lse=True), [()], device="cuda", graph=True)
            ns = int((w0._t.split_work[::4] >= 0).sum())
        row.append(f"{name}: total {t * 1e3:.0f} us = {tdec / t:.2f}x; prefix level {t0 * 1e3:.0f} us "
                   f"({flops / t0 / 1e9:.0f} TFLOP/s, {ns} split items, BM={w0._plan.block_m}), unique level "
                   f"{t1 * 1e3:.0f} us, err {err:.1e}")
    print("\n  ".join(row), flush=True)


def ahead(g):
    """Paged loops: page ids one key tile ahead (in the chain that issues the next tile's K/V
    copies) or two (off it), at the heuristics' configs."""
    _decode_rows(g, [(64, 4096, 32, 8), (16, 8192, 32, 8), (1, 32768, 32, 8), (1, 32768, 32, 4),
                     (256, 2048, 32, 4), (8, 256, 32, 8), (16, 1024, 32, 8), (1, 4096, 32, 8), (1, 128, 32, 8)],
                 _DECODE_CFGS[:1] + [("(64,4,3)", (64, 4, 3))], aheads=(1, 2))
    _prefill_row(g, 4, 4096, True, [("BM=128 (64,8,3) ahead=1", 128, (64, 8, 3), False, 1),
                                    ("BM=128 (64,8,3) ahead=2", 128, (64, 8, 3), False, 2)])


def merge(g):
    """Merge-kernel configs (ROWS, SPLIT_BLOCK, BLOCK_D, warps) and split chunk floors, for the
    split decode cases."""
    _decode_rows(g, [(1, 32768, 32, 4), (1, 32768, 32, 8), (16, 8192, 32, 8), (1, 4096, 32, 8)], _DECODE_CFGS[:1],
                 min_chunks=(None, 512), merges=(None, (4, 64, 16, 4), (4, 32, 32, 4), (4, 128, 8, 8), (4, 16, 32, 4)))


def chunks(g):
    """Split chunk floors for the few-program decode cases (with the group-chunked merge)."""
    _decode_rows(g, [(16, 1024, 32, 8), (16, 1024, 32, 4), (8, 256, 32, 8), (1, 4096, 32, 8), (1, 512, 32, 8),
                     (4, 4096, 32, 8), (32, 1024, 32, 8)], _DECODE_CFGS[:1], min_chunks=(None, 128, 256, 512))


def warps(g):
    """Few-program decode launches are bound by per-warp instruction latency (ncu): more warps
    per tile, narrower key tiles, at the heuristics' splits."""
    _decode_rows(g, [(1, 128, 32, 8), (8, 256, 32, 8), (32, 64, 32, 8), (1, 512, 32, 8), (1, 4096, 32, 8),
                     (16, 1024, 32, 8), (1, 32768, 32, 8)],
                 [("default", None), ("(64,8,3)", (64, 8, 3)), ("(64,8,2)", (64, 8, 2)), ("(32,8,3)", (32, 8, 3)),
                  ("(32,4,4)", (32, 4, 4)), ("(16,4,4)", (16, 4, 4)), ("(64,2,3)", (64, 2, 3))])


def small(g):
    """The few-program decode cases at the heuristics' choice (8 and 4 KV heads)."""
    _decode_rows(g, [(1, 128, 32, 8), (8, 256, 32, 8), (32, 64, 32, 8), (1, 512, 32, 8), (1, 4096, 32, 8),
                     (16, 1024, 32, 8), (1, 512, 32, 4), (1, 4096, 32, 4), (16, 1024, 32, 4), (4, 4096, 32, 8)],
                 _DECODE_CFGS[:2])


def _kernel_table(fn, reps=30):
    """Mean device microseconds per kernel name over ``reps`` eager calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    acc = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n = e.name if len(e.name) < 60 else e.name[:57] + "..."
            acc[n] = acc.get(n, 0.0) + e.time_range.elapsed_us()
    return sorted(((t / reps, n) for n, t in acc.items()), reverse=True)


_PROFILE_CASES = [(1, 128, 32, 8), (8, 256, 32, 8), (32, 64, 32, 8), (1, 512, 32, 8), (1, 4096, 32, 8),
                  (1, 32768, 32, 8), (1, 32768, 32, 4), (16, 1024, 32, 8), (16, 8192, 32, 8)]


def profile(g):
    """Where a decode call's device time goes: kernels per call, ours and SDPA's. Cases from
    ``PROFILE_CASES="B,L,HQ,HKV;..."`` if set."""
    env = os.environ.get("PROFILE_CASES")
    cases = [tuple(int(x) for x in c.split(",")) for c in env.split(";")] if env else _PROFILE_CASES
    for B, L, Hq, Hkv in cases:
        d = _Paged(B, L, Hq, Hkv, 128, 16, DT, "cuda", g, 1)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        w = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
        w.plan(d.indptr, d.indices, d.last, Hq, Hkv, 128, 16, q_data_type=DT)
        q, c, k, v = d.sets[0]
        rows = [f"profile decode B={B} L={L} {Hq}/{Hkv}"]
        for name, fn in (("flashops", lambda w=w: w.run(q, c)), ("sdpa", lambda: _sdpa_decode(q, k, v))):
            tab = _kernel_table(fn)
            rows.append(f"{name}: {sum(t for t, _ in tab):.1f} us in kernels: "
                        + "; ".join(f"{n} {t:.1f}" for t, n in tab))
        print("\n  ".join(rows), flush=True)
        del d, w


def main(argv):
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in argv or ["decode", "little", "split", "paged_prefill", "prefill", "cascade"]:
        try:
            globals()[name](g)
        except Exception as e:  # noqa: BLE001 - one failing section must not cost the others
            print(f"{name} FAILED: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
