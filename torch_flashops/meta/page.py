"""Shape-level code of the ``page`` family: the paged-KV view helper and the fake impls.

Everything here reads shapes and strides only (SymInt-safe: no ``int()`` of a size, no data
reads), so it serves FakeTensors, the CPU reference implementation and the Triton launcher
alike.

``paged_kv_views`` is the single place that turns the cache *as an op receives it* (the
caller's own tensors: one 5-D/4-D combined tensor, or the two members of a ``(k, v)`` pair)
into K and V views ordered ``[P, page_size, H_kv, D]``. The public layer wraps it with
validation in ``torch_flashops.page._unpack_paged_kv_cache``; call that one from Python API
code, and this one only inside op implementations (where the arguments are already valid).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

KV_LAYOUTS = ("NHD", "HND")


def check_kv_layout(kv_layout: str) -> None:
    """Unknown layout strings raise ``KeyError`` (FlashInfer's behaviour)."""
    if kv_layout not in KV_LAYOUTS:
        raise KeyError(f"Invalid kv_layout {kv_layout!r} (expected 'NHD' or 'HND')")


def paged_kv_views(
    paged_kv_cache: torch.Tensor, paged_v_cache: Optional[torch.Tensor], kv_layout: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[P, page_size, H_kv, D]`` of a paged cache, whatever its form.

    ``paged_v_cache is None``: ``paged_kv_cache`` is the combined cache, 5-D
    ``[P, 2, page, H, D]`` (NHD) / ``[P, 2, H, page, D]`` (HND), or 4-D with page_size 1
    (page axis inserted at -3 for NHD, -2 for HND). Otherwise the two arguments are the K and
    V members of a pair, each 4-D ``[P, page, H, D]`` / ``[P, H, page, D]`` or 3-D
    (page_size 1). HND views are transposed, so the result's strides still describe the
    caller's storage (no copy): element ``(p, s, h, d)`` of the K view is K of page p, slot s,
    head h. Arguments are assumed valid; only the layout string is checked (``KeyError``).
    """
    check_kv_layout(kv_layout)
    hnd = kv_layout == "HND"
    page_axis = -2 if hnd else -3
    if paged_v_cache is None:
        kv = paged_kv_cache.unsqueeze(page_axis) if paged_kv_cache.dim() == 4 else paged_kv_cache
        k, v = kv.select(1, 0), kv.select(1, 1)
    else:
        k, v = paged_kv_cache, paged_v_cache
        if k.dim() == 3:
            k, v = k.unsqueeze(page_axis), v.unsqueeze(page_axis)
    if hnd:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    return k, v


# --------------------------------------------------------------------------- fake impls
# append_paged_kv_cache returns nothing: the registry's default fake serves it.


def batch_indices_positions_fake(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz):
    """Two fresh int32 ``[nnz]`` tensors (``nnz`` may be a SymInt)."""
    out = append_indptr.new_empty((nnz,), dtype=torch.int32)
    return out, torch.empty_like(out)


def gather_paged_kv_fake(paged_kv_cache: torch.Tensor, paged_v_cache: Optional[torch.Tensor], kv_layout: str,
                         page: torch.Tensor, slot: torch.Tensor):
    """Fresh contiguous ``k [N, H_kv, D]`` and ``v [N, H_kv, D_v]`` in the cache's dtype, N =
    ``page.shape[0]``; ``page``/``slot`` must be int64 ``[N]`` on the cache's device."""
    k, v = paged_kv_views(paged_kv_cache, paged_v_cache, kv_layout)
    for t, name in ((page, "page"), (slot, "slot")):
        if t.dim() != 1 or t.dtype != torch.int64 or t.device != k.device:
            raise ValueError(f"{name}: expected a 1-D int64 tensor on {k.device}, got {t.dim()}-D {t.dtype} "
                             f"on {t.device}")
    if slot.shape[0] != page.shape[0]:
        raise ValueError(f"slot: {slot.shape[0]} entries, page has {page.shape[0]}")
    n = page.shape[0]
    return k.new_empty((n, k.shape[2], k.shape[3])), v.new_empty((n, v.shape[2], v.shape[3]))

