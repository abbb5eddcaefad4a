"""Plain-PyTorch side of the ``page`` family (spec/attention.md §1).

Two kinds of code live here:
* the test oracle (``ref_*``): straight per-request / per-token loops from the spec's text,
  written for clarity, not speed;
* the CPU backend (functions named like the ops): vectorised torch with exactly the ops'
  signatures and output contracts (fresh contiguous int32 outputs, in-place cache writes,
  rows that the kernel would mask are skipped here too).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..meta.page import paged_kv_views

# --------------------------------------------------------------------------- oracle


def ref_seq_lens(kv_indptr, kv_last_page_len, page_size: int) -> list[int]:
    """``kv_len_b = max(n_b - 1, 0) * page_size + last_b`` per request."""
    ind = [int(v) for v in kv_indptr]
    return [max(ind[b + 1] - ind[b] - 1, 0) * page_size + int(kv_last_page_len[b]) for b in range(len(ind) - 1)]


def ref_batch_indices_positions(append_indptr, seq_lens, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token t of request b (``append_indptr[b] <= t < append_indptr[b+1]``) gets batch index b
    and position ``seq_lens[b] - append_len_b + (t - append_indptr[b])``; slots past the last
    request get ``(-1, 0)``."""
    batch_indices = [-1] * nnz
    positions = [0] * nnz
    ind = [int(v) for v in append_indptr]
    for b in range(len(ind) - 1):
        for t in range(ind[b], min(ind[b + 1], nnz)):
            batch_indices[t] = b
            positions[t] = int(seq_lens[b]) - (ind[b + 1] - ind[b]) + (t - ind[b])
    return torch.tensor(batch_indices, dtype=torch.int32), torch.tensor(positions, dtype=torch.int32)


def ref_append_paged_kv_cache(k_cache, v_cache, append_key, append_value, batch_indices, positions,
                              kv_indices, kv_indptr, page_size: int) -> None:
    """Write row t to page ``kv_indices[x // page_size]``, slot ``x % page_size`` with
    ``x = kv_indptr[b] * page_size + positions[t]``, for every t with ``b = batch_indices[t] >= 0``.

    ``k_cache``/``v_cache``: ``[P, page_size, H, D]``-ordered tensors (for HND caches, the
    caller passes transposed views), written in place, tokens in order.
    """
    for t in range(append_key.shape[0]):
        b = int(batch_indices[t])
        if b < 0:
            continue
        x = int(kv_indptr[b]) * page_size + int(positions[t])
        page = int(kv_indices[x // page_size])
        k_cache[page, x % page_size] = append_key[t]
        v_cache[page, x % page_size] = append_value[t]


# --------------------------------------------------------------------------- CPU backend


def batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int):
    """CPU implementation of ``flashops::batch_indices_positions``."""
    B = append_indptr.shape[0] - 1
    t = torch.arange(nnz, device=append_indptr.device, dtype=torch.int64)
    ends = append_indptr[1:].to(torch.int64).contiguous()
    b = torch.searchsorted(ends, t, right=True)  # number of requests that end at or before t
    valid = b < B
    bc = b.clamp(max=max(B - 1, 0))
    if B > 0:
        pos = seq_lens.to(torch.int64)[bc] - ends[bc] + t
    else:
        pos = torch.zeros_like(t)
    batch_indices = torch.where(valid, b, -1).to(torch.int32)
    positions = torch.where(valid, pos, 0).to(torch.int32)
    return batch_indices, positions


def batch_indices_positions_out(append_indptr, seq_lens, batch_indices, positions) -> None:
    """CPU implementation of ``flashops::batch_indices_positions_out`` (fills the buffers)."""
    bi, pos = batch_indices_positions(append_indptr, seq_lens, batch_indices.shape[0])
    batch_indices.copy_(bi)
    positions.copy_(pos)


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache,
                          paged_v_cache: Optional[torch.Tensor], kv_indices, kv_indptr, kv_layout: str) -> None:
    """CPU implementation of ``flashops::append_paged_kv_cache``: an index_put per cache.

    Rows the Triton kernel masks are dropped the same way: batch index outside ``[0, B)``,
    position outside the request's own pages (negative, or past its last page), page id outside
    ``[0, P)``.
    """
    k, v = paged_kv_views(paged_kv_cache, paged_v_cache, kv_layout)
    P, page_size = k.shape[0], k.shape[1]
    B = kv_indptr.shape[0] - 1
    b = batch_indices.to(torch.int64)
    ok = (b >= 0) & (b < B)
    bc = torch.where(ok, b, 0)
    pos = positions.to(torch.int64)
    first = kv_indptr.to(torch.int64)[bc] if B > 0 else torch.zeros_like(b)
    x = first * page_size + pos
    end_page = kv_indptr.to(torch.int64)[bc + 1] if B > 0 else torch.zeros_like(b)
    page_idx = torch.div(x, page_size, rounding_mode="floor")
    ok &= (first >= 0) & (pos >= 0) & (page_idx < end_page) & (page_idx < kv_indices.shape[0])
    page = kv_indices.to(torch.int64)[torch.where(ok, page_idx, 0)] if kv_indices.shape[0] > 0 else torch.zeros_like(b)
    ok &= (page >= 0) & (page < P)
    rows = ok.nonzero().squeeze(1)
    page, slot = page[rows], x[rows] % page_size
    k.index_put_((page, slot), append_key[rows])
    v.index_put_((page, slot), append_value[rows])


def gather_paged_kv(paged_kv_cache, paged_v_cache: Optional[torch.Tensor], kv_layout: str, page, slot):
    """CPU implementation of ``flashops::gather_paged_kv``: contiguous copies of the K and V
    rows at ``(page[i], slot[i])``; an id outside ``[0, P)`` or a slot outside the page reads
    page 0 / slot 0, as the kernel does."""
    k, v = paged_kv_views(paged_kv_cache, paged_v_cache, kv_layout)
    page = torch.where((page >= 0) & (page < k.shape[0]), page, 0)
    slot = torch.where((slot >= 0) & (slot < k.shape[1]), slot, 0)
    return k[page, slot].contiguous(), v[page, slot].contiguous()

