"""Paged-KV attention (decode and prefill wrappers, multi-level cascade) beside torch SDPA on the
same KV laid out dense, compiled ``flex_attention``, and the machine's ceilings.

Cases (bf16, D=128, page 16 NHD with shuffled page ids unless noted):
  decode      H 32q/8kv and 32q/4kv, B in {1, 16, 64, 256}, kv_len 512..32k (memory-bound:
              bytes = K+V read once + q + o; compare GB/s with the read ceiling)
  little      tiny KV (B*kv_len <= 4k tokens): launch/latency-bound, CUDA-graph replays
  page1       page_size 1 beside page_size 16 (same B, kv_len): target >= 90% of page 16
  prefill     causal, 32q/8kv, >= 16k new tokens: ragged (B=4 x 4096, B=1 x 16384) and paged
              (B=4 x 4096); flops = 4 * D * H * (exact count of visible (row, key) pairs)
  cascade     32k-token prefix shared by B=128 requests + 256 unique tokens each, one query per
              request: MultiLevelCascadeAttentionWrapper vs plain decode over the flattened pages
Peers: ``sdpa`` = ``F.scaled_dot_product_attention`` on dense ``[B, H, L, D]`` K/V (decode: GQA
via ``enable_gqa``; prefill: the flash backend on K/V expanded to all heads beforehand), ``flex``
= ``torch.compile(flex_attention)`` (a few cases: each shape compiles). Every peer is checked
against flashops before timing. Decode/little/cascade are timed as CUDA-graph replays (launch
overhead out), with input sets rotated until they exceed L2.

Set ``FLASHOPS_BENCH_ATTENTION=decode,prefill`` (any of decode, little, page1, prefill, cascade)
to run a subset.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

_COLD_BYTES = 256 << 20  # rotate input sets until one round moves this much (> 50 MB L2)
_WS = 256 << 20


def _sections():
    s = os.environ.get("FLASHOPS_BENCH_ATTENTION", "")
    return set(s.split(",")) if s else {"decode", "little", "page1", "prefill", "cascade"}


def _check(name, got, want, tol=3e-2):
    """True if the peer agrees with flashops; a disagreement is printed and the peer not timed."""
    err = (got.float() - want.float()).abs().max().item()
    ok = err <= tol * max(1.0, want.float().abs().max().item())
    if not ok:
        print(f"attention suite: {name} DISAGREES with flashops (max err {err}); not timed", flush=True)
    return ok


def _record(ctx, case, impl, ms, **kw):
    row = ctx.record(case, impl, ms, **kw)
    rate = f"{row.gbps:.0f} GB/s" if row.gbps else (f"{row.tflops:.0f} TFLOP/s" if row.tflops else "")
    print(f"  {case} | {impl} | {ms * 1e3:.1f} us | {rate}", flush=True)  # survives a timeout


def _peer(name, make):
    """A peer callable, or None (printed) when this torch cannot build it."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - a missing peer must not cost the other rows
        print(f"attention suite: peer {name} unavailable: {type(e).__name__}: {e}", flush=True)
        return None


class _Paged:
    """``n_sets`` paged caches of B requests x kv_len tokens (shuffled pages) and their dense
    ``[B, H_kv, L, D]`` copies for the peers."""

    def __init__(self, B, L, Hq, Hkv, D, page, dtype, dev, g, n_sets, qo_len=1, dense=True, layout="NHD"):
        per = math.ceil(L / page)
        self.P = B * per
        self.indices = torch.randperm(self.P, generator=g, device=dev).int()
        self.indptr = (torch.arange(B + 1, device=dev, dtype=torch.int32) * per)
        self.last = torch.full((B,), L - (per - 1) * page, dtype=torch.int32, device=dev)
        self.qo_indptr = torch.arange(B + 1, device=dev, dtype=torch.int32) * qo_len
        self.sets = []
        for _ in range(n_sets):
            shape = (self.P, 2, page, Hkv, D) if layout == "NHD" else (self.P, 2, Hkv, page, D)
            cache = torch.empty(shape, dtype=dtype, device=dev).normal_(generator=g)
            q = torch.empty(B * qo_len, Hq, D, dtype=dtype, device=dev).normal_(generator=g)
            dk = dv = None
            if dense:
                kv = cache if layout == "NHD" else cache.transpose(2, 3)
                x = kv[self.indices.long()].view(B, per, 2, page, Hkv, D).transpose(1, 2)
                x = x.reshape(B, 2, per * page, Hkv, D)[:, :, :L]  # [B, 2, L, H, D]
                dk = x[:, 0].transpose(1, 2).contiguous()
                dv = x[:, 1].transpose(1, 2).contiguous()
            self.sets.append((q, cache, dk, dv))


def _sdpa_decode(q, k, v):
    B = k.shape[0]
    return F.scaled_dot_product_attention(q.view(B, -1, q.shape[1], q.shape[2]).transpose(1, 2), k, v, enable_gqa=True)


def _decode_case(ctx, fo, label, B, L, Hq, Hkv, D, page, dtype, g, *, flex=False, sdpa=True, layout="NHD"):
    dev = ctx.device
    es = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = 2 * B * L * Hkv * D * es
    nbytes = kv_bytes + 2 * B * Hq * D * es
    n_sets = 1 if ctx.quick else max(1, min(16, math.ceil(_COLD_BYTES / kv_bytes)))
    d = _Paged(B, L, Hq, Hkv, D, page, dtype, dev, g, n_sets, dense=sdpa, layout=layout)
    w = fo.BatchDecodeWithPagedKVCacheWrapper(torch.empty(_WS, dtype=torch.uint8, device=dev), layout)
    w.plan(d.indptr, d.indices, d.last, Hq, Hkv, D, page, q_data_type=dtype)
    ours = lambda q, c, k, v: w.run(q, c)  # noqa: E731
    impls = []
    if sdpa:
        impls.append(("sdpa", lambda q, c, k, v: _sdpa_decode(q, k, v)))
    if flex and dev == "cuda":
        def make_flex():
            from torch.nn.attention.flex_attention import flex_attention

            fx = torch.compile(flex_attention, dynamic=False)
            fn = lambda q, c, k, v: fx(q.view(B, 1, Hq, D).transpose(1, 2), k, v, enable_gqa=True)  # noqa: E731
            fn(*d.sets[0])
            return fn

        fx = _peer("flex", make_flex)
        if fx is not None:
            impls.append(("flex", fx))
    want = ours(*d.sets[0])
    impls = [(n, f) for n, f in impls if _check(f"{n} ({label})", f(*d.sets[0]).transpose(1, 2).reshape(B, Hq, D), want)]
    for name, fn in impls + [("flashops", ours)]:
        _record(ctx, label, name, ctx.time(fn, d.sets, graph=True), bytes=nbytes)
    del d, w


def _visible_pairs(qo_lens, kv_lens, causal):
    return sum((sum(min(kv, kv - qo + r + 1) for r in range(qo)) if causal else qo * kv)
               for qo, kv in zip(qo_lens, kv_lens))


def _prefill_cases(ctx, fo, g, dtype):
    dev, quick = ctx.device, ctx.quick
    Hq, Hkv, D = (4, 2, 32) if quick else (32, 8, 128)
    shapes = [(2, 64)] if quick else [(4, 4096), (1, 16384)]
    for B, L in shapes:
        flops = 4 * D * Hq * _visible_pairs([L] * B, [L] * B, True)
        q = torch.empty(B * L, Hq, D, dtype=dtype, device=dev).normal_(generator=g)
        k = torch.empty(B * L, Hkv, D, dtype=dtype, device=dev).normal_(generator=g)
        v = torch.empty(B * L, Hkv, D, dtype=dtype, device=dev).normal_(generator=g)
        indptr = torch.arange(B + 1, device=dev, dtype=torch.int32) * L
        ws = torch.empty(_WS, dtype=torch.uint8, device=dev)
        rag = fo.BatchPrefillWithRaggedKVCacheWrapper(ws)
        rag.plan(indptr, indptr, Hq, Hkv, D, causal=True, q_data_type=dtype)
        # dense peers: [B, H, L, D], K/V expanded to all query heads beforehand
        qd = q.view(B, L, Hq, D).transpose(1, 2).contiguous()
        kd = k.view(B, L, Hkv, D).transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
        vd = v.view(B, L, Hkv, D).transpose(1, 2).repeat_interleave(Hq // Hkv, 1).contiguous()
        label = f"prefill causal ragged B={B} L={L} H={Hq}/{Hkv} D={D} bf16"
        want = rag.run(q, k, v)
        impls = []
        if dev == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa(qd, kd, vd):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        else:
            def sdpa(qd, kd, vd):
                return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        impls.append(("sdpa-flash", lambda: sdpa(qd, kd, vd)))
        if dev == "cuda" and B == 4:
            def make_flex():
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device=dev)
                fx = torch.compile(flex_attention, dynamic=False)
                fx(qd, kd, vd, block_mask=bm)
                return lambda: fx(qd, kd, vd, block_mask=bm)

            fx = _peer("flex", make_flex)
            if fx is not None:
                impls.append(("flex", fx))
        impls = [(n, f) for n, f in impls if _check(f"{n} ({label})", f().transpose(1, 2).reshape(B * L, Hq, D), want)]
        for name, fn in impls + [("flashops", lambda: rag.run(q, k, v))]:
            _record(ctx, label, name, ctx.time(fn), flops=flops)
        if B == shapes[0][0]:  # the same problem through the paged wrapper
            page = 16 if not quick else 5
            d = _Paged(B, L, Hq, Hkv, D, page, dtype, dev, g, 1, qo_len=L, dense=False)
            pw = fo.BatchPrefillWithPagedKVCacheWrapper(ws)
            pw.plan(d.qo_indptr, d.indptr, d.indices, d.last, Hq, Hkv, D, page, causal=True, q_data_type=dtype)
            qp, cache = d.sets[0][0], d.sets[0][1]
            lbl = f"prefill causal paged B={B} L={L} H={Hq}/{Hkv} D={D} page={page} bf16"
            _record(ctx, lbl, "flashops", ctx.time(lambda: pw.run(qp, cache)), flops=flops)
            del d, pw
        del q, k, v, qd, kd, vd


def _cascade_case(ctx, fo, g, dtype):
    dev, quick = ctx.device, ctx.quick
    B, prefix, uniq, Hq, Hkv, D, page = (4, 64, 8, 4, 2, 32, 4) if quick else (128, 32768, 256, 32, 8, 128, 16)
    np_, nu = prefix // page, uniq // page
    P = np_ + B * nu
    cache = torch.empty(P, 2, page, Hkv, D, dtype=dtype, device=dev).normal_(generator=g)
    perm = torch.randperm(P, generator=g, device=dev).int()
    pre_pages, uniq_pages = perm[:np_], perm[np_:].view(B, nu)
    q = torch.empty(B, Hq, D, dtype=dtype, device=dev).normal_(generator=g)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    ws = torch.empty(_WS, dtype=torch.uint8, device=dev)
    casc = fo.MultiLevelCascadeAttentionWrapper(2, ws)
    casc.plan([i32([0, B]), torch.arange(B + 1, dtype=torch.int32, device=dev)],
              [i32([0, np_]), torch.arange(B + 1, dtype=torch.int32, device=dev) * nu],
              [pre_pages, uniq_pages.reshape(-1)], [i32([page]), torch.full((B,), page, dtype=torch.int32, device=dev)],
              Hq, Hkv, D, page, q_data_type=dtype)
    flat = torch.cat([pre_pages.expand(B, np_), uniq_pages], dim=1).reshape(-1).contiguous()
    dec = fo.BatchDecodeWithPagedKVCacheWrapper(ws)
    dec.plan(torch.arange(B + 1, dtype=torch.int32, device=dev) * (np_ + nu), flat,
             torch.full((B,), page, dtype=torch.int32, device=dev), Hq, Hkv, D, page, q_data_type=dtype)
    want = dec.run(q, cache)
    if not _check("cascade", casc.run(q, cache), want):
        raise AssertionError("attention suite: the cascade wrapper disagrees with plain decode")
    es = torch.tensor([], dtype=dtype).element_size()
    label = f"cascade prefix={prefix} shared by B={B} + {uniq} unique, decode H={Hq}/{Hkv} D={D} bf16"
    _record(ctx, label, "flashops-decode (flat)", ctx.time(lambda: dec.run(q, cache), graph=True),
            bytes=2 * B * (prefix + uniq) * Hkv * D * es)
    _record(ctx, label, "flashops-cascade", ctx.time(lambda: casc.run(q, cache), graph=True),
            bytes=2 * (prefix + B * uniq) * Hkv * D * es)


def run(ctx):
    import torch_flashops as fo

    dev, quick = ctx.device, ctx.quick
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16
    sections = _sections()
    D = 32 if quick else 128
    if "decode" in sections:
        grid = [(2, 48)] if quick else [(1, 512), (1, 4096), (1, 32768), (16, 512), (16, 1024), (16, 4096),
                                        (16, 8192), (16, 32768),
                                        (64, 512), (64, 4096), (64, 16384), (256, 512), (256, 2048), (256, 8192)]
        heads = [(4, 2)] if quick else [(32, 8), (32, 4)]
        flex_at = {(16, 16384), (64, 4096)}
        for Hq, Hkv in heads:
            for B, L in ctx.progress(grid, desc=f"decode {Hq}/{Hkv}"):
                label = f"decode B={B} L={L} H={Hq}/{Hkv} D={D} page=16 bf16"
                _decode_case(ctx, fo, label, B, L, Hq, Hkv, D, 16, dt, g, flex=(B, L) in flex_at and Hkv == 8)
    if "cascade" in sections:
        _cascade_case(ctx, fo, g, dt)
    if "prefill" in sections:
        _prefill_cases(ctx, fo, g, dt)
    if "page1" in sections:
        for B, L in ([(2, 40)] if quick else [(64, 4096), (16, 16384)]):
            for page, layout in ((16, "NHD"), (1, "NHD"), (16, "HND")):
                Hq, Hkv = (4, 2) if quick else (32, 8)
                label = f"decode B={B} L={L} H={Hq}/{Hkv} D={D} page={page} {layout} bf16"
                _decode_case(ctx, fo, label, B, L, Hq, Hkv, D, page, dt, g, sdpa=page == 16 and layout == "NHD",
                             layout=layout)
    if "little" in sections:
        Hq, Hkv = (4, 2) if quick else (32, 8)
        for B, L in ([(1, 16)] if quick else [(1, 128), (8, 256), (32, 64)]):
            _decode_case(ctx, fo, f"decode little-KV B={B} L={L} H={Hq}/{Hkv} D={D} bf16", B, L, Hq, Hkv, D, 16, dt, g)
