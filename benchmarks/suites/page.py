"""Paged-KV append (page family) against a plain-PyTorch ``index_put_`` peer, eager and compiled.

append_paged_kv_cache is a scatter copy: every appended K/V row is read once and written once
into its page slot. Bytes that must move: ``2 * nnz * H * (D + D_v) * elem`` (read + write)
plus the per-row indices (batch index, position, page id: 12 bytes a row). The ceiling to
compare with is the device copy bandwidth (read+write), and the target is >= 85% of it for
large nnz.

Cases (H_kv=8, D=128, bf16, page ids shuffled over the whole cache):
  decode      B=128 requests of 1024 tokens, one new token each (CUDA-graph replay timing)
  prefill     nnz=4096 (4 x 1024) and nnz=65536 (16 x 4096) new tokens, NHD / HND, 5-D / tuple,
              page_size 16 and 1
  positions   get_batch_indices_positions for nnz=65536, B=16, against a searchsorted peer

Peer: ``torch-eager`` computes each row's page and slot with tensor ops and writes
``k_cache[page, slot] = key`` (index_put_) on views of the same cache; ``torch-compile`` is
that function under torch.compile. Both are checked against flashops before timing.
"""
from __future__ import annotations

import math

import torch

_GRAPH_BELOW = 64 << 20  # calls moving less than this are timed as CUDA-graph replays
_COLD_BYTES = 256 << 20  # rotate input sets until a round trip moves this much (> 50 MB L2)


# ------------------------------------------------------------------ plain-PyTorch peers
def _kv_views(cache, layout):
    k, v = (cache[:, 0], cache[:, 1]) if isinstance(cache, torch.Tensor) else cache
    if layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v


def torch_append(key, value, batch_indices, positions, cache, kv_indices, kv_indptr, page_size, layout):
    """Every row valid (no -1 batch indices): one index_put_ per cache half."""
    x = kv_indptr[batch_indices.long()].long() * page_size + positions
    page = kv_indices[torch.div(x, page_size, rounding_mode="floor")].long()
    slot = x % page_size
    k, v = _kv_views(cache, layout)
    k.index_put_((page, slot), key)
    v.index_put_((page, slot), value)


def torch_batch_indices_positions(append_indptr, seq_lens, nnz):
    t = torch.arange(nnz, device=append_indptr.device)
    ends = append_indptr[1:].long()
    b = torch.searchsorted(ends, t, right=True)
    valid = b < ends.shape[0]
    bc = b.clamp(max=ends.shape[0] - 1)
    pos = seq_lens.long()[bc] - ends[bc] + t
    return torch.where(valid, b, -1).int(), torch.where(valid, pos, 0).int()


# ------------------------------------------------------------------------------ inputs
def _batch(B, seq_len, append_len, page_size, H, D, layout, form, dtype, device, g):
    """B requests of ``seq_len`` tokens whose last ``append_len`` are new; shuffled page ids."""
    pages_per = math.ceil(seq_len / page_size)
    P = B * pages_per
    kv_indices = torch.randperm(P, generator=g, device=g.device).to(torch.int32).to(device)
    kv_indptr = (torch.arange(B + 1, dtype=torch.int32) * pages_per).to(device)
    last = torch.full((B,), seq_len - (pages_per - 1) * page_size, dtype=torch.int32, device=device)
    append_indptr = (torch.arange(B + 1, dtype=torch.int32) * append_len).to(device)
    shape = (P, 2, page_size, H, D) if layout == "NHD" else (P, 2, H, page_size, D)
    cache = torch.empty(shape, dtype=dtype, device=device).normal_(generator=g)
    if form == "tuple":
        cache = tuple(cache.unbind(1))
        cache = (cache[0].contiguous(), cache[1].contiguous())
    return dict(kv_indices=kv_indices, kv_indptr=kv_indptr, last=last, append_indptr=append_indptr, cache=cache,
                nnz=B * append_len)


def _rows(nnz, H, D, dtype, device, g, n_sets):
    return [(torch.empty(nnz, H, D, dtype=dtype, device=device).normal_(generator=g),
             torch.empty(nnz, H, D, dtype=dtype, device=device).normal_(generator=g)) for _ in range(n_sets)]


def _same_cache(a, b):
    a = (a,) if isinstance(a, torch.Tensor) else a
    b = (b,) if isinstance(b, torch.Tensor) else b
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _clone(cache):
    return cache.clone() if isinstance(cache, torch.Tensor) else tuple(c.clone() for c in cache)


# -------------------------------------------------------------------------------- cases
def run(ctx):
    import torch_flashops as fo

    dev, quick = ctx.device, ctx.quick
    g = torch.Generator(device=dev).manual_seed(0)
    dt = torch.bfloat16
    H, D = (2, 32) if quick else (8, 128)
    es = torch.tensor([], dtype=dt).element_size()
    #        name       B    seq_len append page layout form
    cases = [("decode", 4, 40, 1, 16, "NHD", "5d")] if quick else [
        ("decode", 128, 1024, 1, 16, "NHD", "5d"),
        ("prefill", 4, 1024, 1024, 16, "NHD", "5d"),
        ("prefill", 16, 4096, 4096, 16, "NHD", "5d"),
        ("prefill", 16, 4096, 4096, 16, "HND", "5d"),
        ("prefill", 16, 4096, 4096, 16, "NHD", "tuple"),
        ("prefill", 16, 4096, 4096, 1, "NHD", "5d"),
    ]
    if quick:
        cases.append(("prefill", 2, 48, 48, 5, "HND", "tuple"))

    for name, B, seq_len, append_len, page_size, layout, form in ctx.progress(cases, desc="append_paged_kv_cache"):
        d = _batch(B, seq_len, append_len, page_size, H, D, layout, form, dt, dev, g)
        nnz = d["nnz"]
        nbytes = 2 * nnz * H * 2 * D * es + 12 * nnz
        n_sets = 1 if quick else max(1, min(8, math.ceil(_COLD_BYTES / nbytes)))
        rows = _rows(nnz, H, D, dt, dev, g, n_sets)
        seq = fo.get_seq_lens(d["kv_indptr"], d["last"], page_size)
        bi, pos = fo.get_batch_indices_positions(d["append_indptr"], seq, nnz)
        cache = d["cache"]

        def ours(key, value):
            fo.append_paged_kv_cache(key, value, bi, pos, cache, d["kv_indices"], d["kv_indptr"], d["last"], layout)

        def peer(key, value, _fn=torch_append):
            _fn(key, value, bi, pos, cache, d["kv_indices"], d["kv_indptr"], page_size, layout)

        impls = [("torch-eager", peer)]
        if dev == "cuda" or not quick:  # Inductor on CPU costs ~10 s per shape
            compiled = torch.compile(torch_append, dynamic=False)
            impls.append(("torch-compile", lambda k, v, _c=compiled: peer(k, v, _fn=_c)))
        impls.append(("flashops", ours))

        # Peers must produce the same cache before their time means anything.
        start = _clone(cache)
        ours(*rows[0])
        want = _clone(cache)
        for label, fn in impls[:-1]:
            for dst, src in zip((cache,) if isinstance(cache, torch.Tensor) else cache,
                                (start,) if isinstance(start, torch.Tensor) else start):
                dst.copy_(src)
            fn(*rows[0])
            if not _same_cache(cache, want):
                raise AssertionError(f"page suite: {label} disagrees with flashops ({name})")
        del start, want

        graph = dev == "cuda" and nbytes < _GRAPH_BELOW
        label = (f"append {name} nnz={nnz} (B={B}) H={H} D={D} page={page_size} {layout} "
                 f"{'5-D' if form == '5d' else 'tuple'} bf16")
        for impl, fn in impls:
            ctx.record(label, impl, ctx.time(fn, rows, graph=graph), bytes=nbytes)
        del d, rows, cache, bi, pos

    # get_batch_indices_positions: CSR -> per-token (request, position).
    B, L = (2, 24) if quick else (16, 4096)
    nnz = B * L
    append_indptr = (torch.arange(B + 1, dtype=torch.int32) * L).to(dev)
    seq_lens = torch.full((B,), L + 100, dtype=torch.int32, device=dev)
    got = fo.get_batch_indices_positions(append_indptr, seq_lens, nnz)
    want = torch_batch_indices_positions(append_indptr, seq_lens, nnz)
    if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
        raise AssertionError("page suite: batch indices/positions peer disagrees with flashops")
    impls = [("torch-eager", torch_batch_indices_positions)]
    if dev == "cuda" or not quick:
        impls.append(("torch-compile", torch.compile(torch_batch_indices_positions, dynamic=False)))
    impls.append(("flashops", fo.get_batch_indices_positions))
    nbytes = 8 * nnz + 8 * B
    for impl, fn in impls:
        ms = ctx.time(fn, [(append_indptr, seq_lens, nnz)], graph=dev == "cuda")
        ctx.record(f"batch_indices_positions nnz={nnz} B={B}", impl, ms, bytes=nbytes)
