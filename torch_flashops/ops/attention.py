# Attention over a paged, ragged or single KV: Triton kernels, launchers, op registration.
#
# For request b, query row r (0 <= r < qo_len), qo head h, key j < kv_len (spec attention.md §0.4):
#
#     p_r   = kv_len - qo_len + r                       (append-before-attention position)
#     s_rj  = sm_scale * <rope(q_r, p_r), rope(k_j, j)>  [+ slope_h * (j - r)]   (ALiBi)
#     s_rj  = c * tanh(s_rj / c)                                                  (soft-cap)
#     keep  = mask bit (r, j)  or  causal: j <= p_r;   and window: j >= p_r - window_left
#     o_r   = v_scale * sum_keep softmax(s)_j v_j,    lse_r = log2 sum_keep exp(s_rj)
#     empty keep-set: o_r = 0, lse_r = -inf.
#
# Shapes: q [R, H_qo, D_qk] (any row/head strides), K/V views ordered [P, page, H_kv, D] (paged;
# from one 5-D cache or a (k, v) pair, NHD or HND, see meta.page.paged_kv_views) or [T, H_kv, D]
# (ragged / single), o [R, H_qo, D_vo], lse [R, H_qo] fp32.
#
# One kernel, `_attn_fwd_kernel`, serves all three ops. A program owns one *work item* and one
# KV head hk: BLOCK_M rows of the flattened (query row, group head) index m = r * G + g of one
# request (G = H_qo / H_kv: the GQA group is packed into the M dimension, so each K/V tile is
# read once per KV head, whatever G) against the keys [kv_lo, kv_hi) of that request, in
# BLOCK_N tiles gathered through the page table. Online softmax in base 2, fp32 accumulators.
#   * WORKLIST (paged, ragged): items come from plan() as int32 rows (b, m_start, kv_lo, kv_hi),
#     flattened to 1-D (a constant dim of 4 would make dynamo duck-size other plan tensors to it).
#     `split_work` items cover one chunk of a long KV range each and write a normalised partial
#     state (o, lse) to a scratch tile; `merge` rows (b, m_start, first item, count) tell
#     `_merge_kernel` which partials to combine (fixed order: bitwise reproducible, no
#     atomics). `work` items write o directly. Idle items (b = -1) exit at once, so the grid
#     depends only on the (frozen) list lengths: CUDA-graph safe.
#   * single: no list; program id -> (m tile, KV split) arithmetically from the shapes.
# Masking is only computed on tiles that need it: a tile fully inside the causal/window keep
# set runs the unmasked loop.
# Split-KV scratch (fp32 partial o and lse per split item, KV head and tile row) is allocated per
# call by the launcher (the caching allocator; a captured graph keeps it in its pool); plan()
# bounds its size by the wrapper's float_workspace_buffer. Splits aim for one full wave of the
# GPU (`split_target`), and a plan without splits launches no merge kernel.
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._host import COMPILE_OPTIONS, cdiv, next_pow2
from ._triton_compat import gdc_launch_dependents, gdc_wait
from .. import _config
from .._registry import register_op
from ..meta import attention as meta
from ..meta.page import paged_kv_views
from ..reference import attention as ref
from .cascade import online_merge_finish

__all__ = [
    "POS_ENCODING_MODES",
    "tile_m",
    "attn_config",
    "num_sms",
    "NO_SPLIT_ROWS",
    "single_attention_op",
    "paged_attention_op",
    "paged_attention_out_op",
    "ragged_attention_op",
    "ragged_attention_out_op",
]

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = math.log(2.0)
POS_ENCODING_MODES = {"NONE": 0, "ROPE_LLAMA": 1, "ALIBI": 2}
WORK_FIELDS = 4  # (b, m_start, kv_lo, kv_hi) / merge: (b, m_start, first split item, count)
NO_SPLIT_ROWS = 2  # a planned split list of exactly this many (idle) rows means "no split-KV"


# ------------------------------------------------------------------ shared device functions
@triton.jit
def _tanh(x):
    e = tl.exp2(x * (2.0 * LOG2E))  # overflow to inf gives exactly 1
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` in fp32. UPCAST: the interpreter multiplies 16-bit dots wrongly, go via fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _rope(x, x_partner, pos, freq, sign):
    """Rotate-half RoPE of rows ``x [n, D]`` at positions ``pos [n]``; ``x_partner`` holds
    x[(d + D/2) % D], ``sign`` is -1 for the first half; ``freq [D]`` repeats f_i."""
    ang = pos.to(tl.float32)[:, None] * freq[None, :]
    return x.to(tl.float32) * tl.cos(ang) + sign[None, :] * x_partner.to(tl.float32) * tl.sin(ang)


@triton.jit
def _load_rows(row_ptr, offs, n_valid, d_mask, MASK_N: tl.constexpr, MASK_D: tl.constexpr, EVICT: tl.constexpr = ""):
    """Rows ``row_ptr[i] + offs`` as a [n, BLOCK_D] tile; masks only where they can bite.
    ``EVICT``: the loads' L2 eviction policy ("" default, "evict_first")."""
    ptrs = row_ptr[:, None] + offs[None, :]
    if MASK_N and MASK_D:
        return tl.load(ptrs, mask=n_valid[:, None] & d_mask[None, :], other=0.0, eviction_policy=EVICT)
    elif MASK_N:
        return tl.load(ptrs, mask=n_valid[:, None], other=0.0, eviction_policy=EVICT)
    elif MASK_D:
        return tl.load(ptrs, mask=d_mask[None, :], other=0.0, eviction_policy=EVICT)
    else:
        return tl.load(ptrs, eviction_policy=EVICT)


@triton.jit
def _kv_rows(KV_INDICES, kv_base, offs_n, n_valid, num_pages, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
             LEAN: tl.constexpr = False):
    """(page, slot) of keys ``offs_n`` of a request. Paged: page ids from the page table, masked
    to [0, num_pages); ragged: page = row ``kv_base + j`` (masked to the rows given), slot 0.
    LEAN: int32 results (widened where they are multiplied, see ``_kv_offsets``) and unsigned
    division by the page size (key offsets are never negative); else int64."""
    if PAGED:
        if LEAN:
            un = offs_n.to(tl.uint32)
            page = tl.load(KV_INDICES + kv_base + (un // PAGE_SIZE).to(tl.int32), mask=n_valid, other=0)
            slot = (un % PAGE_SIZE).to(tl.int32)
        else:
            page = tl.load(KV_INDICES + kv_base + offs_n // PAGE_SIZE, mask=n_valid, other=0)
            slot = offs_n % PAGE_SIZE
        page = tl.where((page >= 0) & (page < num_pages), page, 0)
    else:
        page = kv_base + offs_n
        page = tl.where(n_valid & (page < num_pages), page, 0)
        slot = offs_n * 0
    if not LEAN:
        page = page.to(tl.int64)
        slot = slot.to(tl.int64)
    return page, slot


@triton.jit
def _kv_offsets(page, slot, hk, stride_p, stride_s, stride_h, LEAN: tl.constexpr):
    """Element offsets of rows (page, slot) of KV head ``hk``. LEAN: the launcher checked that
    strides are in [0, 2^31) and that offsets inside one page fit int32 (``lean_addressing``), so
    the page term is one 32x32->64-bit multiply-add per row, the in-page term 32-bit."""
    if LEAN:  # unsigned: no sign fix-ups, the page term is one wide multiply-add
        inpage = tl.cast(slot * stride_s + hk * stride_h, tl.uint32).to(tl.uint64)
        off = (tl.cast(page, tl.uint32).to(tl.uint64) * tl.cast(stride_p, tl.uint32).to(tl.uint64) + inpage)
        off = off.to(tl.int64)
    else:
        off = page * stride_p + slot * stride_s + hk.to(tl.int64) * stride_h
    return off


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, start, page, slot, page1, slot1,
    K, V, K_DESC, V_DESC, KV_INDICES, MASK, FREQS,
    kv_base, kv_hi, kv_len, num_pages, mask_base,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    hk, r, pos, valid_m, slope, qk_scale, sm_scale, soft_cap, window_left,
    offs_d, d_mask, offs_dv, dv_mask, partner_d, sign_d, freq_d,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr, POS: tl.constexpr,
    SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    PAGE_AHEAD: tl.constexpr, FOLD_SCALE: tl.constexpr, KV_EVICT: tl.constexpr, TMA: tl.constexpr,
    LEAN: tl.constexpr, KV_SAME: tl.constexpr,
):
    """Fold keys [start, start + BLOCK_N) into the running (acc, m_i, l_i) of the tile's rows.
    Paged: ``(page, slot)`` of this tile's keys were loaded ahead. PAGE_AHEAD 1: the next
    tile's ids are loaded here and returned (``page1``/``slot1`` unused). PAGE_AHEAD 2:
    ``page1``/``slot1`` hold the next tile's ids and the ids of the tile after it are loaded
    here (see ``page_ahead()`` for when each pays). (Loaded in the same iteration as the K/V
    gather, the page ids put all three loads into one async group, and the software pipeliner
    then waits for every copy in flight before each tile: no load/compute overlap.)
    Returns the running state and the ids of the next two tiles."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_hi
    if PAGED:
        if PAGE_AHEAD == 2:  # ids of tile + 2: off the chain that issues tile + 1's K/V copies
            far_n = offs_n + 2 * BLOCK_N
            far_page, far_slot = _kv_rows(KV_INDICES, kv_base, far_n, far_n < kv_hi, num_pages, PAGED, PAGE_SIZE,
                                          LEAN)
            nxt_page, nxt_slot = page1, slot1
        else:
            nxt_n = offs_n + BLOCK_N
            nxt_page, nxt_slot = _kv_rows(KV_INDICES, kv_base, nxt_n, nxt_n < kv_hi, num_pages, PAGED, PAGE_SIZE,
                                          LEAN)
            far_page, far_slot = nxt_page, nxt_slot
    else:
        page, slot = _kv_rows(KV_INDICES, kv_base, offs_n, n_valid, num_pages, PAGED, PAGE_SIZE, LEAN)
        nxt_page, nxt_slot = page, slot
        far_page, far_slot = page, slot
    k_off = _kv_offsets(page, slot, hk, stride_kp, stride_ks, stride_kh, LEAN)
    k_row = K + k_off
    if KV_SAME:  # K and V share strides (a 5-D cache, a (k, v) pair of one shape): one offset per row
        v_row = V + k_off
    else:
        v_row = V + _kv_offsets(page, slot, hk, stride_vp, stride_vs, stride_vh, LEAN)
    if TMA:  # ragged rows [kv_base + start, + BLOCK_N) of head hk: one bulk copy (rows past the tensor read 0)
        k = tl.reshape(K_DESC.load([kv_base + start, hk, 0]), [BLOCK_N, offs_d.shape[0]])
    else:
        k = _load_rows(k_row, offs_d, n_valid, d_mask, MASKED, PAD_D, KV_EVICT)
    if POS == 1:
        kp = _load_rows(k_row, partner_d, n_valid, d_mask, MASKED, PAD_D, KV_EVICT)
        k = _rope(k, kp, offs_n, freq_d, sign_d).to(q.dtype)
    qk = _dot(q, tl.trans(k), UPCAST, PREC)
    if (POS == 2) or SOFTCAP:
        s = qk * sm_scale
        if POS == 2:
            s += slope[:, None] * (offs_n[None, :] - r[:, None]).to(tl.float32)
        if SOFTCAP:
            s = soft_cap * _tanh(s / soft_cap)
        s = s * LOG2E
    elif FOLD_SCALE:  # raw logits: the scale rides on the row max and on exp2's FMA
        s = qk
    else:
        s = qk * qk_scale
    if MASKED:
        keep = n_valid[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos[:, None])
        if WINDOW:
            keep = keep & (offs_n[None, :] >= pos[:, None] - window_left)
        if HAS_MASK:
            bit = r.to(tl.int64)[:, None] * kv_len + offs_n[None, :]
            byte = tl.load(MASK + mask_base + bit // 8, mask=valid_m[:, None] & n_valid[None, :], other=0)
            keep = keep & (((byte.to(tl.int32) >> (bit % 8).to(tl.int32)) & 1) != 0)
        s = tl.where(keep, s, float("-inf"))
    if FOLD_SCALE:  # qk_scale > 0, so max(s) * qk_scale is the max of the scaled logits
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 finite
    if FOLD_SCALE:
        p = tl.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    if TMA:
        v = tl.reshape(V_DESC.load([kv_base + start, hk, 0]), [BLOCK_N, offs_dv.shape[0]])
        if MASKED:  # rows past this request's keys belong to others (or to no one): p is 0 there, v must be finite
            v = tl.where(n_valid[:, None], v, 0.0)
    else:
        v = _load_rows(v_row, offs_dv, n_valid, dv_mask, MASKED, PAD_DV, KV_EVICT)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PREC)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i, nxt_page, nxt_slot, far_page, far_slot


# ------------------------------------------------------------------------------ the kernels
@triton.jit(do_not_specialize=["num_split_items", "num_pages", "num_q_rows", "single_qo_len", "single_kv_len", "single_chunk",
                               "single_n_split", "window_left"])
def _attn_fwd_kernel(
    Q, K, V, K_DESC, V_DESC, O, LSE, PO, PLSE,
    WORK, SPLIT_WORK, QO_INDPTR, KV_INDPTR, KV_INDICES, KV_LENS, MASK, MASK_INDPTR, FREQS,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    num_split_items, num_kv_heads, num_pages, num_q_rows,
    single_qo_len, single_kv_len, single_chunk, single_n_split,
    window_left, sm_scale, soft_cap, alibi_n, v_scale, lse_scale,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, D_QK: tl.constexpr, D_VO: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DVO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WORKLIST: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    HAS_MASK: tl.constexpr, POS: tl.constexpr, SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, PAGE_AHEAD: tl.constexpr, FOLD_SCALE: tl.constexpr,
    KV_EVICT: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr, LEAN: tl.constexpr = False,
    KV_SAME: tl.constexpr = False,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    if PDL == 1:  # the merge kernel may launch now: its programs wait (gdc_wait) for this grid to finish
        gdc_launch_dependents()
    # ---- which rows and keys this program owns
    if WORKLIST:
        is_split = pid < num_split_items
        item = tl.where(is_split, SPLIT_WORK + pid * 4, WORK + (pid - num_split_items) * 4)
        slot = tl.where(is_split, pid, -1)
        b = tl.load(item)
        if b < 0:
            return  # idle item (padding of a frozen CUDA-graph list)
        m_start = tl.load(item + 1)
        kv_lo = tl.load(item + 2)
        kv_hi = tl.load(item + 3)
        qo_start = tl.load(QO_INDPTR + b)
        qo_len = tl.load(QO_INDPTR + b + 1) - qo_start
        kv_base = tl.load(KV_INDPTR + b)
        kv_cap = tl.load(KV_INDPTR + b + 1) - kv_base  # pages (paged) or rows (ragged) owned
        if PAGED:
            kv_len = tl.minimum(tl.load(KV_LENS + b), kv_cap * PAGE_SIZE)
        else:
            kv_len = kv_cap
        mask_base = 0
        if HAS_MASK:
            mask_base = tl.load(MASK_INDPTR + b).to(tl.int64)
    else:
        tile = pid // single_n_split
        split = pid % single_n_split
        slot = tl.where(single_n_split > 1, pid, -1)
        m_start = tile * BLOCK_M
        qo_start = 0
        qo_len = single_qo_len
        kv_base = 0
        kv_len = single_kv_len
        kv_lo = split * single_chunk
        kv_hi = kv_lo + single_chunk
        mask_base = 0
    kv_len = tl.maximum(kv_len, 0)
    delta = kv_len - qo_len  # p_r = r + delta
    r_first = m_start // GROUP
    r_last = tl.minimum((m_start + BLOCK_M - 1) // GROUP, qo_len - 1)
    kv_hi = tl.minimum(kv_hi, kv_len)
    if CAUSAL:
        kv_hi = tl.minimum(kv_hi, r_last + delta + 1)
    if WINDOW:
        kv_lo = tl.maximum(kv_lo, r_first + delta - window_left)
    kv_lo = tl.maximum(kv_lo, 0)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    r = offs_m // GROUP
    valid_m = (offs_m < qo_len * GROUP) & (qo_start + r < num_q_rows)  # rows past q: memory safety
    h = hk * GROUP + offs_m % GROUP
    pos = r + delta
    offs_d = tl.arange(0, BLOCK_DQK)
    d_mask = offs_d < D_QK
    offs_dv = tl.arange(0, BLOCK_DVO)
    dv_mask = offs_dv < D_VO

    # ---- the query tile [BLOCK_M, D_qk] (rotated at p_r for RoPE)
    q_row = Q + (qo_start + r).to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh
    q = tl.load(q_row[:, None] + offs_d[None, :], mask=valid_m[:, None] & d_mask[None, :], other=0.0)
    partner_d = offs_d
    sign_d = offs_d.to(tl.float32)
    freq_d = sign_d
    if POS == 1:
        half: tl.constexpr = D_QK // 2
        partner_d = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign_d = tl.where(offs_d < half, -1.0, 1.0)
        freq_d = tl.load(FREQS + offs_d % half, mask=d_mask, other=0.0)
        qp = tl.load(q_row[:, None] + partner_d[None, :], mask=valid_m[:, None] & d_mask[None, :], other=0.0)
        q = _rope(q, qp, pos, freq_d, sign_d).to(Q.dtype.element_ty)
    slope = sign_d
    if POS == 2:  # ALiBi slope of head h (spec §0.4 step 3), alibi_n = 2^floor(log2 H_qo)
        hf = h.to(tl.float32)
        slope = tl.where(h < alibi_n, tl.exp2(-8.0 * (hf + 1.0) / alibi_n),
                         tl.exp2(-4.0 * (2.0 * (hf - alibi_n) + 1.0) / alibi_n))
    qk_scale = sm_scale * LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_DVO], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- three key ranges: [kv_lo, a) masked (window edge), [a, c) unmasked, [c, kv_hi) masked
    a = kv_lo
    c = kv_lo
    if not HAS_MASK:
        if WINDOW:  # keys >= r_last + delta - window_left are inside every row's window
            a = kv_lo + tl.maximum(tl.cdiv(r_last + delta - window_left - kv_lo, BLOCK_N), 0) * BLOCK_N
            a = tl.minimum(a, kv_hi)
        full_end = kv_hi
        if CAUSAL:  # keys <= r_first + delta are visible to every row
            full_end = tl.minimum(full_end, r_first + delta + 1)
        c = a + tl.maximum(full_end - a, 0) // BLOCK_N * BLOCK_N
    for seg in tl.static_range(3):  # unrolled: the middle range runs the unmasked tile
        if seg == 0:
            lo, hi = kv_lo, a
        elif seg == 1:
            lo, hi = a, c
        else:
            lo, hi = c, kv_hi
        offs_lo = lo + tl.arange(0, BLOCK_N)
        kpage, kslot = _kv_rows(KV_INDICES, kv_base, offs_lo, offs_lo < kv_hi, num_pages, PAGED, PAGE_SIZE, LEAN)
        kpage1, kslot1 = kpage, kslot
        if PAGED and PAGE_AHEAD == 2:
            offs_lo1 = offs_lo + BLOCK_N
            kpage1, kslot1 = _kv_rows(KV_INDICES, kv_base, offs_lo1, offs_lo1 < kv_hi, num_pages, PAGED, PAGE_SIZE,
                                      LEAN)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i, kpage, kslot, kpage1, kslot1 = _attend_tile(
                acc, m_i, l_i, q, start, kpage, kslot, kpage1, kslot1, K, V, K_DESC, V_DESC, KV_INDICES, MASK, FREQS,
                kv_base, kv_hi, kv_len, num_pages, mask_base,
                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                hk, r, pos, valid_m, slope, qk_scale, sm_scale, soft_cap, window_left,
                offs_d, d_mask, offs_dv, dv_mask, partner_d, sign_d, freq_d,
                BLOCK_N, seg != 1, PAGED, PAGE_SIZE, CAUSAL, WINDOW, HAS_MASK, POS, SOFTCAP, UPCAST, PREC,
                BLOCK_DQK != D_QK, BLOCK_DVO != D_VO, PAGE_AHEAD, FOLD_SCALE, KV_EVICT, TMA, LEAN, KV_SAME)

    if PDL == 2:  # the merge kernel may launch once every program is this far (see merge_pdl)
        gdc_launch_dependents()
    # ---- finish: empty rows give o = 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    if slot >= 0:  # split item: normalised partial state into the scratch tile
        prow = (slot.to(tl.int64) * num_kv_heads + hk) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(PO + prow[:, None] * D_VO + offs_dv[None, :], o, mask=valid_m[:, None] & dv_mask[None, :])
        tl.store(PLSE + prow, lse2, mask=valid_m)
    else:
        orow = (qo_start + r).to(tl.int64)
        o_ptr = O + orow[:, None] * stride_ot + h.to(tl.int64)[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptr, (o * v_scale).to(O.dtype.element_ty), mask=valid_m[:, None] & dv_mask[None, :])
        tl.store(LSE + orow * stride_lt + h * stride_lh, lse2 * lse_scale, mask=valid_m)


@triton.jit(do_not_specialize=["num_q_rows", "single_qo_len", "single_n_split", "d_split"])
def _merge_kernel(
    O, LSE, PO, PLSE, MERGE, QO_INDPTR,
    stride_ot, stride_oh, stride_lt, stride_lh,
    num_kv_heads, num_q_rows, single_qo_len, single_n_split, d_split, v_scale, lse_scale,
    GROUP: tl.constexpr, D_VO: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, WORKLIST: tl.constexpr, PDL: tl.constexpr,
):
    # Program (merge row e, KV head hk, D-chunk lane j): combine the `count` partial tiles of one
    # (request, m tile) in item order, for every live chunk of ROWS rows and the D chunks
    # [j, j + d_split, ...] of BLOCK_D columns, SPLIT_BLOCK partials per step so their loads are
    # in flight together (spec §0.5 merge, folded online; empty partials contribute 0). Each
    # (row chunk, D chunk) is folded by the same code whatever d_split is (a runtime argument),
    # so results do not depend on how the launch spreads chunks over programs; row chunks past
    # the request's rows are never visited (decode: a 16-row tile holds one 4-row group).
    e = tl.program_id(0)
    hk = tl.program_id(1)
    if WORKLIST:
        b = tl.load(MERGE + e * 4)
        if b < 0:
            return
        m_start = tl.load(MERGE + e * 4 + 1)
        first = tl.load(MERGE + e * 4 + 2)
        count = tl.load(MERGE + e * 4 + 3)
        qo_start = tl.load(QO_INDPTR + b)
        qo_len = tl.load(QO_INDPTR + b + 1) - qo_start
    else:
        m_start = e * BLOCK_M
        first = e * single_n_split
        count = single_n_split
        qo_start = 0
        qo_len = single_qo_len
    live_rows = tl.minimum(qo_len * GROUP - m_start, BLOCK_M)
    D_CHUNKS: tl.constexpr = (D_VO + BLOCK_D - 1) // BLOCK_D
    if PDL != 0:  # launched while the attention grid runs: wait for it (and its partial stores) to finish
        gdc_wait()
    for row0 in range(0, live_rows, ROWS):
        offs_t = row0 + tl.arange(0, ROWS)  # rows of the tile
        offs_m = m_start + offs_t
        valid_m = (offs_m < qo_len * GROUP) & (qo_start + offs_m // GROUP < num_q_rows)
        r = offs_m // GROUP
        h = hk * GROUP + offs_m % GROUP
        orow = (qo_start + r).to(tl.int64)
        for dc in range(tl.program_id(2), D_CHUNKS, d_split):
            offs_d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D_VO
            acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            m_run = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            d_run = tl.zeros([ROWS], dtype=tl.float32)
            for s0 in range(0, count, SPLIT_BLOCK):
                sidx = s0 + tl.arange(0, SPLIT_BLOCK)
                # int32 offsets (the planner keeps partial scratch below 2^31 elements): fewer registers
                prow = ((first + sidx)[:, None] * num_kv_heads + hk) * BLOCK_M + offs_t[None, :]
                lmask = (sidx < count)[:, None] & valid_m[None, :]
                s = tl.load(PLSE + prow, mask=lmask, other=float("-inf"))  # [SPLIT_BLOCK, ROWS]
                o = tl.load(PO + prow[:, :, None] * D_VO + offs_d[None, None, :],
                            mask=lmask[:, :, None] & d_mask[None, None, :], other=0.0)
                m_new = tl.maximum(m_run, tl.max(s, 0))
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_run - shift)
                w = tl.where(s == float("-inf"), 0.0, tl.exp2(s - shift[None, :]))
                acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
                d_run = d_run * alpha + tl.sum(w, 0)
                m_run = m_new
            o, lse2 = online_merge_finish(acc, m_run[:, None], d_run[:, None])
            o_ptr = O + orow[:, None] * stride_ot + h.to(tl.int64)[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptr, (o * v_scale).to(O.dtype.element_ty), mask=valid_m[:, None] & d_mask[None, :])
            lse_rows = tl.reshape(lse2, [ROWS])
            if dc == 0:
                tl.store(LSE + orow * stride_lt + h * stride_lh, lse_rows * lse_scale, mask=valid_m)


# ------------------------------------------------------------------------- launch heuristics
_CPU_SMS = 4  # the interpreter's pretend SM count (keeps CPU schedules small but split-capable)


def num_sms(device) -> int:
    """Multiprocessors of ``device`` (the split-KV planner's notion of machine width)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _config.sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _CPU_SMS


def tile_m(group: int, max_qo_len: int) -> int:
    """Rows of the flattened (query row, group head) index per program: 16..128 (tl.dot needs
    >= 16 rows), the smallest power of two holding one request's rows, capped at 128."""
    need = max(1, group * max(max_qo_len, 1))
    return int(min(128, max(16, next_pow2(need))))


def live_items(grid0: int, n_split_items: int, has_split: bool, n_requests: Optional[int], q_tiles: int) -> int:
    """Programs along grid axis 0 expected to do work, from shapes only (the lists stay on the
    device): the idle no-split rows exit at once, and an unsplit work list padded past its real
    items (at least 2 rows; frozen CUDA-graph sizes) is estimated at max(requests, query-row
    tiles) -- a single decode request has one item, not the list's two rows."""
    live = grid0 - (n_split_items if not has_split else 0)
    if n_requests is not None and not has_split:
        live = min(live, max(n_requests, q_tiles))
    return max(live, 1)


def wide_tiles(dtype: torch.dtype, d_qk: int, d_vo: int) -> bool:
    """fp32, or a head dim past 128: key tiles of half the width (``attn_config``)."""
    return dtype == torch.float32 or max(d_qk, d_vo) > 128


def attn_config(block_m: int, d_qk: int, d_vo: int, dtype: torch.dtype, device,
                n_programs: Optional[int] = None, keys_per_program: Optional[int] = None,
                split: bool = False, tma: bool = False, group: int = 1, fixed: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the attention kernel: the one place it is tuned.
    Measured on an H100 (benchmarks/tune_attention.py, bf16, D=128, 2026-11-25): prefill tiles
    (64/128 rows) run best with 64-key tiles and 3 stages; decode tiles (16/32 rows) with 2
    stages when the grid fills the machine (occupancy hides the latency: 5 programs per SM fit
    in shared memory; B=64 x 8 KV heads, 512 programs: 374 vs 431 us) but 3 stages below three
    programs per SM (B=16, 512 keys: 27.2 -> 23.6 us; 256 programs of 4096 keys: 210 -> 199 us),
    since then only the pipeline can hide it -- unless a program has two key tiles or fewer, with
    little to overlap (B=32 x 64 keys: 10.0 us with 2 stages, 11.0 with 3; B=1 x 4096 keys in
    128-key splits, 8 warps: 15.0 us with 2 stages, 16.8 with 3). Below three
    programs per SM a decode tile also takes 8 warps: such launches are bound by one warp's
    instruction latency, not by bandwidth (Nsight Compute: 6% achieved occupancy, fixed-latency
    stalls), and 8 warps share a tile's address and softmax work (H100, 2026-11-25: B=8 x 256
    keys 12.4 -> 10.6 us, B=1 x 128 keys 8.0 -> 7.2, B=1 x 512 keys 12.7 -> 11.6, B=32 x 64 keys
    8.6 -> 8.1; at 4 programs per SM they lose: B=16 x 1024 keys 39.5 -> 44.0 us).
    An unsplit launch of under one program per SM whose programs hold one to two 64-key tiles
    takes them as one 128-key tile (B=1 x 128 keys: 7.8 -> 6.1 us). 128-row prefill tiles whose
    keys arrive by TMA (``tma``, see ``use_tma``) take 128-key tiles, 8 warps, 3 stages (H200,
    2026-12-04, causal bf16 D=128: ragged B=4 x 4096 426-427 TFLOP/s against 410-411 with the
    pointer loads' 64-key tiles, B=1 x 16384 471-476 against 442-444; TMA at 64-key tiles 400-401,
    at 2 stages 403). ``n_programs``, ``keys_per_program`` (an average), ``split`` (the plan has
    split-KV items) and ``tma`` come from the launch. ``fixed`` (plans with ``fixed_split_size``
    or ``disable_split_kv``): ignore the launch's size, so the key-tile width and warp count, and
    with them a row's summation order, are the same whatever the batch (bitwise batch invariance)."""
    d = max(next_pow2(d_qk), next_pow2(d_vo))
    if torch.device(device).type != "cuda":
        return 32 if d > 128 else 64, 4, 1
    wide = wide_tiles(dtype, d_qk, d_vo)
    if block_m >= 128:
        return (128, 8, 3) if tma and not wide else ((32 if wide else 64), 8, (2 if wide else 3))
    if block_m >= 64:
        return (32 if wide else 64), 4, (2 if wide else 3)
    block_n = 32 if wide else 64
    if fixed:
        return block_n, 4, 2
    if not split and n_programs is not None and keys_per_program is not None and \
            whole_requests(n_programs, keys_per_program, block_m, wide, device, group):
        return 128, 8, 3
    small_grid = n_programs is not None and n_programs < 3 * num_sms(device)
    if n_programs is not None and n_programs < num_sms(device) and not wide and not split and \
            keys_per_program is not None and block_n < keys_per_program <= 2 * block_n:
        return 2 * block_n, 8, 2
    few = small_grid and (keys_per_program is None or keys_per_program > 2 * block_n)
    return block_n, (8 if small_grid and not wide else 4), (3 if few and not wide else 2)


def page_ahead(block_m: int, num_stages: int, n_programs: int, keys_per_program: int, device) -> int:
    """How many key tiles ahead the paged loop loads page ids. 1: the next tile's ids, inside
    the chain that issues its K/V copies; the software pipeliner overlaps that chain with
    compute (3 stages). 2: off that chain; Triton then does not pipeline the loop (plain loads,
    no async copies), which pays only for decode tiles at 2 stages with about a wave of programs
    (H100, 2026-11-25: B=1 x 32k keys 64.5 -> 61.9 us, 4 KV heads 45.3 -> 43.0 us; B=64 x 4096
    keys 375.9 -> 373.2 us) and loses elsewhere (3-stage decode B=16 x 1024 keys 41.1 -> 52.8
    us, paged prefill 322 -> 223 TFLOP/s, 1024 programs of a 33k-key flat cascade 2891 -> 3350 us).
    On an H200 (2026-12-04) two ahead pays only while a program holds at most 1024 keys (split
    chunks: B=1 x 32k keys 49.3 -> 47.5 us, 4 KV heads 35.6 -> 33.1; B=4 x 4096 30.2 -> 27.9;
    B=1 x 4096 16.0 -> 14.0; B=16 x 4096, 1024-key chunks, 88.6 vs 88.5) and loses with long
    ones (B=64 x 4096 keys unsplit 262.6 -> 287.7 us, B=16 x 32k in 8k-key chunks 512.7 ->
    572.5, B=16 x 8192 150.5 -> 158.9); the H100's one long-range gain above was 0.7%."""
    if torch.device(device).type != "cuda":
        return 2 if block_m <= 32 else 1  # both paths stay covered by the interpreter tests
    return 2 if (block_m <= 32 and num_stages <= 2 and n_programs <= 5 * num_sms(device)
                 and keys_per_program <= 1024) else 1


def register_cap(block_m: int, num_warps: int, ahead: int, device) -> Optional[int]:
    """Registers per thread the attention kernel may use (``maxnreg``), or None for ptxas's
    choice. A 4-warp decode tile whose page ids run two tiles ahead takes 152 registers, so
    only 3 programs fit an SM's register file where the split planner counts on 4
    (``resident_programs``); capped at 128 (ptxas spills ~20 bytes), 4 fit. Measured on an H200
    (2026-12-04, twice each, against the uncapped kernel in the same call): never slower, B=16
    x 4096 keys 87.2 -> 86.0-86.4 us, B=1 x 32k 46.7-46.9 -> 46.3-46.4, B=64 x 1024 84.3-84.4 ->
    83.5-83.6, B=16 x 1024 29.6-29.7 -> 29.4-29.5, B=1 x 32k with 4 KV heads 32.7 -> 32.6."""
    if torch.device(device).type != "cuda" or block_m > 32 or num_warps != 4 or ahead != 2:
        return None
    return 128


LEAN_ADDRESSING = True  # False: int64 page/slot arithmetic everywhere (the form before lean_addressing)
_I32 = 2 ** 31


def lean_addressing(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the attention kernel may address K/V rows of the 4-D views ``[P, page, H_kv, D]``
    with int32 page ids and slots, one 32x32->64-bit multiply per row for the page term and int32
    arithmetic inside a page (``_kv_offsets``): every stride in [0, 2^31) and every offset inside
    one page below 2^31. Where K and V share strides the launcher also sets ``KV_SAME`` (one
    offset per row for both). Offline sm_90 compiles (``scripts/inspect_attention_ir.py``
    specialisation, bf16 D=128 GQA-4; SASS of the unmasked key loop, instructions / integer
    instructions per key tile, int64 form -> this one, 2026-12-05): decode (16 rows, 64 keys, 4
    warps, 2 stages, ids two ahead, 128-register cap) 647 / 411 -> 468 / 234 (but 12 bytes
    spilled, 1 local access a tile); decode (64, 8 warps, 3 stages) 356 / 192 -> 261 / 96 (97 ->
    80 registers); decode (128 keys, 8 warps, 2 stages) 623 / 394 -> 431 / 203; paged prefill
    (128 rows, 64 keys, 8 warps, 3 stages) 510 / 192 -> 411 / 92; ragged prefill 408 / 94 -> 375
    / 64. H100, 2026-12-05, ``python -m benchmarks.tune_attention lean`` (alternating twice,
    against the int64 form): never slower; B=16 x 512 keys 21.8-22.0 vs 22.2-22.4 us, B=1 x 512
    9.6 vs 9.8-10.1, in-place paged prefill 381 vs 354-357 TFLOP/s; KV >= 1 GB within 0.3%."""
    if not LEAN_ADDRESSING:
        return False
    for t in (k, v):
        st = t.stride()
        if any(x < 0 or x >= _I32 for n, x in zip(t.shape, st) if n > 1):  # a size-1 dim's stride never multiplies
            return False
        if sum((n - 1) * x for n, x in zip(t.shape[1:], st[1:])) + 1 >= _I32:
            return False
    return True


def tma_eligible(k: torch.Tensor, v: torch.Tensor, paged: bool, pos: int) -> bool:
    """Whether ragged K/V key tiles *can* be loaded by tensor-memory-accelerator bulk copies (one
    descriptor per K and V over [rows, H_kv, D]) instead of per-row pointer gathers: ragged rows
    (page == 1), power-of-two head dims of 16..256 (the copy box is the whole head), 16-byte
    aligned bases and row/head strides, no RoPE on K (its partner-half loads are pointer
    gathers), and an sm_90+ device or the interpreter."""
    if paged or pos == 1 or k.shape[0] == 0 or v.shape[0] == 0:  # (no rows: a descriptor needs a positive extent)
        return False
    for t in (k, v):
        d = t.shape[-1]
        if d < 16 or d > 256 or d & (d - 1) or t.stride(-1) != 1:
            return False
        es = t.element_size()
        if t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(2) * es) % 16:
            return False
    if k.device.type == "cuda":
        return _sm_major(k.device.index) >= 9
    return _config.interpreting()


TMA_MIN_KV_LEN = 4096  # mean keys per request from which 128-key TMA tiles pay (see tma_pays)


def tma_pays(block_m: int, d: int, itemsize: int, mean_kv_len: float) -> bool:
    """Whether a CUDA launch takes ragged key tiles by TMA (then 128 keys a tile, ``attn_config``):
    128-row prefill tiles of 16-bit data with head dims up to 128 over long requests. Measured on
    an H200 (2026-12-04, causal bf16 D=128, 32/8 heads, against the pointer loads in the same
    call): ragged B=4 x 4096 +4%, B=1 x 16384 +7%, paged B=4 x 4096 through the gathered-K/V path
    +4% (394 -> 407-410 TFLOP/s); but ragged B=16 x 1024 -5% (277-279 -> 262-263): short causal
    requests waste more of a 128-key tile on the diagonal."""
    return block_m >= 128 and itemsize == 2 and d <= 128 and mean_kv_len >= TMA_MIN_KV_LEN


def use_tma(k: torch.Tensor, v: torch.Tensor, paged: bool, pos: int, block_m: int, mean_kv_len: float) -> bool:
    """Whether this launch loads ragged key tiles by TMA: wherever eligible under the
    interpreter (so the CPU tests cover the path at every tile size), on CUDA where
    ``tma_pays``. ``benchmarks/tune_attention.py tma128`` times it against the pointer loads."""
    if not tma_eligible(k, v, paged, pos):
        return False
    if k.device.type != "cuda":
        return True
    return tma_pays(block_m, max(k.shape[-1], v.shape[-1]), k.element_size(), mean_kv_len)


def kv_eviction(has_split: bool, device) -> str:
    """L2 eviction policy of the K/V loads: "evict_first" when the launch has split-KV items, so
    the streamed keys do not push the partial tiles the merge kernel reads next out of L2 (B=1
    x 32k keys, 4 KV heads: the merge hit L2 for 35% of its reads). Triton 3.6 applies it to
    plain loads only (the 2-stage, page-ids-two-ahead decode loop), not to async copies."""
    if torch.device(device).type != "cuda":
        return ""
    return "evict_first" if has_split else ""


def fold_scale(sm_scale: float, soft_cap: bool, pos: int) -> bool:
    """Whether the kernel keeps raw logits and applies ``sm_scale * log2(e)`` inside the row
    max and exp2's argument (one FMA per logit instead of a multiply, then a subtract). Needs a
    positive scale (max commutes with it; -inf * scale stays -inf) and no soft cap or ALiBi
    (those transform the scaled logit first)."""
    return sm_scale > 0 and not soft_cap and pos != 2


def merge_config(block_m: int, d_vo: int, group: int) -> tuple[int, int, int, int]:
    """(ROWS, SPLIT_BLOCK, BLOCK_D, num_warps) of the merge kernel: row chunks of one GQA group
    (at least 4 rows), 16-column D chunks and 64 partials per step for 4-row chunks, so a long
    request's many splits fold in a step or two over many small programs. Measured on an H100
    (B=1 x 32k keys, 4 KV heads, 128 splits: merge 19.8 us with the older 16-row x 16-split
    steps; whole decode 43.3 us with 128-split steps, 37.8 us with these). The fold order
    depends only on these constants, never on the batch: a request's result is bitwise the
    same alone or batched (under a fixed split size). Prefill tiles (64/128 rows, all live) keep
    whole-tile programs: 4-row chunks of a 128-row shared-prefix tile made 8192 tiny programs
    and the cascade 291 -> 319 us."""
    if block_m >= 64:  # prefill tiles (a shared prefix): whole tiles, 64 columns, 8192 elements a step
        block_d = min(64, next_pow2(d_vo))
        split_block = max(1, min(64, 8192 // (block_m * block_d)))
        return block_m, split_block, block_d, 8 if split_block * block_m * block_d > 4096 else 4
    rows = min(block_m, max(4, next_pow2(group)))
    block_d = min(16, next_pow2(d_vo))
    return rows, max(1, min(64, 4096 // (rows * block_d))), block_d, 4


def merge_pdl(n_split_items: int, n_merge_rows: int, device) -> int:
    """How the merge kernel follows the attention kernel: 0, a plain launch; 1 and 2,
    programmatic dependent launch (sm_90+), so its launch latency overlaps the attention grid
    and its programs wait in ``gdc_wait`` until that grid has finished and its partial stores
    are visible. The attention programs allow the launch at their start (1) while the tiles
    average at most 16 partials (the merge is short), else after their key loop (2).
    Measured on an H200 (2026-12-04, decode, twice each, against a plain launch in the same
    call): at the start, B=1 x 512 keys 11.2 -> 10.2 us, B=16 x 1024 30.6-30.8 -> 29.7, B=16 x
    4096 88.3-88.6 -> 87.1-87.4, but B=1 x 32k keys with 4 KV heads (128 partials a tile)
    32.8 -> 36.1; after the key loop, never slower: B=1 x 32k 47.4 -> 46.7-46.9 (8 KV heads, 64
    partials a tile), 32.8-33.0 -> 32.0-32.6 (4 KV heads). Off under the interpreter."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    if _sm_major(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    return 1 if n_split_items <= 16 * max(n_merge_rows, 1) else 2


_sm_major = _config.sm_major  # cached per device (tests clear it through this name)


def merge_d_split(n_programs: int, d_chunks: int, device) -> int:
    """Programs per (merge row, KV head) of the merge kernel, each taking every d_split-th
    BLOCK_D column chunk: enough for ~4 programs per SM, at most one per chunk. Results do not
    depend on it. (H100, 2026-11-25, B=16 x 512 keys, 8 KV heads: one program per (row chunk,
    column chunk) meant 4096 programs, 3 of 4 exiting at once, and an 8.5 us merge after a 14.1
    us attention kernel.)"""
    target = 4 * num_sms(device)
    return max(1, min(d_chunks, next_pow2(max(1, target // max(n_programs, 1)))))


def _old_floors(n_programs: int, block_m: int, group: int) -> bool:
    """Where split_min_keys / split_min_chunk keep the floors measured before the PDL merge:
    tall (prefill) tiles, and GQA groups over 4 past 64 programs (H200, 2026-12-04, 4 KV heads
    of 32 q heads: B=24 x 512 keys 16.6 us whole, 24.5 in 128-key chunks; B=32 x 384 18.4 vs
    25.5; not understood, so not split)."""
    return block_m > 32 or (n_programs > 64 and group > 4)


def split_min_keys(block_n: int, device, n_programs: int, block_m: int = 16, group: int = 1) -> int:
    """A tile's key range is split only when it holds more keys than this. Decode tiles
    (``block_m <= 32``) on an H200 (2026-12-04, the merge launched by PDL, CUDA-graph replays,
    same-call pairs unsplit -> split with 64-key chunk floors): up to 64 programs requests over
    256 keys pay (B=8 x 512 keys 15.8 -> 12.9 us, B=4 x 512 15.7 -> 10.6, B=8 x 384 13.1 ->
    12.0; B=8 x 256 does not: 10.5 -> 10.7); past 64 programs only over 384 keys (B=16 x 512
    22.6 -> 19.8, B=16 x 768 27.3 -> 24.5, B=12 x 640 22.7 -> 19.3; see ``_old_floors``). Before
    the PDL merge (H100, 2026-11-25) a 512-key request ran faster whole past 16 programs
    (B=16 x 512: 23.2 us unsplit, 26.7 split): that floor, 8 tiles, stays for taller tiles.
    The interpreter splits everything."""
    if torch.device(device).type != "cuda" or n_programs <= 16:
        return 0
    if _old_floors(n_programs, block_m, group):
        return 8 * block_n
    return max(4 * block_n, 256) if n_programs <= 64 else max(6 * block_n, 384)


def split_min_chunk(block_n: int, device, n_programs: int, block_m: int = 16, group: int = 1) -> int:
    """Fewest keys a split-KV chunk may hold. Few programs (at most 16): 128 (H100, decode,
    D=128, 2026-11-25: B=1 x 512 keys, 8 programs, 15.3 -> 12.3 us; on the H200, 2026-12-04,
    64-key chunks lost at B=1 x 128: 6.3 -> 7.8 us). More: one key tile for decode tiles (H200,
    2026-12-04, with the PDL merge, 256-key -> 64-key floors: B=4 x 1024 keys 17.6 -> 12.7 us,
    B=8 x 1024 20.2 -> 17.8, B=4 x 2048 20.1 -> 17.8, B=8 x 512 with 4 KV heads 12.0 against
    14.0 for 128-key floors), 256 for taller tiles (H100, B=16 x 1024: unsplit 41.6 us, 256-key
    chunks 39.6, 512-key 44.2). The interpreter keeps short chunks so small CPU tests still
    split."""
    if torch.device(device).type != "cuda":
        return 2 * block_n
    if n_programs <= 16:
        return max(2 * block_n, 128)
    return max(4 * block_n, 256) if _old_floors(n_programs, block_m, group) else max(block_n, 64)


WHOLE_MIN_PROGRAMS = 48  # whole_requests: (request, KV head) programs, at least ...
WHOLE_KEYS = (512, 2048)  # ... and keys per program, inclusive


def whole_requests(n_programs: int, keys_per_program: int, block_m: int, wide: bool, device, group: int = 1) -> bool:
    """Whether a decode launch of at most one program per SM runs whole requests (no split-KV,
    so no merge launch) in 128-key tiles with 8 warps and 3 stages (``attn_config``). H100,
    2026-12-05, CUDA-graph replays against the split plan with the split configs (us): B=16 x 512
    keys, 8 KV heads (128 programs) 22.0 -> 19.5; 4 KV heads (64) 14.8 -> 13.6; B=32 x 512, 4 KV
    heads 20.6 -> 19.4; B=16 x 1024 34.3 -> 32.0; B=16 x 2048 59.2 -> 56.9 (re-timed with the rule
    in place, alternating twice: 21.7 -> 19.3-19.5, 14.8 -> 13.6-13.7, 20.7-20.8 -> 19.2-19.3,
    34.2 -> 32.0-32.2, 59.1-59.3 -> 57.0). Not taken where it lost: more programs than SMs (B=24
    x 512, 8 KV heads: 25.7 -> 29.1; a 192 KB program fits an SM once), two 128-key tiles a
    program (B=32 x 256: 18.9 -> 23.0), and up to 64 programs of GQA groups of at most 4 (B=8 x
    512, 8 KV heads: 13.0-13.4 -> 13.6-13.7), where the split plan has fewer chunks to merge.
    16-bit K/V with D <= 128 only (``wide``: 32-key tiles). The planner (``_schedule``) and the
    launcher (``attn_config``) ask the same question, each with its own estimate of keys per
    program."""
    return torch.device(device).type == "cuda" and _whole_rule(n_programs, keys_per_program, block_m, wide,
                                                                num_sms(device), group)


def _whole_rule(n_programs: int, keys_per_program: int, block_m: int, wide: bool, sms: int, group: int = 1) -> bool:
    lo, hi = WHOLE_KEYS
    return (block_m <= 32 and not wide and WHOLE_MIN_PROGRAMS <= n_programs <= sms and lo <= keys_per_program <= hi
            and (n_programs > 64 or group > 4))


def resident_programs(block_m: int) -> int:
    """Programs of the attention kernel one SM runs at once (H100, bf16, D=128: the 16/32-row
    decode tiles use 40-72 KB of shared memory, the 64-row tiles ~112 KB, the 128-row tiles
    ~128 KB). Split-KV aims for one wave of these; for the 128-row tiles of a shared prefix
    (cascade) one program per SM measured best (300 us vs 310 us with two)."""
    return 4 if block_m <= 32 else (2 if block_m <= 64 else 1)


def split_target(n_programs: int, block_m: int, device) -> int:
    """How many programs split-KV should aim for (0: do not split): one full wave of the
    machine, and only when the unsplit tiles fill at most half of it and fewer than one program
    per SM (a second, partial wave would cost more than the split saves; at about two programs
    per SM, e.g. B=64 x 4 KV heads x 4096 keys on an H100, the unsplit grid with a pipelined
    loop ran 199 us, split in two 224 us)."""
    wave = num_sms(device) * resident_programs(block_m)
    return wave if 2 * n_programs <= wave and n_programs < num_sms(device) else 0


def partial_item_bytes(num_kv_heads: int, block_m: int, d_vo: int) -> int:
    """Scratch bytes one split item needs: its fp32 partial o tile and lse per KV head."""
    return num_kv_heads * block_m * (d_vo + 1) * 4


# -------------------------------------------------------------------------------- launchers
def _pos_code(pos_encoding_mode: str) -> int:
    return POS_ENCODING_MODES[pos_encoding_mode]


def _rope_freqs(pos: int, d_qk: int, rope_scale: float, rope_theta: float, device) -> Optional[torch.Tensor]:
    """fp32 ``[D/2]`` rotate-half frequencies (computed in fp64, rounded once) or None."""
    if pos != 1:
        return None
    i = torch.arange(d_qk // 2, dtype=torch.float64, device=device)
    return (rope_theta ** (-2.0 * i / d_qk) / rope_scale).to(torch.float32)


def _launch(q, k, v, o, lse, *, paged, worklist, group, page_size, num_pages, block_m,
            work=None, split_work=None, merge=None, qo_indptr=None, kv_indptr=None, kv_indices=None, kv_lens=None,
            packed_mask=None, mask_indptr=None, single=None,
            causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln,
            fixed_config=False):
    """Launch the attention kernel (and the merge kernel when KV is split) on 4-D K/V views
    ``[P, page, H_kv, D]`` (ragged/single: page == 1, P = rows)."""
    R, Hq, d_qk = q.shape
    h_kv = k.shape[2]
    d_vo = v.shape[-1]
    if R == 0 or Hq == 0:
        return
    pos = _pos_code(pos_encoding_mode)
    if worklist:
        n_split_items, n_items = split_work.shape[0] // WORK_FIELDS, work.shape[0] // WORK_FIELDS
        grid0 = n_split_items + n_items
        s_qo, s_kv, s_chunk, s_nsplit = 0, 0, 1, 1
    else:
        s_qo, s_kv, s_chunk, s_nsplit = single
        n_tiles = cdiv(s_qo * group, block_m)
        n_split_items = n_tiles * s_nsplit if s_nsplit > 1 else 0
        grid0 = n_tiles * s_nsplit
    if grid0 == 0:
        return
    has_split = n_split_items > 0 and not (worklist and n_split_items == NO_SPLIT_ROWS)
    live = live_items(grid0, n_split_items, has_split, qo_indptr.shape[0] - 1 if worklist else None,
                      cdiv(R * group, block_m))
    keys = single[1] if not worklist else (kv_indices.shape[0] * page_size if paged else k.shape[0])
    keys_per_program = keys // max(live, 1)
    # fixed_config: a configuration from the tile height, head dims and dtype alone (no TMA tiles,
    # whose choice reads the batch's mean length), so a request's bits do not depend on its batch
    tma = not (fixed_config and q.device.type == "cuda") and \
        use_tma(k, v, paged, pos, block_m, keys / max(qo_indptr.shape[0] - 1 if worklist else 1, 1))
    block_n, num_warps, num_stages = attn_config(block_m, d_qk, d_vo, q.dtype, q.device, live * h_kv,
                                                 keys_per_program, split=has_split, tma=tma, group=group,
                                                 fixed=fixed_config)
    dev = q.device
    n_merge = (merge.shape[0] // WORK_FIELDS if worklist else n_tiles) if has_split else 0
    pdl = merge_pdl(n_split_items, n_merge, dev) if has_split else 0
    if fixed_config and pdl:  # (where the launch is allowed shapes the compiled kernel: one place)
        pdl = 2
    scratch = n_split_items * partial_item_bytes(h_kv, block_m, d_vo) // 4 if has_split else 0
    po = torch.empty(max(scratch, 1), dtype=torch.float32, device=dev)
    n_po = n_split_items * h_kv * block_m * d_vo
    plse = po[n_po:]
    freqs = _rope_freqs(pos, d_qk, rope_scale, rope_theta, dev)
    dummy = lse  # any tensor: pointer arguments of disabled features are never dereferenced
    window = window_left >= 0
    soft = logits_soft_cap is not None and logits_soft_cap > 0
    upcast = _config.interpreting() and q.dtype != torch.float32
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    k_desc = v_desc = None
    if tma:  # [rows, H_kv, D] views of the ragged K/V (page == 1), one key tile of one head per copy
        k_desc = TensorDescriptor(k, [k.shape[0], h_kv, d_qk], [k.stride(0), k.stride(2), 1], [block_n, 1, d_qk])
        v_desc = TensorDescriptor(v, [v.shape[0], h_kv, d_vo], [v.stride(0), v.stride(2), 1], [block_n, 1, d_vo])
    # (fixed_config: one compiled loop whatever the batch; the two forms' bits differ on an H100)
    ahead = (1 if fixed_config and dev.type == "cuda" else
             page_ahead(block_m, num_stages, live * h_kv, keys_per_program, dev)) if paged else 1
    cap = register_cap(block_m, num_warps, ahead, dev)
    reg_cap = {} if cap is None else {"maxnreg": cap}
    _attn_fwd_kernel[(grid0, h_kv)](
        q, k, v, k_desc, v_desc, o, lse, po, plse,
        work if worklist else dummy, split_work if worklist else dummy,
        qo_indptr if worklist else dummy, kv_indptr if worklist else dummy,
        kv_indices if paged else dummy, kv_lens if paged else dummy,
        packed_mask if packed_mask is not None else dummy, mask_indptr if mask_indptr is not None else dummy,
        freqs if freqs is not None else dummy,
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        n_split_items if worklist else 0, h_kv, num_pages, R,
        s_qo, s_kv, s_chunk, s_nsplit,
        window_left, float(sm_scale), float(logits_soft_cap or 0.0),
        2 ** int(math.floor(math.log2(Hq))), float(v_scale), LN2 if lse_ln else 1.0,
        GROUP=group, PAGE_SIZE=page_size if paged else 1, D_QK=d_qk, D_VO=d_vo,
        BLOCK_DQK=next_pow2(d_qk), BLOCK_DVO=next_pow2(d_vo),
        BLOCK_M=block_m, BLOCK_N=block_n,
        WORKLIST=worklist, PAGED=paged, CAUSAL=bool(causal) and packed_mask is None, WINDOW=window,
        HAS_MASK=packed_mask is not None, POS=pos, SOFTCAP=soft, UPCAST=upcast, PREC=prec,
        PAGE_AHEAD=ahead,
        FOLD_SCALE=fold_scale(float(sm_scale), soft, pos), KV_EVICT=kv_eviction(has_split, dev), TMA=tma,
        PDL=pdl, LEAN=lean_addressing(k, v), KV_SAME=k.stride()[:3] == v.stride()[:3],
        num_warps=num_warps, num_stages=num_stages, **reg_cap,
        **COMPILE_OPTIONS,
    )
    if not has_split:
        return  # no split-KV in this plan (the planner's idle-only split list has exactly that size)
    rows, split_block, block_d, merge_warps = merge_config(block_m, d_vo, group)
    d_split = merge_d_split(n_merge * h_kv, cdiv(d_vo, block_d), dev)
    _merge_kernel[(n_merge, h_kv, d_split)](
        o, lse, po, plse, merge if worklist else dummy, qo_indptr if worklist else dummy,
        o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
        h_kv, R, s_qo, s_nsplit, d_split, float(v_scale), LN2 if lse_ln else 1.0,
        GROUP=group, D_VO=d_vo, BLOCK_M=block_m, ROWS=rows, BLOCK_D=block_d, SPLIT_BLOCK=split_block,
        WORKLIST=worklist, PDL=pdl, launch_pdl=pdl != 0,
        num_warps=merge_warps,
        **COMPILE_OPTIONS,
    )


def _single_split(qo_len: int, kv_len: int, n_tiles: int, h_kv: int, block_m: int, block_n: int,
                  device, group: int = 1) -> tuple[int, int]:
    """(chunk, n_split) for a single request: split the keys when the tiles alone leave the
    machine idle (decode of one long sequence), as the batch planner does."""
    target = split_target(n_tiles * h_kv, block_m, device)
    if kv_len <= split_min_keys(block_n, device, n_tiles * h_kv, block_m, group):
        target = 0
    n_split = min(target // max(n_tiles * h_kv, 1),
                  kv_len // split_min_chunk(block_n, device, n_tiles * h_kv, block_m, group)) if target else 1
    if n_split <= 1:
        return max(kv_len, 1), 1
    chunk = cdiv(cdiv(kv_len, n_split), block_n) * block_n
    return chunk, cdiv(kv_len, chunk)


def single_attention_cuda(q, k, v, packed_mask, kv_layout, causal, window_left, sm_scale, logits_soft_cap,
                          pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o_dtype=None):
    meta.check_single(q, k, v, packed_mask, kv_layout, pos_encoding_mode)
    o, lse = meta.attention_outputs(q, meta.single_d_vo(v), o_dtype)
    K, V = meta.single_kv_views(k, v, kv_layout)
    qo_len, h_qo, d_qk = q.shape
    kv_len, h_kv = K.shape[0], K.shape[1]
    group = h_qo // h_kv
    block_m = tile_m(group, qo_len)
    block_n = attn_config(block_m, d_qk, v.shape[-1], q.dtype, q.device)[0]
    n_tiles = cdiv(qo_len * group, block_m)
    chunk, n_split = _single_split(qo_len, kv_len, n_tiles, h_kv, block_m, block_n, q.device, group)
    _launch(q, K.unsqueeze(1), V.unsqueeze(1), o, lse, paged=False, worklist=False, group=group, page_size=1,
            num_pages=kv_len, block_m=block_m, single=(qo_len, kv_len, chunk, n_split), packed_mask=packed_mask,
            causal=causal, window_left=window_left, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
            pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta, v_scale=v_scale,
            lse_ln=lse_ln)
    return o, lse


def paged_attention_out_cuda(q, k_cache, v_cache, kv_layout, work, split_work, merge, qo_indptr, kv_indptr, kv_indices,
                             kv_lens, packed_mask, mask_indptr, block_m, causal, window_left, sm_scale, logits_soft_cap,
                             pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, fixed_config, o, lse):
    K, V = paged_kv_views(k_cache, v_cache, kv_layout)
    meta.check_batch(q, K, V, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                     pos_encoding_mode, o=o, lse=lse, kv_indices=kv_indices, kv_lens=kv_lens)
    _launch(q, K, V, o, lse, paged=True, worklist=True, group=q.shape[1] // K.shape[2], page_size=K.shape[1],
            num_pages=K.shape[0], block_m=block_m, work=work, split_work=split_work, merge=merge,
            qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_lens=kv_lens,
            packed_mask=packed_mask, mask_indptr=mask_indptr, causal=causal, window_left=window_left,
            sm_scale=sm_scale, logits_soft_cap=logits_soft_cap, pos_encoding_mode=pos_encoding_mode,
            rope_scale=rope_scale, rope_theta=rope_theta, v_scale=v_scale, lse_ln=lse_ln, fixed_config=fixed_config)


def ragged_attention_out_cuda(q, k, v, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr,
                              block_m, causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale,
                              rope_theta, v_scale, lse_ln, fixed_config, o, lse):
    K, V = k.unsqueeze(1), v.unsqueeze(1)
    meta.check_batch(q, K, V, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                     pos_encoding_mode, o=o, lse=lse)
    _launch(q, K, V, o, lse, paged=False, worklist=True, group=q.shape[1] // k.shape[1], page_size=1,
            num_pages=k.shape[0], block_m=block_m, work=work, split_work=split_work, merge=merge,
            qo_indptr=qo_indptr, kv_indptr=kv_indptr, packed_mask=packed_mask, mask_indptr=mask_indptr,
            causal=causal, window_left=window_left, sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
            pos_encoding_mode=pos_encoding_mode, rope_scale=rope_scale, rope_theta=rope_theta, v_scale=v_scale,
            lse_ln=lse_ln, fixed_config=fixed_config)


def _functional(out_impl, d_vo):
    """The functional op ``(..., o_dtype) -> (o, lse)`` of an ``_out`` implementation: fresh
    contiguous outputs, then the same launch (or reference) writes them."""

    n = len(inspect.signature(out_impl).parameters) - 2  # the out impl's arguments before (o, lse)

    def impl(*args, o_dtype=None):
        if len(args) > n:
            args, o_dtype = args[:n], args[n]
        o, lse = meta.attention_outputs(args[0], d_vo(*args), o_dtype)
        out_impl(*args, o, lse)
        return o, lse

    impl.__name__ = out_impl.__name__.replace("_out", "")
    return impl


def _paged_d_vo(q, k_cache, v_cache, *rest):
    return meta.paged_d_vo(k_cache, v_cache)


def _ragged_d_vo(q, k, v, *rest):
    return v.shape[-1]


# ---------------------------------------------------- CPU impls (validated reference calls)
def _single_attention_cpu(q, k, v, packed_mask, kv_layout, causal, window_left, sm_scale, logits_soft_cap,
                          pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o_dtype=None):
    meta.check_single(q, k, v, packed_mask, kv_layout, pos_encoding_mode)
    return ref.single_attention_cpu(q, k, v, packed_mask, kv_layout, causal, window_left, sm_scale, logits_soft_cap,
                                    pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o_dtype)


def _paged_attention_out_cpu(q, k_cache, v_cache, kv_layout, work, split_work, merge, qo_indptr, kv_indptr, kv_indices,
                             kv_lens, packed_mask, mask_indptr, block_m, causal, window_left, sm_scale, logits_soft_cap,
                             pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, fixed_config, o, lse):
    K, V = paged_kv_views(k_cache, v_cache, kv_layout)
    meta.check_batch(q, K, V, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr, block_m,
                     pos_encoding_mode, o=o, lse=lse, kv_indices=kv_indices, kv_lens=kv_lens)
    ref.paged_attention_out_cpu(q, k_cache, v_cache, kv_layout, work, split_work, merge, qo_indptr, kv_indptr,
                                kv_indices, kv_lens, packed_mask, mask_indptr, block_m, causal, window_left, sm_scale,
                                logits_soft_cap, pos_encoding_mode, rope_scale, rope_theta, v_scale, lse_ln, o, lse)


def _ragged_attention_out_cpu(q, k, v, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr,
                              block_m, causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode, rope_scale,
                              rope_theta, v_scale, lse_ln, fixed_config, o, lse):
    meta.check_batch(q, k.unsqueeze(1), v.unsqueeze(1), work, split_work, merge, qo_indptr, kv_indptr, packed_mask,
                     mask_indptr, block_m, pos_encoding_mode, o=o, lse=lse)
    ref.ragged_attention_out_cpu(q, k, v, work, split_work, merge, qo_indptr, kv_indptr, packed_mask, mask_indptr,
                                 block_m, causal, window_left, sm_scale, logits_soft_cap, pos_encoding_mode,
                                 rope_scale, rope_theta, v_scale, lse_ln, o, lse)


# ----------------------------------------------------------------------------- registration
_OPTS = ("bool causal, int window_left, float sm_scale, float logits_soft_cap, str pos_encoding_mode, "
         "float rope_scale, float rope_theta, float v_scale, bool lse_ln")
_PAGED = ("Tensor q, Tensor k_cache, Tensor? v_cache, str kv_layout, Tensor work, Tensor split_work, Tensor merge, "
          "Tensor qo_indptr, Tensor kv_indptr, Tensor kv_indices, Tensor kv_lens, Tensor? packed_mask, "
          "Tensor? mask_indptr, SymInt block_m, " + _OPTS + ", bool fixed_config")
_RAGGED = ("Tensor q, Tensor k, Tensor v, Tensor work, Tensor split_work, Tensor merge, Tensor qo_indptr, "
           "Tensor kv_indptr, Tensor? packed_mask, Tensor? mask_indptr, SymInt block_m, " + _OPTS
           + ", bool fixed_config")

single_attention_op = register_op(
    "single_attention(Tensor q, Tensor k, Tensor v, Tensor? packed_mask, str kv_layout, " + _OPTS
    + ", ScalarType? o_dtype=None) -> (Tensor, Tensor)",
    cuda=single_attention_cuda, reference=_single_attention_cpu, fake=meta.single_attention_fake,
)
paged_attention_op = register_op(
    f"paged_attention({_PAGED}, ScalarType? o_dtype=None) -> (Tensor, Tensor)",
    cuda=_functional(paged_attention_out_cuda, _paged_d_vo),
    reference=_functional(_paged_attention_out_cpu, _paged_d_vo), fake=meta.paged_attention_fake,
)
paged_attention_out_op = register_op(
    f"paged_attention_out({_PAGED}, Tensor o, Tensor lse) -> ()",
    cuda=paged_attention_out_cuda, reference=_paged_attention_out_cpu, mutates=["o", "lse"],
)
ragged_attention_op = register_op(
    f"ragged_attention({_RAGGED}, ScalarType? o_dtype=None) -> (Tensor, Tensor)",
    cuda=_functional(ragged_attention_out_cuda, _ragged_d_vo),
    reference=_functional(_ragged_attention_out_cpu, _ragged_d_vo), fake=meta.ragged_attention_fake,
)
ragged_attention_out_op = register_op(
    f"ragged_attention_out({_RAGGED}, Tensor o, Tensor lse) -> ()",
    cuda=ragged_attention_out_cuda, reference=_ragged_attention_out_cpu, mutates=["o", "lse"],
)
