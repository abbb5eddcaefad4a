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

from .._checks import fail_if as _fail_if

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


# --------------------------------------------------------------------------- op checks
# register_op's ``check`` for the page ops: the sizes their kernels index by, so a direct
# ``torch.ops.flashops`` call cannot read or write past a tensor (cheap; no data reads).

def check_batch_indices_positions_args(append_indptr, seq_lens, nnz):
    for t, name in ((append_indptr, "append_indptr"), (seq_lens, "seq_lens")):
        _fail_if(t.dim() != 1, name, lambda: f"must be 1-D, got shape {tuple(t.shape)}")
    _fail_if(append_indptr.shape[0] < 1, "append_indptr", lambda: "must have at least one element")
    _fail_if(seq_lens.shape[0] != append_indptr.shape[0] - 1, "seq_lens",
             lambda: f"length {seq_lens.shape[0]} must be len(append_indptr) - 1 = {append_indptr.shape[0] - 1}")
    _fail_if(nnz < 0, "nnz", lambda: f"must be >= 0, got {nnz}")


def check_batch_indices_positions_out_args(append_indptr, seq_lens, batch_indices, positions):
    for t, name in ((batch_indices, "batch_indices"), (positions, "positions")):
        _fail_if(t.dim() != 1, name, lambda: f"must be 1-D, got shape {tuple(t.shape)}")
    check_batch_indices_positions_args(append_indptr, seq_lens, batch_indices.shape[0])
    _fail_if(positions.shape[0] != batch_indices.shape[0], "positions",
             lambda: f"length {positions.shape[0]} must match batch_indices' {batch_indices.shape[0]}")


def check_append_args(append_key, append_value, batch_indices, positions, paged_kv_cache, paged_v_cache,
                      kv_indices, kv_indptr, kv_layout):
    # the cache's head count and dims from its shape alone (what paged_kv_views would give,
    # without building views: this runs on every eager append)
    check_kv_layout(kv_layout)
    cs = paged_kv_cache.shape
    full = len(cs) == (5 if paged_v_cache is None else 4)  # has a page axis
    Hc, Dk = (cs[-3] if (full and kv_layout == "HND") else cs[-2]), cs[-1]
    Dv = cs[-1] if paged_v_cache is None else paged_v_cache.shape[-1]
    ks, vs, bs, ps = append_key.shape, append_value.shape, batch_indices.shape, positions.shape
    _fail_if(len(ks) != 3, "append_key", lambda: f"must be 3-D [nnz, H_kv, D], got shape {tuple(ks)}")
    nnz, H = ks[0], ks[1]
    _fail_if((H != Hc) | (ks[2] != Dk), "append_key",
             lambda: f"shape {tuple(ks)} must be (nnz, {Hc}, {Dk}) (the cache's heads, dim)")
    _fail_if((len(vs) != 3) or ((vs[0] != nnz) | (vs[1] != H) | (vs[2] != Dv)), "append_value",
             lambda: f"shape {tuple(vs)} must be ({nnz}, {H}, {Dv})")
    _fail_if((len(bs) != 1) or (bs[0] != nnz), "batch_indices", lambda: f"shape {tuple(bs)} must be ({nnz},)")
    _fail_if((len(ps) != 1) or (ps[0] != nnz), "positions", lambda: f"shape {tuple(ps)} must be ({nnz},)")
    _fail_if((kv_indices.dim() != 1) or (kv_indptr.dim() != 1), "kv_indptr" if kv_indices.dim() == 1 else "kv_indices",
             lambda: "must be 1-D")


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

