"""Paged-KV utilities (FlashInfer's ``flashinfer.page``): sequence lengths, batch indices and
positions of appended tokens, and appending K/V to a paged cache (spec/attention.md §1).

The cache forms (spec §0.2) are normalised in one place, ``_unpack_paged_kv_cache``, which the
attention wrappers reuse: it validates a cache given in any of its forms and returns K/V views
ordered ``[P, page_size, H_kv, D]`` plus the sizes and the tensors an op must receive.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _config
from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_indptr_values, check_range_values, check_tensor, expect,
                      reject_fp8, spans_intersect)
from ._selfcheck import CheckResult, max_abs_err, selfcheck
from .meta.page import check_kv_layout, paged_kv_views
from .ops import page as ops
from .reference import page as reference

__all__ = ["append_paged_kv_cache", "get_batch_indices_positions", "get_seq_lens"]

PagedKVCacheArg = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class PagedKV(NamedTuple):
    """A paged KV cache in canonical form (see ``_unpack_paged_kv_cache``)."""

    k: torch.Tensor  # [P, page_size, H_kv, D]    view of the caller's storage
    v: torch.Tensor  # [P, page_size, H_kv, D_vo] view of the caller's storage
    num_pages: int  # P
    page_size: int
    num_kv_heads: int  # H_kv
    head_dim: int  # D   (K's last dim)
    head_dim_vo: int  # D_vo (V's last dim; == D for a single combined tensor)
    op_args: Tuple[torch.Tensor, Optional[torch.Tensor]]  # what an op receives, see below


def _unpack_paged_kv_cache(paged_kv_cache: PagedKVCacheArg, kv_layout: str = "NHD", *, name: str = "paged_kv_cache") -> PagedKV:
    """Validate a paged KV cache in any of its forms and describe it canonically.

    Parameters
    ----------
    paged_kv_cache : torch.Tensor or tuple of two torch.Tensor
        * one tensor: 5-D ``[P, 2, page_size, H_kv, D]`` (NHD) / ``[P, 2, H_kv, page_size, D]``
          (HND), ``[:, 0]`` = K, ``[:, 1]`` = V; or 4-D ``[P, 2, H_kv, D]`` meaning
          ``page_size == 1``;
        * a tuple/list ``(k_cache, v_cache)``: 4-D ``[P, page_size, H_kv, D]`` (NHD) /
          ``[P, H_kv, page_size, D]`` (HND), or 3-D ``[P, H_kv, D]`` (page_size 1); the two
          agree in P, page_size, H_kv, dtype and device; V's last dim may differ from K's.
        fp16, bf16 or fp32; ``stride(-1) == 1``, all other strides arbitrary.
    kv_layout : str
        ``"NHD"`` or ``"HND"``; anything else raises ``KeyError`` (as FlashInfer).
    name : str
        Argument name used in error messages.

    Returns
    -------
    PagedKV
        ``k``, ``v``: 4-D views ordered ``[P, page_size, H_kv, D]`` / ``[..., D_vo]`` whatever
        the layout (HND views are transposed, not copied): a kernel indexes page p, slot s,
        head h, dim d at ``p*stride(0) + s*stride(1) + h*stride(2) + d``. Read-only consumers
        (attention) can pass these views to an op. ``num_pages``, ``page_size``,
        ``num_kv_heads``, ``head_dim``, ``head_dim_vo``: the sizes (SymInts under dynamic
        shapes). ``op_args``: ``(cache, None)`` for a single tensor or ``(k_cache, v_cache)``
        for a pair -- the caller's own tensors, which is what an op that *writes* the cache
        must receive (never ``k``/``v`` views of one storage as two mutable arguments); the op
        rebuilds the views with ``meta.page.paged_kv_views(*op_args, kv_layout)``.

    Raises
    ------
    KeyError
        unknown ``kv_layout``.
    ValueError
        wrong type, rank, shape agreement, dtype, device mismatch, ``stride(-1) != 1``,
        or a zero page_size / head count / head dim (the message names the argument).
    NotImplementedError
        fp8 caches (reserved).
    """
    check_kv_layout(kv_layout)
    if isinstance(paged_kv_cache, (tuple, list)):
        expect(len(paged_kv_cache) == 2, name, lambda: f"a tuple cache must be (k_cache, v_cache), got {len(paged_kv_cache)} items")
        kc, vc = paged_kv_cache
        nk, nv = f"{name}[0]", f"{name}[1]"
        check_tensor(kc, nk, ndim=(3, 4))
        check_tensor(vc, nv, ndim=(3, 4))
        expect(kc.dim() == vc.dim(), nv, lambda: f"rank {vc.dim()} does not match k_cache rank {kc.dim()}")
        expect(vc.dtype == kc.dtype, nv, lambda: f"dtype {vc.dtype} does not match k_cache dtype {kc.dtype}")
        expect(vc.device == kc.device, nv, lambda: f"device {vc.device} does not match k_cache device {kc.device}")
        expect(kc.shape[:-1] == vc.shape[:-1], nv,
               lambda: f"shape {tuple(vc.shape)} must agree with k_cache {tuple(kc.shape)} in all but the last dim (pages, page_size, heads)")
        op_args = (kc, vc)
    else:
        check_tensor(paged_kv_cache, name, ndim=(4, 5))
        expect(paged_kv_cache.shape[1] == 2, name, lambda: f"dim 1 must be 2 (K and V), got shape {tuple(paged_kv_cache.shape)}")
        op_args = (paged_kv_cache, None)
        nk = name
    dtype = op_args[0].dtype
    reject_fp8(dtype, name)
    expect(dtype in FLOAT_DTYPES, nk, lambda: f"dtype {dtype} not supported (expected float16, bfloat16 or float32)")
    k, v = paged_kv_views(op_args[0], op_args[1], kv_layout)
    num_pages, page_size, num_kv_heads, head_dim = k.shape
    expect(page_size >= 1 and num_kv_heads >= 1 and head_dim >= 1 and v.shape[-1] >= 1, nk,
           lambda: f"page_size, num_kv_heads and head dims must be >= 1, got shape {tuple(op_args[0].shape)} ({kv_layout})")
    return PagedKV(k, v, num_pages, page_size, num_kv_heads, head_dim, v.shape[-1], op_args)


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """Sequence lengths of the requests of a paged KV cache.

    ``seq_lens[b] = max(kv_indptr[b+1] - kv_indptr[b] - 1, 0) * page_size + kv_last_page_len[b]``
    (plain torch ops: no host sync, traceable).

    Parameters
    ----------
    kv_indptr : torch.Tensor
        int32 (or int64), shape ``[B + 1]``: the page-table CSR offsets.
    kv_last_page_len : torch.Tensor
        int32 (or int64), shape ``[B]``: tokens in each request's last page.
    page_size : int
        Tokens per page.

    Returns
    -------
    torch.Tensor
        shape ``[B]``, the promoted dtype of the inputs (int32 for int32 inputs), same device.
    """
    check_tensor(kv_indptr, "kv_indptr", ndim=1, dtypes=INDEX_DTYPES)
    check_tensor(kv_last_page_len, "kv_last_page_len", ndim=1, dtypes=INDEX_DTYPES, device=kv_indptr.device)
    expect(kv_last_page_len.shape[0] + 1 == kv_indptr.shape[0], "kv_last_page_len",
           lambda: f"shape {tuple(kv_last_page_len.shape)} must be [len(kv_indptr) - 1] = [{kv_indptr.shape[0] - 1}]")
    return torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size + kv_last_page_len


def _check_index_tensor(t, name: str, device, *, length=None) -> None:
    """1-D int32/int64 index tensor on ``device``, optionally of a given length."""
    check_tensor(t, name, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if length is not None:
        expect(t.shape[0] == length, name, lambda: f"shape {tuple(t.shape)} must be [{length}]")


def get_batch_indices_positions(
    append_indptr: torch.Tensor,
    seq_lens: torch.Tensor,
    nnz: int,
    batch_indices: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Request index and absolute position of every appended token (a CSR-to-COO conversion).

    For ``append_indptr[b] <= t < append_indptr[b+1]``: ``batch_indices[t] = b`` and
    ``positions[t] = seq_lens[b] - (append_indptr[b+1] - append_indptr[b]) + (t - append_indptr[b])``,
    i.e. the new tokens sit at the end of each sequence. Slots ``t >= append_indptr[-1]``
    (``nnz`` may exceed the total, e.g. CUDA-graph padding) get ``batch_indices = -1``,
    ``positions = 0``, which ``append_paged_kv_cache`` skips. One kernel, no host sync.

    Parameters
    ----------
    append_indptr : torch.Tensor
        int32 (or int64), shape ``[B + 1]``: CSR offsets of the appended tokens per request.
    seq_lens : torch.Tensor
        int32 (or int64), shape ``[B]``: sequence lengths **after** the append (e.g. from
        ``get_seq_lens``), same device.
    nnz : int
        Number of output slots (``>= append_indptr[-1]``); a NumPy integer or a one-element
        integer tensor is read as an int.
    batch_indices, positions : torch.Tensor, optional
        Preallocated outputs, int32, shape ``[nnz]``, same device: filled in place and returned
        (a missing one is allocated).

    Returns
    -------
    batch_indices : torch.Tensor
        int32, shape ``[nnz]``.
    positions : torch.Tensor
        int32, shape ``[nnz]``.

    Checked mode additionally verifies ``append_indptr`` (starts at 0, non-decreasing),
    ``append_indptr[-1] <= nnz`` and ``append_len_b <= seq_lens[b]``.
    """
    check_tensor(append_indptr, "append_indptr", ndim=1, dtypes=INDEX_DTYPES)
    expect(append_indptr.shape[0] >= 1, "append_indptr", lambda: "must have at least one element")
    device = append_indptr.device
    _check_index_tensor(seq_lens, "seq_lens", device, length=append_indptr.shape[0] - 1)
    nnz = _as_count(nnz, "nnz")
    expect(nnz >= 0, "nnz", lambda: f"must be >= 0, got {nnz}")
    for buf, name in ((batch_indices, "batch_indices"), (positions, "positions")):
        if buf is not None:
            check_tensor(buf, name, ndim=1, dtypes=(torch.int32,), device=device)
            expect(buf.shape[0] == nnz, name, lambda: f"shape {tuple(buf.shape)} must be [nnz] = [{nnz}]")
    if batch_indices is not None and positions is not None and not torch.compiler.is_compiling():
        expect(not spans_intersect(batch_indices, positions), "positions",
               lambda: "shares memory with batch_indices (two outputs)")
    if _config.checks_enabled():
        check_indptr_values(append_indptr, "append_indptr")
        ind = append_indptr.detach().to("cpu", torch.int64)
        expect(int(ind[-1]) <= nnz, "nnz", lambda: f"{nnz} is smaller than append_indptr[-1] = {int(ind[-1])}")
        over = ((ind[1:] - ind[:-1]) > seq_lens.detach().to("cpu", torch.int64)).nonzero()
        expect(over.numel() == 0, "seq_lens",
               lambda: f"must be >= each request's append length (seq_lens counts the appended tokens); first violation at request {int(over[0]) if over.numel() else -1}")
    if batch_indices is None and positions is None:
        return ops.batch_indices_positions(append_indptr, seq_lens, nnz)
    if batch_indices is None:
        batch_indices = torch.empty_like(positions)
    if positions is None:
        positions = torch.empty_like(batch_indices)
    ops.batch_indices_positions_out(append_indptr, seq_lens, batch_indices, positions)
    return batch_indices, positions


def _as_count(x, name: str):
    """An int-like count as an int: a Python int or SymInt as is, a NumPy integer, or a
    one-element integer tensor such as ``append_indptr[-1]`` (read on the host, as FlashInfer's
    ``torch.empty((nnz,))`` does)."""
    if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
        return x
    if isinstance(x, torch.Tensor):
        expect(x.numel() == 1 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool, name,
               lambda: f"expected an int or a one-element integer tensor, got {x.dtype} of shape {tuple(x.shape)}")
        return int(x.item())
    expect(not isinstance(x, bool), name, lambda: "expected an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise ValueError(f"{name}: expected an int, got {type(x).__name__}") from None


def append_paged_kv_cache(
    append_key: torch.Tensor,
    append_value: torch.Tensor,
    batch_indices: torch.Tensor,
    positions: torch.Tensor,
    paged_kv_cache: PagedKVCacheArg,
    kv_indices: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_last_page_len: torch.Tensor,
    kv_layout: str = "NHD",
) -> None:
    """Append new K/V rows to a paged KV cache, in place.

    Row t with ``b = batch_indices[t] >= 0`` goes to logical slot
    ``x = kv_indptr[b] * page_size + positions[t]``: page ``kv_indices[x // page_size]``, offset
    ``x % page_size``. Rows with ``b < 0`` (padding from ``get_batch_indices_positions``) are
    skipped. The pages must already be allocated: the page table includes the new tokens.
    Two rows aimed at one slot: which one lands is unspecified.

    Parameters
    ----------
    append_key : torch.Tensor
        shape ``[nnz, H_kv, D]``, the cache's dtype and device; ``stride(-1) == 1``, other
        strides arbitrary (e.g. a slice of a packed qkv tensor).
    append_value : torch.Tensor
        shape ``[nnz, H_kv, D_vo]``, like ``append_key``.
    batch_indices : torch.Tensor
        int32 (or int64), shape ``[nnz]``: request of each row, ``-1`` to skip it.
    positions : torch.Tensor
        int32 (or int64), shape ``[nnz]``: position of each row within its request.
    paged_kv_cache : torch.Tensor or tuple of two torch.Tensor
        One 5-D tensor ``[P, 2, page_size, H_kv, D]`` (NHD) / ``[P, 2, H_kv, page_size, D]``
        (HND), or a tuple ``(k_cache, v_cache)`` of 4-D ``[P, page_size, H_kv, D]`` /
        ``[P, H_kv, page_size, D]`` tensors; a 4-D single tensor or 3-D tuple members mean
        page_size 1. fp16, bf16 or fp32. Written in place (also inside torch.compile).
    kv_indices : torch.Tensor
        int32 (or int64), shape ``[>= kv_indptr[-1]]``: page ids.
    kv_indptr : torch.Tensor
        int32 (or int64), shape ``[B + 1]``: page-table CSR offsets.
    kv_last_page_len : torch.Tensor
        int32 (or int64), shape ``[B]``. Unused (FlashInfer compatibility); shape-checked.
    kv_layout : str
        ``"NHD"`` (default) or ``"HND"``; other strings raise ``KeyError``.

    Notes
    -----
    Without checked mode, out-of-range indices give unspecified cache contents but never a
    write outside the cache or into another request's pages: rows whose batch index is outside
    ``[0, B)``, whose position falls outside the request's own pages (negative, or past its
    last page; a negative ``kv_indptr`` entry drops the request's rows), whose slot falls outside
    ``kv_indices`` or whose page id falls outside ``[0, P)`` are dropped. Checked mode raises
    ``ValueError`` instead (batch indices ``< B``, ``0 <= positions[t] < n_b * page_size``,
    page ids in ``[0, P)``, ``kv_indptr`` valid, ``len(kv_indices) >= kv_indptr[-1]``), before
    anything is written.
    """
    cache = _unpack_paged_kv_cache(paged_kv_cache, kv_layout)
    device = cache.k.device
    for t, name in ((append_key, "append_key"), (append_value, "append_value")):
        check_tensor(t, name, ndim=3, device=device)
        expect(t.dtype == cache.k.dtype, name, lambda: f"dtype {t.dtype} must match paged_kv_cache's {cache.k.dtype}")
    nnz = append_key.shape[0]
    expect(tuple(append_key.shape[1:]) == (cache.num_kv_heads, cache.head_dim), "append_key",
           lambda: f"shape {tuple(append_key.shape)} must be [nnz, {cache.num_kv_heads}, {cache.head_dim}] (the cache's H_kv, D)")
    expect(tuple(append_value.shape) == (nnz, cache.num_kv_heads, cache.head_dim_vo), "append_value",
           lambda: f"shape {tuple(append_value.shape)} must be [{nnz}, {cache.num_kv_heads}, {cache.head_dim_vo}]")
    _check_index_tensor(batch_indices, "batch_indices", device, length=nnz)
    _check_index_tensor(positions, "positions", device, length=nnz)
    _check_index_tensor(kv_indptr, "kv_indptr", device)
    expect(kv_indptr.shape[0] >= 1, "kv_indptr", lambda: "must have at least one element")
    _check_index_tensor(kv_indices, "kv_indices", device)
    _check_index_tensor(kv_last_page_len, "kv_last_page_len", device, length=kv_indptr.shape[0] - 1)
    if _config.checks_enabled():
        _check_append_values(batch_indices, positions, kv_indices, kv_indptr, cache)
    ops.append_paged_kv_cache(append_key, append_value, batch_indices, positions, *cache.op_args,
                              kv_indices, kv_indptr, kv_layout)


def _check_append_values(batch_indices, positions, kv_indices, kv_indptr, cache: PagedKV) -> None:
    """Checked-mode data checks of ``append_paged_kv_cache`` (one host copy of the indices)."""
    check_indptr_values(kv_indptr, "kv_indptr")
    ind = kv_indptr.detach().to("cpu", torch.int64)
    B, total = ind.shape[0] - 1, int(ind[-1])
    expect(kv_indices.shape[0] >= total, "kv_indices", lambda: f"has {kv_indices.shape[0]} entries, kv_indptr[-1] needs {total}")
    check_range_values(kv_indices[:total], "kv_indices", 0, cache.num_pages)
    b = batch_indices.detach().to("cpu", torch.int64)
    expect(b.numel() == 0 or int(b.max()) < B, "batch_indices", lambda: f"values must be < B = {B} (or negative to skip a row)")
    rows = (b >= 0).nonzero().squeeze(1)
    if rows.numel():
        capacity = (ind[1:] - ind[:-1])[b[rows]] * cache.page_size
        pos = positions.detach().to("cpu", torch.int64)[rows]
        bad = ((pos < 0) | (pos >= capacity)).nonzero()
        if bad.numel():
            r = int(rows[int(bad[0])])
            raise ValueError(f"positions: row {r} has position {int(pos[int(bad[0])])}, outside its request's "
                             f"{int(capacity[int(bad[0])])} allocated slots (request {int(b[r])})")


# --------------------------------------------------------------------------- self-check


@selfcheck("page")
def _page_selfcheck(device) -> list[CheckResult]:
    """Each page op on a small random ragged batch against the reference oracle."""
    g = torch.Generator().manual_seed(0)
    results = []
    lens = torch.tensor([3, 0, 17, 1, 9])
    append_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).int()
    seq_lens = (lens + torch.randint(0, 20, (5,), generator=g)).int()
    nnz = int(append_indptr[-1]) + 3
    bi, pos = get_batch_indices_positions(append_indptr.to(device), seq_lens.to(device), nnz)
    rbi, rpos = reference.ref_batch_indices_positions(append_indptr, seq_lens, nnz)
    results.append(CheckResult("batch_indices_positions", max(max_abs_err(bi, rbi), max_abs_err(pos, rpos)), 0.0))
    bufs = [torch.full((nnz,), 12345, dtype=torch.int32, device=device) for _ in range(2)]
    get_batch_indices_positions(append_indptr.to(device), seq_lens.to(device), nnz, *bufs)
    results.append(CheckResult("batch_indices_positions_out", max(max_abs_err(bufs[0], rbi), max_abs_err(bufs[1], rpos)), 0.0,
                               note="preallocated outputs"))
    page_size, H, D = 5, 4, 32
    pages_per_req = (seq_lens + page_size - 1) // page_size
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.int64), pages_per_req.cumsum(0)]).int()
    P = int(kv_indptr[-1]) + 4
    kv_indices = torch.randperm(P, generator=g)[: int(kv_indptr[-1])].int()
    last = (seq_lens - (pages_per_req - 1).clamp(min=0) * page_size).int()
    seq = get_seq_lens(kv_indptr.to(device), last.to(device), page_size)
    results.append(CheckResult("get_seq_lens", max_abs_err(seq, torch.tensor(reference.ref_seq_lens(kv_indptr, last, page_size))), 0.0))
    # each appended key's (page, slot), for reading the rows back with gather_paged_kv
    n_app = int(append_indptr[-1])
    page = kv_indices[kv_indptr[:-1].long()[rbi[:n_app].long()] + rpos[:n_app].long() // page_size].long()
    slot = (rpos[:n_app] % page_size).long()
    for layout in ("NHD", "HND"):
        for form in ("5-D", "tuple"):
            shape = (P, page_size, H, D) if layout == "NHD" else (P, H, page_size, D)
            kc, vc = (torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))
            key, value = (torch.randn(nnz, H, D, generator=g).to(torch.bfloat16) for _ in range(2))
            exp_k, exp_v = kc.clone(), vc.clone()
            nhd = (lambda x: x) if layout == "NHD" else (lambda x: x.transpose(1, 2))
            reference.ref_append_paged_kv_cache(nhd(exp_k), nhd(exp_v), key, value, rbi, rpos, kv_indices, kv_indptr, page_size)
            dk, dv = kc.to(device), vc.to(device)
            cache = torch.stack([dk, dv], 1) if form == "5-D" else (dk, dv)
            append_paged_kv_cache(key.to(device), value.to(device), bi, pos, cache, kv_indices.to(device),
                                  kv_indptr.to(device), last.to(device), kv_layout=layout)
            got_k, got_v = (cache[:, 0], cache[:, 1]) if form == "5-D" else cache
            err = max(max_abs_err(got_k, exp_k), max_abs_err(got_v, exp_v))
            results.append(CheckResult("append_paged_kv_cache", err, 0.0, note=f"{layout} {form} bf16 page_size={page_size}"))
            # the inverse copy: every appended row back out of the cache, K and V contiguous
            gk, gv = ops.gather_paged_kv(*(cache if form == "tuple" else (cache, None)), layout, page.to(device),
                                         slot.to(device))
            want_k, want_v = nhd(exp_k)[page, slot], nhd(exp_v)[page, slot]
            results.append(CheckResult("gather_paged_kv", max(max_abs_err(gk, want_k), max_abs_err(gv, want_v)), 0.0,
                                       note=f"{layout} {form} bf16"))
    return results
