"""Shape-level code of the attention ops: validation shared by every backend, and the fakes.

Everything here reads metadata only (shape, dtype, device, strides; SymInt-safe: no ``int()``
of a size, no data reads), so the same checks serve FakeTensors at trace time, the Triton
launchers and the CPU implementation: a direct ``torch.ops.flashops.*`` call with bad
arguments gets a ``ValueError`` naming the argument before anything is written.
"""
from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, check_tensor, check_writable, expect
from .page import check_kv_layout, paged_kv_views

POS_ENCODING_NAMES = ("NONE", "ROPE_LLAMA", "ALIBI")
TILE_M_VALUES = (16, 32, 64, 128)
MAX_HEAD_DIM = 512


def check_pos_encoding_mode(mode) -> None:
    """Unknown ``pos_encoding_mode`` strings raise ``KeyError`` (FlashInfer's behaviour)."""
    if mode not in POS_ENCODING_NAMES:
        raise KeyError(f"Invalid pos_encoding_mode {mode!r} (expected one of {', '.join(POS_ENCODING_NAMES)})")


def check_head_dim(d, name: str) -> None:
    expect(d % 16 == 0 and 16 <= d <= MAX_HEAD_DIM, name, "head dim {} must be a multiple of 16 in [16, {}]", d, MAX_HEAD_DIM)


def check_heads(h_qo, h_kv, name: str = "num_qo_heads") -> None:
    expect(h_kv >= 1 and h_qo >= 1 and h_qo % h_kv == 0, name,
           "num_qo_heads {} must be a positive multiple of num_kv_heads {}", h_qo, h_kv)


def _check_qkv(q, K, V, pos_encoding_mode) -> None:
    """``q [R, H_qo, D]`` against 4-D K/V views ``[P, page, H_kv, D*]``."""
    check_tensor(q, "q", ndim=3, dtypes=FLOAT_DTYPES)
    expect(K.dtype == q.dtype, "k", "dtype {} does not match q dtype {} (one dtype for q, k, v)", K.dtype, q.dtype)
    expect(V.dtype == q.dtype, "v", "dtype {} does not match q dtype {} (one dtype for q, k, v)", V.dtype, q.dtype)
    expect(K.device == q.device and V.device == q.device, "k", "on {}, expected {} (q's device)", K.device, q.device)
    expect(K.stride(-1) == 1 or K.shape[-1] <= 1, "k", "last dimension must be contiguous (stride(-1) == 1)")
    expect(V.stride(-1) == 1 or V.shape[-1] <= 1, "v", "last dimension must be contiguous (stride(-1) == 1)")
    expect(K.shape[-1] == q.shape[-1], "k", "head dim {} does not match q's {}", K.shape[-1], q.shape[-1])
    expect(K.shape[:-1] == V.shape[:-1], "v", "shape {} does not match k's {} but in the last dim", tuple(V.shape), tuple(K.shape))
    check_heads(q.shape[1], K.shape[2], "q")
    check_head_dim(q.shape[-1], "q")
    check_head_dim(V.shape[-1], "v")
    check_pos_encoding_mode(pos_encoding_mode)


def check_len(cond, name: str, msg) -> None:
    """A relation between list lengths: ``expect`` on ints; on symbolic lengths (a plan's
    index tensors reach compiled code with unbacked sizes) a ``torch._check``, which becomes a
    runtime assertion rather than a guard."""
    if isinstance(cond, torch.SymBool):
        torch._check(cond, lambda: f"{name}: {msg()}")
    else:
        expect(cond, name, msg)


def _check_index(t, name: str, device, ndim: int = 1) -> None:
    check_tensor(t, name, ndim=ndim, dtypes=(torch.int32,), device=device)
    expect(t.is_contiguous(), name, "must be contiguous")


def single_kv_views(k, v, kv_layout: str):
    """K/V of one request as ``[kv_len, H_kv, D]`` views (HND inputs are transposed)."""
    check_kv_layout(kv_layout)
    return (k.transpose(0, 1), v.transpose(0, 1)) if kv_layout == "HND" else (k, v)


def check_single(q, k, v, packed_mask, kv_layout, pos_encoding_mode) -> None:
    check_tensor(k, "k", ndim=3)
    check_tensor(v, "v", ndim=3)
    K, V = single_kv_views(k, v, kv_layout)
    _check_qkv(q, K.unsqueeze(1), V.unsqueeze(1), pos_encoding_mode)
    if packed_mask is not None:
        _check_packed_mask(packed_mask, q.device)
        need = (q.shape[0] * K.shape[0] + 7) // 8
        expect(packed_mask.shape[0] == need, "packed_custom_mask",
               "has {} bytes, expected ceil(qo_len * kv_len / 8) = {}", packed_mask.shape[0], need)


def _check_packed_mask(packed_mask, device) -> None:
    check_tensor(packed_mask, "packed_custom_mask", ndim=1, dtypes=(torch.uint8,), device=device)
    expect(packed_mask.is_contiguous(), "packed_custom_mask", "must be contiguous")


def check_batch(q, K, V, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                pos_encoding_mode, *, o=None, lse=None, kv_indices=None, kv_lens=None) -> None:
    """Arguments of ``paged_attention`` / ``ragged_attention`` (K/V as 4-D views)."""
    _check_qkv(q, K, V, pos_encoding_mode)
    dev = q.device
    for t, name in ((work, "work"), (split_work, "split_work"), (merge, "merge")):
        _check_index(t, name, dev)  # flat [4 * n]: no constant dim for dynamo to duck-size against
    _check_index(qo_indptr, "qo_indptr", dev)
    _check_index(kv_indptr, "kv_indptr", dev)
    check_len(kv_indptr.shape[0] == qo_indptr.shape[0], "kv_indptr",
              lambda: f"length {kv_indptr.shape[0]} does not match qo_indptr's {qo_indptr.shape[0]}")
    if kv_indices is not None:
        _check_index(kv_indices, "kv_indices", dev)
    if kv_lens is not None:
        _check_index(kv_lens, "kv_lens", dev)
        check_len(kv_lens.shape[0] + 1 >= qo_indptr.shape[0], "kv_lens", lambda: "needs one length per request")
    if not isinstance(block_m, torch.SymInt):  # (a symbol from a compiled run(): checked when the op runs)
        expect(block_m in TILE_M_VALUES, "block_m", "must be one of {}, got {}", TILE_M_VALUES, block_m)
    expect((packed_mask is None) == (mask_indptr is None), "mask_indptr", "packed_mask and mask_indptr go together")
    if packed_mask is not None:
        _check_packed_mask(packed_mask, dev)
        _check_index(mask_indptr, "mask_indptr", dev)
        check_len(mask_indptr.shape[0] == qo_indptr.shape[0], "mask_indptr",
                  lambda: f"length {mask_indptr.shape[0]} does not match qo_indptr's {qo_indptr.shape[0]}")
    if o is not None:  # (only the real _out impls pass o: their fakes compute nothing)
        check_out(o, lse, q, V.shape[-1], o.dtype)
        check_writable(o, "out")
        check_writable(lse, "lse")


def check_out(o, lse, q, d_vo, o_dtype) -> None:
    """``o [R, H_qo, D_vo]`` of ``o_dtype``, ``lse [R, H_qo]`` fp32, on q's device."""
    R, h = q.shape[0], q.shape[1]
    check_tensor(o, "out", ndim=3, dtypes=(o_dtype,), device=q.device)
    expect(tuple(o.shape) == (R, h, d_vo), "out", "shape {}, expected {}", tuple(o.shape), (R, h, d_vo))
    check_tensor(lse, "lse", ndim=2, dtypes=(torch.float32,), device=q.device)
    expect(tuple(lse.shape) == (R, h), "lse", "shape {}, expected {}", tuple(lse.shape), (R, h))


def attention_outputs(q, d_vo, o_dtype=None):
    """Fresh contiguous ``o [R, H_qo, D_vo]`` (``o_dtype`` or q's) and ``lse [R, H_qo]`` fp32."""
    o = q.new_empty((q.shape[0], q.shape[1], d_vo), dtype=o_dtype or q.dtype)
    lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
    return o, lse


def single_d_vo(v):
    return v.shape[-1]


def paged_d_vo(k_cache, v_cache):
    return (v_cache if v_cache is not None else k_cache).shape[-1]


# --------------------------------------------------------------------------- fake impls
def single_attention_fake(q, k, v, packed_mask, kv_layout, causal, window_left, sm_scale, logits_soft_cap,
                          pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o_dtype=None):
    check_single(q, k, v, packed_mask, kv_layout, pos_encoding_mode)
    return attention_outputs(q, single_d_vo(v), o_dtype)


def paged_attention_fake(q, k_cache, v_cache, kv_layout, work, split_work, merge, qo_indptr, kv_indptr, kv_indices,
                         kv_lens, packed_mask, mask_indptr, block_m, causal, window_left, sm_scale, logits_soft_cap,
                         pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, fixed_config, o_dtype=None):
    K, V = paged_kv_views(k_cache, v_cache, kv_layout)
    check_batch(q, K, V, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                pos_encoding_mode, kv_indices=kv_indices, kv_lens=kv_lens)
    return attention_outputs(q, V.shape[-1], o_dtype)


def ragged_attention_fake(q, k, v, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                          causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta,
                          v_scale, lse_ln, fixed_config, o_dtype=None):
    check_batch(q, k.unsqueeze(1), v.unsqueeze(1), work, split_work, merge, qo_indptr, kv_indptr, packed_mask,
                mask_indptr, block_m, pos_encoding_mode)
    return attention_outputs(q, v.shape[-1], o_dtype)
