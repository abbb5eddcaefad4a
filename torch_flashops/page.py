"""Paged-KV utilities (FlashInfer's ``flashinfer.page``): sequence lengths, batch indices and
positions of appended tokens, and appending K/V to a paged cache (spec/attention.md §1).

The cache forms (spec §0.2) are normalised in one place, ``_unpack_paged_kv_cache``, which the
attention wrappers reuse: it validates a cache given in any of its forms and returns K/V views
ordered ``[P, page_size, H_kv, D]`` plus the sizes and the tensors an op must receive.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from ._checks import FLOAT_DTYPES, check_tensor, expect
from .meta.page import check_kv_layout, paged_kv_views

__all__ = ["get_seq_lens"]

PagedKVCacheArg = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

_FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)


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
        expect(len(paged_kv_cache) == 2, name, f"a tuple cache must be (k_cache, v_cache), got {len(paged_kv_cache)} items")
        kc, vc = paged_kv_cache
        nk, nv = f"{name}[0]", f"{name}[1]"
        check_tensor(kc, nk, ndim=(3, 4))
        check_tensor(vc, nv, ndim=(3, 4))
        expect(kc.dim() == vc.dim(), nv, f"rank {vc.dim()} does not match k_cache rank {kc.dim()}")
        expect(vc.dtype == kc.dtype, nv, f"dtype {vc.dtype} does not match k_cache dtype {kc.dtype}")
        expect(vc.device == kc.device, nv, f"device {vc.device} does not match k_cache device {kc.device}")
        expect(kc.shape[:-1] == vc.shape[:-1], nv,
               f"shape {tuple(vc.shape)} must agree with k_cache {tuple(kc.shape)} in all but the last dim (pages, page_size, heads)")
        op_args = (kc, vc)
    else:
        check_tensor(paged_kv_cache, name, ndim=(4, 5))
        expect(paged_kv_cache.shape[1] == 2, name, f"dim 1 must be 2 (K and V), got shape {tuple(paged_kv_cache.shape)}")
        op_args = (paged_kv_cache, None)
        nk = name
    dtype = op_args[0].dtype
    if dtype in _FP8_DTYPES:
        raise NotImplementedError(f"{name}: fp8 KV caches are not supported yet (dtype {dtype})")
    expect(dtype in FLOAT_DTYPES, nk, f"dtype {dtype} not supported (expected float16, bfloat16 or float32)")
    k, v = paged_kv_views(op_args[0], op_args[1], kv_layout)
    num_pages, page_size, num_kv_heads, head_dim = k.shape
    expect(page_size >= 1 and num_kv_heads >= 1 and head_dim >= 1 and v.shape[-1] >= 1, nk,
           f"page_size, num_kv_heads and head dims must be >= 1, got shape {tuple(op_args[0].shape)} ({kv_layout})")
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
    check_tensor(kv_indptr, "kv_indptr", ndim=1)
    check_tensor(kv_last_page_len, "kv_last_page_len", ndim=1)
    expect(kv_last_page_len.shape[0] + 1 == kv_indptr.shape[0], "kv_last_page_len",
           f"shape {tuple(kv_last_page_len.shape)} must be [len(kv_indptr) - 1] = [{kv_indptr.shape[0] - 1}]")
    return torch.clamp(kv_indptr[1:] - kv_indptr[:-1] - 1, min=0) * page_size + kv_last_page_len
