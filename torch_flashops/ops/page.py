"""Triton kernels and ops of the ``page`` family (spec/attention.md §1).

batch_indices_positions (CSR of append lengths -> one (request, position) pair per token):
    b(t)   = #{ r in [1, B] : append_indptr[r] <= t }        (binary search; == B: padding)
    pos(t) = seq_lens[b] - append_indptr[b+1] + t             (seq_lens counts the new tokens)
    t >= append_indptr[B]  ->  (b, pos) = (-1, 0)
    append_indptr [B+1], seq_lens [B]  ->  batch_indices, positions  int32 [nnz]

gather_paged_kv (a gather copy, the inverse direction):
    k[i, h, :] = K[page[i], slot[i], h, :]   (v alike), page/slot int64 [N] -> k [N, H, D],
    v [N, H, D_v] contiguous; an id outside [0, P) or a slot outside the page reads page 0 /
    slot 0, so no index data makes the kernel read outside the cache.

append_paged_kv_cache (a scatter copy):
    b = batch_indices[t] >= 0,  x = kv_indptr[b] * page_size + positions[t]
    K[kv_indices[x // page_size], x % page_size, h, :] = append_key[t, h, :]    (V alike)
    append_key [nnz, H, D], append_value [nnz, H, D_v]; the cache is viewed as
    K [P, page_size, H, D], V [P, page_size, H, D_v] with arbitrary strides (meta.page).
    Rows whose batch index, slot or page id falls outside the tensors are skipped, so the
    kernel never touches memory it was not given, whatever the index data.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import COMPILE_OPTIONS, cdiv, next_pow2
from .. import _config
from .._registry import register_op
from ..meta import page as meta
from ..reference import page as reference

# --------------------------------------------------------------------------- kernels


@triton.jit
def _request_of_token(append_indptr_ptr, t, B, n_iter):
    """For each token t: the number of requests r in [1, B] with append_indptr[r] <= t,
    i.e. the request that owns t (B when t lies past the last request). Binary search with a
    fixed trip count ``n_iter = ceil(log2(B + 1))``; every load stays inside ``[1, B]``."""
    lo = tl.zeros_like(t)
    hi = lo + B
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(append_indptr_ptr + 1 + mid, mask=active, other=0)
        right = active & (end <= t)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    return lo


@triton.jit
def _batch_indices_positions_kernel(
    append_indptr_ptr, seq_lens_ptr, batch_indices_ptr, positions_ptr,
    nnz, B, n_iter,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = t < nnz
    b = _request_of_token(append_indptr_ptr, t, B, n_iter)
    valid = in_range & (b < B)
    end = tl.load(append_indptr_ptr + 1 + b, mask=valid, other=0)
    seq_len = tl.load(seq_lens_ptr + b, mask=valid, other=0)
    tl.store(batch_indices_ptr + t, tl.where(valid, b, -1).to(tl.int32), mask=in_range)
    tl.store(positions_ptr + t, tl.where(valid, seq_len - end + t, 0).to(tl.int32), mask=in_range)


@triton.jit
def _copy_rows(
    src_ptr, dst_ptr, src_row, dst_row, row_ok, src_stride_h, dst_stride_h, h, H, D,
    BLOCK_D: tl.constexpr,
):
    """Copy the [BLOCK_T, BLOCK_H, D] tile of heads ``h`` from the source rows starting at
    element offsets ``src_row`` to the cache rows at ``dst_row`` (int64 [BLOCK_T])."""
    d = tl.arange(0, BLOCK_D)
    hd_ok = (h[:, None] < H) & (d[None, :] < D)
    h64 = h.to(tl.int64)  # head-major storage: h * stride_h can pass 2^31
    src_hd = h64[:, None] * src_stride_h + d[None, :]
    dst_hd = h64[:, None] * dst_stride_h + d[None, :]
    mask = row_ok[:, None, None] & hd_ok[None, :, :]
    x = tl.load(src_ptr + src_row[:, None, None] + src_hd[None, :, :], mask=mask, eviction_policy="evict_first")
    tl.store(dst_ptr + dst_row[:, None, None] + dst_hd[None, :, :], x, mask=mask)


@triton.jit
def _append_paged_kv_kernel(
    key_ptr, value_ptr, batch_indices_ptr, positions_ptr, k_cache_ptr, v_cache_ptr,
    kv_indices_ptr, kv_indptr_ptr,
    nnz, B, num_indices, P, page_size, H, DK, DV,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    kc_stride_p, kc_stride_s, kc_stride_h, vc_stride_p, vc_stride_s, vc_stride_h,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # Resolve each token's cache slot; every load is masked by what is known valid so far.
    ok = t < nnz
    b = tl.load(batch_indices_ptr + t, mask=ok, other=-1)
    ok &= (b >= 0) & (b < B)
    first_page = tl.load(kv_indptr_ptr + b, mask=ok, other=0).to(tl.int64)
    end_page = tl.load(kv_indptr_ptr + b + 1, mask=ok, other=0).to(tl.int64)
    pos = tl.load(positions_ptr + t, mask=ok, other=0).to(tl.int64)
    x = first_page * page_size + pos
    page_idx = x // page_size
    # a position outside the request's own pages is dropped (it would land in a neighbour's page)
    ok &= (first_page >= 0) & (pos >= 0) & (page_idx < end_page) & (page_idx < num_indices)
    page = tl.load(kv_indices_ptr + page_idx, mask=ok, other=-1).to(tl.int64)
    ok &= (page >= 0) & (page < P)
    slot = x - page_idx * page_size
    t64 = t.to(tl.int64)
    _copy_rows(key_ptr, k_cache_ptr, t64 * key_stride_t, page * kc_stride_p + slot * kc_stride_s, ok,
               key_stride_h, kc_stride_h, h, H, DK, BLOCK_DK)
    _copy_rows(value_ptr, v_cache_ptr, t64 * value_stride_t, page * vc_stride_p + slot * vc_stride_s, ok,
               value_stride_h, vc_stride_h, h, H, DV, BLOCK_DV)


@triton.jit
def _gather_paged_kv_kernel(
    k_cache_ptr, v_cache_ptr, page_ptr, slot_ptr, k_out_ptr, v_out_ptr,
    n, P, page_size, H, DK, DV,
    kc_stride_p, kc_stride_s, kc_stride_h, vc_stride_p, vc_stride_s, vc_stride_h,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = t < n
    page = tl.load(page_ptr + t, mask=ok, other=0)
    slot = tl.load(slot_ptr + t, mask=ok, other=0)
    page = tl.where((page >= 0) & (page < P), page, 0)  # ids outside the cache read page 0
    slot = tl.where((slot >= 0) & (slot < page_size), slot, 0)
    t64 = t.to(tl.int64)
    _copy_rows(k_cache_ptr, k_out_ptr, page * kc_stride_p + slot * kc_stride_s, t64 * (H * DK), ok,
               kc_stride_h, DK, h, H, DK, BLOCK_DK)
    _copy_rows(v_cache_ptr, v_out_ptr, page * vc_stride_p + slot * vc_stride_s, t64 * (H * DV), ok,
               vc_stride_h, DV, h, H, DV, BLOCK_DV)


# --------------------------------------------------------------------------- launch heuristics

_TILE_ELEMS = 4096  # elements per tensor per program (8 KB of bf16)
_MAX_BLOCK_T = 64
_MIN_PROGRAMS = 1024  # keep a GPU busy before making tiles taller (about 8 per SM on an H100)


def _append_config(nnz: int, H: int, DK: int, DV: int) -> dict:
    """Tile shape of ``_append_paged_kv_kernel``: full head dims, as many heads as fit in
    ``_TILE_ELEMS``, then as many tokens as fit -- but no taller than leaves ``_MIN_PROGRAMS``
    programs on the GPU (the interpreter prefers few, large programs)."""
    bd = next_pow2(max(DK, DV))
    block_h = min(next_pow2(H), max(1, _TILE_ELEMS // bd))
    block_t = min(_MAX_BLOCK_T, max(1, _TILE_ELEMS // (block_h * bd)))
    if not _config.interpreting():
        while block_t > 1 and cdiv(nnz, block_t) * cdiv(H, block_h) < _MIN_PROGRAMS:
            block_t //= 2
    return dict(BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_DK=next_pow2(DK),
                BLOCK_DV=next_pow2(DV), num_warps=8 if block_t * block_h * bd >= 8192 else 4)


def _positions_config(nnz: int) -> dict:
    return dict(BLOCK=min(1024, max(16, next_pow2(nnz))), num_warps=4)


# --------------------------------------------------------------------------- launchers


def _batch_indices_positions_out_launch(append_indptr, seq_lens, batch_indices, positions) -> None:
    nnz = batch_indices.shape[0]
    if nnz == 0:
        return
    B = append_indptr.shape[0] - 1
    cfg = _positions_config(nnz)
    # The kernel reads and writes flat arrays: strided views (direct op calls; the public
    # function rejects them) go through contiguous copies, as the reference handles them.
    append_indptr, seq_lens = append_indptr.contiguous(), seq_lens.contiguous()
    bi = batch_indices if batch_indices.is_contiguous() else torch.empty(nnz, dtype=batch_indices.dtype,
                                                                            device=batch_indices.device)
    pos = positions if positions.is_contiguous() else torch.empty(nnz, dtype=positions.dtype, device=positions.device)
    _batch_indices_positions_kernel[(cdiv(nnz, cfg["BLOCK"]),)](
        append_indptr, seq_lens, bi, pos, nnz, B, max(B, 0).bit_length(), **cfg, **COMPILE_OPTIONS)
    if bi is not batch_indices:
        batch_indices.copy_(bi)
    if pos is not positions:
        positions.copy_(pos)


def _batch_indices_positions_launch(append_indptr, seq_lens, nnz):
    batch_indices, positions = meta.batch_indices_positions_fake(append_indptr, seq_lens, nnz)
    _batch_indices_positions_out_launch(append_indptr, seq_lens, batch_indices, positions)
    return batch_indices, positions


def _append_paged_kv_cache_launch(append_key, append_value, batch_indices, positions, paged_kv_cache,
                                  paged_v_cache, kv_indices, kv_indptr, kv_layout) -> None:
    k, v = meta.paged_kv_views(paged_kv_cache, paged_v_cache, kv_layout)
    nnz, H, DK = append_key.shape
    DV = append_value.shape[-1]
    if nnz == 0 or k.numel() == 0:
        return
    cfg = _append_config(nnz, H, DK, DV)
    grid = (cdiv(nnz, cfg["BLOCK_T"]), cdiv(H, cfg["BLOCK_H"]))
    # flat index arrays for the kernel (no-ops for the public function, which requires them)
    batch_indices, positions = batch_indices.contiguous(), positions.contiguous()
    kv_indices, kv_indptr = kv_indices.contiguous(), kv_indptr.contiguous()
    _append_paged_kv_kernel[grid](
        append_key, append_value, batch_indices, positions, k, v, kv_indices, kv_indptr,
        nnz, kv_indptr.shape[0] - 1, kv_indices.shape[0], k.shape[0], k.shape[1], H, DK, DV,
        append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        **cfg, **COMPILE_OPTIONS)


def _gather_paged_kv_launch(paged_kv_cache, paged_v_cache, kv_layout, page, slot):
    k_out, v_out = meta.gather_paged_kv_fake(paged_kv_cache, paged_v_cache, kv_layout, page, slot)
    k, v = meta.paged_kv_views(paged_kv_cache, paged_v_cache, kv_layout)
    n, H, DK = k_out.shape
    DV = v_out.shape[-1]
    if n == 0 or H == 0:
        return k_out, v_out
    if k.numel() == 0:  # no pages to read: every id is out of range, and page 0 does not exist
        raise ValueError("paged_kv_cache: has no pages to gather from")
    cfg = _append_config(n, H, DK, DV)
    grid = (cdiv(n, cfg["BLOCK_T"]), cdiv(H, cfg["BLOCK_H"]))
    page, slot = page.contiguous(), slot.contiguous()  # the kernel reads them as flat arrays
    _gather_paged_kv_kernel[grid](
        k, v, page, slot, k_out, v_out, n, k.shape[0], k.shape[1], H, DK, DV,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), **cfg, **COMPILE_OPTIONS)
    return k_out, v_out


# --------------------------------------------------------------------------- registration

batch_indices_positions = register_op(
    "batch_indices_positions(Tensor append_indptr, Tensor seq_lens, SymInt nnz) -> (Tensor, Tensor)",
    cuda=_batch_indices_positions_launch,
    reference=reference.batch_indices_positions,
    fake=meta.batch_indices_positions_fake,
    check=meta.check_batch_indices_positions_args,
)

batch_indices_positions_out = register_op(
    "batch_indices_positions_out(Tensor append_indptr, Tensor seq_lens, Tensor batch_indices, Tensor positions) -> ()",
    cuda=_batch_indices_positions_out_launch,
    reference=reference.batch_indices_positions_out,
    mutates=["batch_indices", "positions"],
    check=meta.check_batch_indices_positions_out_args,
)

append_paged_kv_cache = register_op(
    "append_paged_kv_cache(Tensor append_key, Tensor append_value, Tensor batch_indices, Tensor positions, "
    "Tensor paged_kv_cache, Tensor? paged_v_cache, Tensor kv_indices, Tensor kv_indptr, str kv_layout) -> ()",
    cuda=_append_paged_kv_cache_launch,
    reference=reference.append_paged_kv_cache,
    mutates=["paged_kv_cache", "paged_v_cache"],
    check=meta.check_append_args,
)

gather_paged_kv = register_op(
    "gather_paged_kv(Tensor paged_kv_cache, Tensor? paged_v_cache, str kv_layout, Tensor page, Tensor slot) "
    "-> (Tensor, Tensor)",
    cuda=_gather_paged_kv_launch,
    reference=reference.gather_paged_kv,
    fake=meta.gather_paged_kv_fake,
)

