# Attention-state merging ("cascade"): Triton kernels, launchers, op registration.
#
# A state is (o, s): o [D] the softmax-weighted value sum over some key set, s its LSE
# (base 2 in every device function below; the kernels convert "ln" LSEs on load/store).
# Merging states i = 1..K of one (row, head)  (spec attention.md §0.5):
#
#     m     = max_i s_i                      shift = 0 if m == -inf else m
#     w_i   = 2^(s_i - shift)                d     = sum_i w_i
#     o     = sum_{i: s_i > -inf} w_i o_i / d          (0 when every state is empty, d == 0)
#     s     = m + log2(d)                              (-inf when every state is empty)
#
# An empty state (s == -inf) contributes nothing, whatever its o holds; NaN in s (or in the o
# of a non-empty state) propagates. Math is fp32; o is stored in the value dtype, s in fp32.
#
# Ops (all take `lse_ln`: True when the s tensors hold natural-log LSEs):
#   merge_state(v_a [N,H,D], s_a [N,H], v_b, s_b)          -> (v [N,H,D], s [N,H] fp32)
#   merge_state_in_place(v, s fp32, v_other, s_other fp32, mask [N]?)   writes v, s
#   merge_states(v [N,S,H,D], s [N,S,H])                    -> (v [N,H,D], s [N,H])
#   variable_length_merge_states(v [M,H,D], s [M,H], indptr [N+1]) -> (v [N,H,D], s [N,H])
#
# Two kernels serve the four ops: `_merge_pair_kernel` (two states; writes a fresh output or,
# for the in-place op, back into the first state) and `_merge_run_kernel` (a run of `count`
# states at a fixed stride: the S axis of merge_states, or a CSR segment of rows). One program
# handles one (row, block of heads) and vectorizes over D (looping over D in BLOCK_D chunks
# only when D > _MAX_BLOCK_D).
#
# Shared device functions, for any kernel that combines partial attention results (split-KV
# attention imports these): `merge_weights`, `weighted`, `merge_two` (two states at once) and
# `online_merge_step` / `online_merge_finish` (fold states one at a time). Their `s` arguments
# are base-2 LSEs in fp32 that broadcast against `o` (e.g. `lse[:, None]` for o [rows, D]);
# `o` is fp32.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import COMPILE_OPTIONS, cdiv, next_pow2
from .._checks import overlaps_other_view
from .._registry import register_op
from ..meta import cascade as meta
from ..reference import cascade as ref

__all__ = [
    "merge_weights",
    "weighted",
    "merge_two",
    "online_merge_step",
    "online_merge_finish",
    "merge_state_op",
    "merge_state_in_place_op",
    "merge_states_op",
    "variable_length_merge_states_op",
]

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): s_2 = s_e * LOG2E
LN2 = tl.constexpr(0.6931471805599453)  # ln(2):   s_e = s_2 * LN2


# ------------------------------------------------------------------ shared device functions
@triton.jit
def merge_weights(s_a, s_b):
    """Normalized weights of two states and their merged LSE: ``(w_a, w_b, s)``.

    ``w_a + w_b == 1`` unless both states are empty (then ``w_a = w_b = 0`` and ``s = -inf``).
    All arguments and results are fp32 base-2 LSE-shaped tensors (or scalars).
    """
    m = tl.maximum(s_a, s_b, propagate_nan=tl.PropagateNan.ALL)
    shift = tl.where(m == float("-inf"), 0.0, m)  # both empty: keep exp2 away from -inf - -inf
    e_a = tl.exp2(s_a - shift)
    e_b = tl.exp2(s_b - shift)
    d = e_a + e_b
    inv = 1.0 / tl.where(d == 0.0, 1.0, d)
    return e_a * inv, e_b * inv, m + tl.log2(d)


@triton.jit
def weighted(o, w, s):
    """``w * o``, exactly 0 where the state is empty (``s == -inf``) even if ``o`` is garbage."""
    return tl.where(s == float("-inf"), 0.0, w * o)


@triton.jit
def merge_two(o_a, s_a, o_b, s_b):
    """Merge two states: ``(o, s)`` with o fp32 shaped like ``o_a`` and s shaped like ``s_a``."""
    w_a, w_b, s = merge_weights(s_a, s_b)
    return weighted(o_a, w_a, s_a) + weighted(o_b, w_b, s_b), s


@triton.jit
def online_merge_step(acc, m, d, o, s):
    """Fold state ``(o, s)`` into the running ``(acc, m, d)``; returns the new triple.

    Invariant: ``m`` is the largest LSE folded so far, ``acc = sum_i 2^(s_i - m) o_i`` over
    non-empty states, ``d = sum_i 2^(s_i - m)``. Start from ``acc = 0`` (o-shaped fp32),
    ``m = -inf``, ``d = 0`` (s-shaped fp32) and end with ``online_merge_finish``.
    """
    m_new = tl.maximum(m, s, propagate_nan=tl.PropagateNan.ALL)
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - shift)  # rescales what was folded so far (0 while everything is empty)
    w = tl.exp2(s - shift)
    return acc * alpha + weighted(o, w, s), m_new, d * alpha + w


@triton.jit
def online_merge_finish(acc, m, d):
    """The merged state ``(o, s)`` of a running triple (``0, -inf`` if nothing was non-empty)."""
    inv = 1.0 / tl.where(d == 0.0, 1.0, d)
    return acc * inv, m + tl.log2(d)


@triton.jit
def _load_lse(ptrs, mask, LSE_LN: tl.constexpr):
    """Load fp16/bf16/fp32 LSEs as fp32 base 2 (masked lanes read as empty states)."""
    s = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    if LSE_LN:
        s = s * LOG2E
    return s


@triton.jit
def _store_lse(ptrs, s, mask, LSE_LN: tl.constexpr):
    if LSE_LN:
        s = s * LN2
    tl.store(ptrs, s, mask=mask)


# ------------------------------------------------------------------------------ the kernels
@triton.jit
def _merge_pair_kernel(
    va_ptr, sa_ptr, vb_ptr, sb_ptr, vo_ptr, so_ptr, mask_ptr,
    H, D,
    va_sn, va_sh, sa_sn, sa_sh,
    vb_sn, vb_sh, sb_sn, sb_sh,
    vo_sn, vo_sh, so_sn, so_sh,
    HAS_MASK: tl.constexpr, LSE_LN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (row n, heads [h0, h0 + BLOCK_H)). For the in-place op vo/so are va/sa: both
    # LSEs are read into registers before any chunk of v is written, and the merged LSE is
    # written last, so the update is safe.
    n = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        if tl.load(mask_ptr + n) == 0:
            return  # row left untouched (fixed-shape CUDA-graph batches)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = (offs_h < H)[:, None]
    hh = offs_h[:, None].to(tl.int64)
    s_a = _load_lse(sa_ptr + n * sa_sn + hh * sa_sh, mask_h, LSE_LN)
    s_b = _load_lse(sb_ptr + n * sb_sn + hh * sb_sh, mask_h, LSE_LN)
    s = s_a
    for c in range(0, tl.maximum(tl.cdiv(D, BLOCK_D), 1)):  # one pass unless D > BLOCK_D
        offs_d = (c * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
        m2 = mask_h & (offs_d < D)
        o_a = tl.load(va_ptr + n * va_sn + hh * va_sh + offs_d, mask=m2, other=0.0).to(tl.float32)
        o_b = tl.load(vb_ptr + n * vb_sn + hh * vb_sh + offs_d, mask=m2, other=0.0).to(tl.float32)
        o, s = merge_two(o_a, s_a, o_b, s_b)
        tl.store(vo_ptr + n * vo_sn + hh * vo_sh + offs_d, o.to(vo_ptr.dtype.element_ty), mask=m2)
    _store_lse(so_ptr + n * so_sn + hh * so_sh, s, mask_h, LSE_LN)


@triton.jit(do_not_specialize=["count"])  # varies per call (S or total rows M): no recompiles
def _merge_run_kernel(
    v_ptr, s_ptr, indptr_ptr, vo_ptr, so_ptr,
    count, H, D,
    v_sn, v_si, v_sh, s_sn, s_si, s_sh,
    vo_sn, vo_sh, so_sn, so_sh,
    VARLEN: tl.constexpr, LSE_LN: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (output row n, heads [h0, h0 + BLOCK_H)) merges states first .. first+count-1,
    # state i at v_ptr + n * v_sn + i * v_si. merge_states: first = 0, count = S.
    # VARLEN: v_sn = 0, rows [indptr[n], indptr[n+1]) clamped to [0, count = M), so garbage
    # indptr values never read outside v (an empty or inverted segment gives 0 / -inf).
    n = tl.program_id(0).to(tl.int64)
    first = 0
    if VARLEN:
        lo = tl.load(indptr_ptr + n).to(tl.int64)
        hi = tl.load(indptr_ptr + n + 1).to(tl.int64)
        first = tl.minimum(tl.maximum(lo, 0), count)
        count = tl.minimum(tl.maximum(hi, first), count) - first
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = (offs_h < H)[:, None]
    hh = offs_h[:, None].to(tl.int64)
    v_base = v_ptr + n * v_sn + hh * v_sh
    s_base = s_ptr + n * s_sn + hh * s_sh
    s_out = tl.full([BLOCK_H, 1], float("-inf"), tl.float32)
    for c in range(0, tl.maximum(tl.cdiv(D, BLOCK_D), 1)):  # one pass unless D > BLOCK_D
        offs_d = (c * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
        m2 = mask_h & (offs_d < D)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        m = tl.full([BLOCK_H, 1], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_H, 1], tl.float32)
        for i in range(0, count):
            row = (first + i).to(tl.int64)  # i * stride can pass 2^31 (e.g. permuted v)
            s_i = _load_lse(s_base + row * s_si, mask_h, LSE_LN)
            o_i = tl.load(v_base + row * v_si + offs_d, mask=m2, other=0.0).to(tl.float32)
            acc, m, d = online_merge_step(acc, m, d, o_i, s_i)
        o, s_out = online_merge_finish(acc, m, d)
        tl.store(vo_ptr + n * vo_sn + hh * vo_sh + offs_d, o.to(vo_ptr.dtype.element_ty), mask=m2)
    _store_lse(so_ptr + n * so_sn + hh * so_sh, s_out, mask_h, LSE_LN)


# ------------------------------------------------------------------------- launch heuristics
_MAX_BLOCK_D = 512  # D beyond this is processed in chunks (same program, runtime loop)
_TILE = 2048  # elements of one state a program moves per chunk: BLOCK_H * BLOCK_D


def _launch_config(H: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) for H heads of dim D: the one place launches are tuned.

    A program covers whole rows of D and as many heads as fit in ``_TILE`` elements, so a
    thread moves ~8 elements (16 bytes of bf16) per state and chunk.
    """
    block_d = min(next_pow2(max(D, 1)), _MAX_BLOCK_D)
    block_h = min(next_pow2(max(H, 1)), max(1, _TILE // block_d))
    num_warps = min(8, max(1, block_h * block_d // 256))
    return block_h, block_d, num_warps


def _launch_pair(v_a, s_a, v_b, s_b, v_out, s_out, mask, lse_ln):
    N, H, D = v_a.shape
    if N == 0 or H == 0:
        return
    block_h, block_d, num_warps = _launch_config(H, D)
    _merge_pair_kernel[(N, cdiv(H, block_h))](
        v_a, s_a, v_b, s_b, v_out, s_out, s_a if mask is None else mask,
        H, D,
        v_a.stride(0), v_a.stride(1), s_a.stride(0), s_a.stride(1),
        v_b.stride(0), v_b.stride(1), s_b.stride(0), s_b.stride(1),
        v_out.stride(0), v_out.stride(1), s_out.stride(0), s_out.stride(1),
        HAS_MASK=mask is not None, LSE_LN=bool(lse_ln),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
        **COMPILE_OPTIONS,
    )


def _launch_run(v, s, indptr, v_out, s_out, count, v_sn, v_si, s_sn, s_si, lse_ln):
    N, H, D = v_out.shape
    if N == 0 or H == 0:
        return
    block_h, block_d, num_warps = _launch_config(H, D)
    _merge_run_kernel[(N, cdiv(H, block_h))](
        v, s, s if indptr is None else indptr, v_out, s_out,
        count, H, D,
        v_sn, v_si, v.stride(-2), s_sn, s_si, s.stride(-1),
        v_out.stride(0), v_out.stride(1), s_out.stride(0), s_out.stride(1),
        VARLEN=indptr is not None, LSE_LN=bool(lse_ln),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
        **COMPILE_OPTIONS,
    )


# -------------------------------------------------------------- launchers (the CUDA impls)
def merge_state_cuda(v_a, s_a, v_b, s_b, lse_ln=False):
    meta.check_merge_state(v_a, s_a, v_b, s_b)
    v_out, s_out = meta.merge_outputs(v_a, s_a, v_a.shape[0])
    _launch_pair(v_a, s_a, v_b, s_b, v_out, s_out, None, lse_ln)
    return v_out, s_out


def merge_state_in_place_cuda(v, s, v_other, s_other, mask=None, lse_ln=False):
    meta.check_merge_state_in_place(v, s, v_other, s_other, mask, storage=True)
    # A state read from memory the kernel is writing (shifted rows of one buffer) would race
    # between programs: read it from a copy, which gives the CPU reference's result.
    if overlaps_other_view(v, v_other):
        v_other = v_other.clone()
    if overlaps_other_view(s, s_other):
        s_other = s_other.clone()
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; the kernel tests `!= 0`
    _launch_pair(v, s, v_other, s_other, v, s, mask, lse_ln)


def merge_states_cuda(v, s, lse_ln=False):
    meta.check_merge_states(v, s)
    v_out, s_out = meta.merge_outputs(v, s, v.shape[0])
    _launch_run(v, s, None, v_out, s_out, v.shape[1],
                v.stride(0), v.stride(1), s.stride(0), s.stride(1), lse_ln)
    return v_out, s_out


def variable_length_merge_states_cuda(v, s, indptr, lse_ln=False):
    meta.check_variable_length_merge_states(v, s, indptr)
    v_out, s_out = meta.merge_outputs(v, s, indptr.shape[0] - 1)
    _launch_run(v, s, indptr, v_out, s_out, v.shape[0], 0, v.stride(0), 0, s.stride(0), lse_ln)
    return v_out, s_out


# ---------------------------------------------------- CPU impls (validated reference calls)
def _merge_state_cpu(v_a, s_a, v_b, s_b, lse_ln=False):
    meta.check_merge_state(v_a, s_a, v_b, s_b)
    return ref.merge_state_cpu(v_a, s_a, v_b, s_b, lse_ln)


def _merge_state_in_place_cpu(v, s, v_other, s_other, mask=None, lse_ln=False):
    meta.check_merge_state_in_place(v, s, v_other, s_other, mask, storage=True)
    ref.merge_state_in_place_cpu(v, s, v_other, s_other, mask, lse_ln)


def _merge_states_cpu(v, s, lse_ln=False):
    meta.check_merge_states(v, s)
    return ref.merge_states_cpu(v, s, lse_ln)


def _variable_length_merge_states_cpu(v, s, indptr, lse_ln=False):
    meta.check_variable_length_merge_states(v, s, indptr)
    return ref.variable_length_merge_states_cpu(v, s, indptr, lse_ln)


# ----------------------------------------------------------------------------- registration
merge_state_op = register_op(
    "merge_state(Tensor v_a, Tensor s_a, Tensor v_b, Tensor s_b, bool lse_ln=False) -> (Tensor, Tensor)",
    cuda=merge_state_cuda, reference=_merge_state_cpu, fake=meta.merge_state_fake,
)
merge_state_in_place_op = register_op(
    "merge_state_in_place(Tensor v, Tensor s, Tensor v_other, Tensor s_other, "
    "Tensor? mask=None, bool lse_ln=False) -> ()",
    cuda=merge_state_in_place_cuda, reference=_merge_state_in_place_cpu,
    fake=meta.merge_state_in_place_fake, mutates=["v", "s"],
)
merge_states_op = register_op(
    "merge_states(Tensor v, Tensor s, bool lse_ln=False) -> (Tensor, Tensor)",
    cuda=merge_states_cuda, reference=_merge_states_cpu, fake=meta.merge_states_fake,
)
variable_length_merge_states_op = register_op(
    "variable_length_merge_states(Tensor v, Tensor s, Tensor indptr, bool lse_ln=False) -> (Tensor, Tensor)",
    cuda=variable_length_merge_states_cuda, reference=_variable_length_merge_states_cpu,
    fake=meta.variable_length_merge_states_fake,
)
