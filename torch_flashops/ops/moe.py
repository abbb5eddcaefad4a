"""Mixture-of-Experts compute path: grouped GEMM, activation, finalize, and the whole layer.

Math (spec/moe.md; T tokens, H hidden, I intermediate, E local experts, k = top-k, pair
(t, j) has expanded index i = t*k + j, numel = T*k):

    grouped GEMM   c[i] = (a[i // top_k] @ w[e].T) * (topk_w.flat[i] if mul else 1)
                   for every slot i of an aligned block whose expert e >= 0; c[i] = 0 for e == -1
    silu_and_mul   y[..., c] = silu(h[..., c]) * h[..., d + c]                    (fp32 math)
    gelu_and_mul   y[..., c] = gelu(h[..., c]) * h[..., d + c]   (erf, or tanh approximation)
    moe_sum        out[t] = rsf * sum_{j = 0..k-1} y[t, j]          (fp32, fixed j order)
    fused_moe      align -> GEMM1 (w1 [E, 2I, H] = [gate; up]) with silu_and_mul fused into its
                   epilogue -> GEMM2 (w2 [E, H, I], times the routing weight) -> moe_sum

The GEMM kernel is the classic Triton fused-MoE design: one program per (block of BLOCK_M
aligned slots, BLOCK_N output columns); the block's slots name the rows of ``a`` to gather
(``a[i // top_k]``, row offsets in int64) and one expert; tiles are visited in grouped order
(GROUP_M blocks per column tile) so consecutive programs reuse the expert's weight tile from
L2. fp32 accumulation with ``tl.dot``, one rounding on store. Programs whose block starts at or
past ``num_tokens_post_pad`` (a device scalar: no host sync) return at once. With the fused
activation a program loads the matching gate tile (rows n) and up tile (rows I + n) of w1,
keeps two accumulators and stores ``silu(g) * u`` directly: the [numel, 2I] intermediate never
exists. For decode batches (T*k*4 <= E) the same kernel runs "one pair per block": block b
holds the single pair b and reads its expert from ``topk_ids`` (through ``expert_map``), so no
alignment pass runs at all. The smallest of those layers (``decode_one_launch``) run instead as
one persistent kernel, ``_moe_decode_kernel``: phase 1 computes every pair's activated
intermediate, a grid barrier, phase 2 every token's output row (both GEMMs as weight-streaming
GEMVs, the routing weights, the sum over k and the scaling in one pass); where a program's
phase 2 is a single tile it asks for those weights before phase 1, so the two GEMMs' weights
stream together and only the small intermediate waits for the barrier. On CUDA it serves
layers of up to ``DECODE_MAX_ELEMS`` touched weight elements per matrix (Qwen3-sized decode;
measured on an H100, see ``decode_one_launch``); under the interpreter it serves every
pair-path layer.

Two variants of the aligned GEMM (timed on an H100: benchmarks/RESULTS.md, fourteenth
session). Half-tail blocks (``HALF_TAIL_MIN_BLOCK_M``, on from BLOCK_M 64): an expert's last
block whose second half holds only padding multiplies only its first half, which cuts the
padded share of the MMA work (random routing at BLOCK_M 128: 20% -> 11% for Qwen3-30B at
T=4096). The persistent GEMM (config key ``"persistent"``, weights by TMA; in the H100 tables
for GEMM2 where it paid): one program per SM walks the tiles with the tile loop and the K loop
flattened into one software pipeline, so the next tile's loads overlap this tile's epilogue,
which matters where K is short (GEMM2, K = I). It has no half tails. GEMM1 with config key
``"one_dot"`` reads w1 as [E, 2, I, H]: one descriptor box brings the gate and the up tile, one
dot fills a [BM, 2 * BLOCK_N] accumulator, split in registers for the epilogue. In the block GEMM
that is within noise; in the persistent GEMM it is what makes persistence pay for GEMM1 (two
accumulators there lose), and Mixtral's large-T entries ship it (RESULTS.md, nineteenth session).

Sizes that vary per call (token counts, numel, block counts) are runtime ints; tile sizes and
mode switches are constexpr. Launch parameters come from one place, ``moe_config`` /
``gemm_config``: a shipped table per (E, N=I, K=H, device, dtype) in ``configs/moe/`` picked by
the token count nearest to T (a card uses its chip's tables, e.g. an H200 the H100's, with any
entries of its own in their place: ``table_devices``, ``merged_table``), else a shape heuristic.
``FLASHOPS_MOE_AUTOTUNE=1`` times candidate configs on the first call of each shape (eager,
outside graph capture) instead.
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._host import COMPILE_OPTIONS, cdiv, next_pow2
from ._triton_compat import gdc_launch_dependents, gdc_wait
from .. import _config
from .._checks import check_writable
from . import moe_routing
from .attention import _tanh  # (exp2 form: exact +-1 past overflow; the soft cap's too)
from .._registry import register_op
from ..meta import moe as meta
from ..reference import moe as ref

__all__ = ["moe_grouped_gemm", "silu_and_mul", "silu_and_mul_out", "gelu_and_mul", "gelu_and_mul_out",
           "moe_sum", "fused_moe",
           "GEMM_BLOCK_SIZES", "moe_config", "gemm_config"]

GEMM_BLOCK_SIZES = (16, 32, 64, 128, 256)

# --------------------------------------------------------------------------- kernels


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
ACT_SILU, ACT_GELU, ACT_GELU_TANH = 0, 1, 2  # _act_and_mul_kernel's ACT


@triton.jit
def _act(x, ACT: tl.constexpr):
    """silu (ACT 0), gelu's erf form (1) or its tanh approximation (2) of fp32 ``x``."""
    if ACT == 0:
        y = _silu(x)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
    else:
        # tensor on the left: under triton 3.8's interpreter ``constexpr * tensor`` stays a
        # constexpr wrapping the tensor, which tl.exp2 then refuses
        y = 0.5 * x * (1.0 + _tanh((x + 0.044715 * x * x * x) * SQRT_2_OVER_PI))
    return y


def _num_ids(expert_map: Optional[torch.Tensor], num_local: int) -> int:
    """How many routed ids are in range: the map's length (global experts), else the local count."""
    return expert_map.numel() if expert_map is not None else num_local


@triton.jit
def _map_expert(map_ptr, e, num_ids, num_local, HAS_MAP: tl.constexpr):
    """A routed expert id through ``expert_map`` (global -> local, -1: not on this rank) -> a
    local expert in [0, num_local) or -1 (skip). Ids outside [0, num_ids) (the map's length, or
    the local count without a map) and map entries outside [0, num_local) are skipped too:
    undefined input (checked mode rejects it) never makes a kernel read past the map or the
    weights."""
    ok = (e >= 0) & (e < num_ids)
    if HAS_MAP:
        e = tl.load(map_ptr + tl.where(ok, e, 0), mask=ok, other=-1).to(tl.int32)  # (an empty map: no read)
    ok = ok & (e >= 0) & (e < num_local)
    return tl.where(ok, e, -1)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (m block, n tile), GROUP_M m blocks per sweep over the n tiles. Ids past
    the grid of tiles (the tail split's extra programs) get a block past the last one, not a
    modulo by zero."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.maximum(tl.minimum(num_pid_m - first_m, GROUP_M), 1)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _c_tile(c_ptr, pos, slot, offs_n, N, num_valid, num_slots, stride_cm, C_SORTED: tl.constexpr):
    """Pointers and mask of a block's output tile: rows at slot positions ``pos`` (C_SORTED: a
    sorted intermediate, every row of the block, pads too, which are never read back as
    results) or at the pairs' own rows ``slot`` (valid slots only)."""
    if C_SORTED:
        c_ptrs = c_ptr + pos.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        c_mask = (pos < num_slots)[:, None] & (offs_n[None, :] < N)
    else:
        c_ptrs = c_ptr + slot[:, None] * stride_cm + offs_n[None, :]
        c_mask = (slot < num_valid)[:, None] & (offs_n[None, :] < N)
    return c_ptrs, c_mask


@triton.jit
def _epilogue(acc, acc_up, topk_w_ptr, slot, valid, MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr):
    """The routing weight per row (MUL_WEIGHT), then silu(gate) * up (FUSE_SILU), in fp32."""
    if MUL_WEIGHT:
        wt = tl.load(topk_w_ptr + slot, mask=valid, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
        if FUSE_SILU:
            acc_up = acc_up * wt[:, None]
    if FUSE_SILU:
        acc = _silu(acc) * acc_up
    return acc


@triton.jit
def _gemm_rows(a_ptr, a_desc, w_desc, b_ptrs, c_ptr, topk_w_ptr, slot, row0, pid_n, expert,
               N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_wn, stride_cm, scale,
               BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr, WRITE_SKIP: tl.constexpr, EVEN_K: tl.constexpr,
               W_TMA: tl.constexpr, A_SORTED: tl.constexpr, A_TMA: tl.constexpr, C_SORTED: tl.constexpr,
               DOT_F32: tl.constexpr, PRECISION: tl.constexpr, GU_ONE: tl.constexpr = False,
               UP_FIRST: tl.constexpr = False):
    """BM rows of one block from slot position row0 (slots ``slot [BM]``) times weight columns
    [pid_n * BLOCK_N, +BLOCK_N) of ``expert`` (-1: skipped block), stored to c. GU_ONE: the
    gate and up tiles come as one [2, BLOCK_N, BLOCK_K] box of a 4-D descriptor (``_gate_up_view``)
    and go through one dot into a [BM, 2 * BLOCK_N] accumulator, split after the K loop.
    UP_FIRST (FUSE_SILU): w1 is ``[up; gate]`` (FlashInfer's CUTLASS order), the gate rows
    ``up_offset`` further than the up rows; ``b_ptrs`` then point at the gate rows already."""
    valid = slot < num_valid
    pos = (row0 + tl.arange(0, BM)).to(tl.int64)  # slot position: row of a sorted intermediate
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs, c_mask = _c_tile(c_ptr, pos, slot, offs_n, N, num_valid, num_slots, stride_cm, C_SORTED)
    if expert < 0:
        if WRITE_SKIP:
            tl.store(c_ptrs, tl.zeros((BM, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        if A_SORTED:
            a_row = pos
        else:
            a_row = tl.where(valid, slot // top_k, 0)  # padding slots read row 0; never stored
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
        gate_row, up_row = _gate_up_rows(up_offset, UP_FIRST)
        up_step = tl.cast(up_row - gate_row, tl.int64) * stride_wn  # from b_ptrs (the gate rows)
        GU: tl.constexpr = 2 if GU_ONE else 1
        acc = tl.zeros((BM, GU * BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        n0 = pid_n * BLOCK_N
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kk * BLOCK_K
            if A_TMA:
                a = a_desc.load([row0, kk * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if GU_ONE:  # gate rows n0.. and up rows I + n0.. as one box
                b = w_desc.load([expert, 0, n0, kk * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K).T
            elif W_TMA:  # weight tiles by the copy engine (zero fill past N and K)
                b = w_desc.load([expert, n0 + gate_row, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if DOT_F32:  # the interpreter multiplies raw bits of 16-bit dots
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if FUSE_SILU and not GU_ONE:
                if W_TMA:
                    bu = w_desc.load([expert, n0 + up_row, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
                elif EVEN_K:
                    bu = tl.load(b_ptrs + up_step)
                else:
                    bu = tl.load(b_ptrs + up_step, mask=k_ok[:, None], other=0.0)
                if DOT_F32:
                    bu = bu.to(tl.float32)
                acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if GU_ONE:
            acc, acc_up = _gu_split(acc, BM, BLOCK_N, UP_FIRST)
        acc = _epilogue(acc, acc_up, topk_w_ptr, slot, valid, MUL_WEIGHT, FUSE_SILU)
        tl.store(c_ptrs, (acc * scale).to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gate_up_rows(up_offset, UP_FIRST: tl.constexpr):
    """Row offsets (gate, up) from a GEMM1 tile's first row n0 within one expert's w1: ``[gate;
    up]`` has the up rows ``up_offset`` (= I) after the gate rows, ``[up; gate]`` (UP_FIRST) the
    gate rows I after the up rows."""
    if UP_FIRST:
        gate_row = up_offset
        up_row = up_offset * 0
    else:
        gate_row = up_offset * 0
        up_row = up_offset
    return gate_row, up_row


@triton.jit
def _gu_split(acc, BM: tl.constexpr, BLOCK_N: tl.constexpr, UP_FIRST: tl.constexpr = False):
    """[BM, 2 * BLOCK_N] -> ([BM, BLOCK_N] gate, [BM, BLOCK_N] up): columns j and BLOCK_N + j
    sit in the same thread of the MMA layout, so the split moves no data. The box holds the two
    halves in storage order, so with UP_FIRST the first half is up."""
    gate, up = acc.reshape(BM, 2, BLOCK_N).permute(0, 2, 1).split()
    if UP_FIRST:
        gate, up = up, gate
    return gate, up


@triton.jit
def _w_desc_dots(a, w_desc, expert, n0, k0, up_offset, acc, acc_up, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FUSE_SILU: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 GU_ONE: tl.constexpr = False, UP_FIRST: tl.constexpr = False):
    """One K step with weight tiles by descriptor: acc += a @ w[expert, n0:+BLOCK_N, k0:+BLOCK_K].T
    (and acc_up with the up half at n0 + up_offset when FUSE_SILU; with GU_ONE both halves as one
    box of the 4-D gate/up descriptor into acc, [BM, 2 * BLOCK_N], in storage order). UP_FIRST:
    ``[up; gate]`` rows, see ``_gate_up_rows``."""
    gate_row, up_row = _gate_up_rows(up_offset, UP_FIRST)
    if GU_ONE:
        b = w_desc.load([expert, 0, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K).T
    else:
        b = w_desc.load([expert, n0 + gate_row, k0]).reshape(BLOCK_N, BLOCK_K).T
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if FUSE_SILU and not GU_ONE:
        bu = w_desc.load([expert, n0 + up_row, k0]).reshape(BLOCK_N, BLOCK_K).T
        if DOT_F32:
            bu = bu.to(tl.float32)
        acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
    return acc, acc_up


@triton.jit
def _gemm_split_piece(a_desc, w_desc, c_ptr, topk_w_ptr, part_ptr, count_ptr, slot, row0, pid_n, expert,
                      t, piece, n_split, N, K, num_valid, num_slots, up_offset, stride_cm, scale,
                      BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr, C_SORTED: tl.constexpr,
                      DOT_F32: tl.constexpr, PRECISION: tl.constexpr, UP_FIRST: tl.constexpr = False):
    """Piece ``piece`` of ``n_split`` of tail tile ``t`` (tail split, see the note above
    ``TAIL_SLOTS_INTERP``): the products over
    its share of K (A and the weights by descriptor) into its fp32 scratch tile, then one
    acq_rel count; the piece that completes the count folds every piece's tile in piece order
    (so the sum does not depend on which piece ends last) and runs the epilogue and the store."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_tiles, n_split)
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    for kk in range(piece * per, tl.minimum(k_tiles, piece * per + per)):
        acc, acc_up = _w_desc_dots(a_desc.load([row0, kk * BLOCK_K]), w_desc, expert, n0, kk * BLOCK_K, up_offset,
                                   acc, acc_up, BLOCK_N, BLOCK_K, FUSE_SILU, DOT_F32, PRECISION,
                                   UP_FIRST=UP_FIRST)
    NP: tl.constexpr = 2 if FUSE_SILU else 1
    e = tl.arange(0, BM)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    own = part_ptr + (t * n_split + piece).to(tl.int64) * (NP * BM * BLOCK_N)
    tl.store(own + e, acc)
    if FUSE_SILU:
        tl.store(own + BM * BLOCK_N + e, acc_up)
    tl.debug_barrier()  # every thread's partial stores are issued before the count releases them
    if tl.atomic_add(count_ptr + t, 1, sem="acq_rel", scope="gpu") == n_split - 1:
        tl.debug_barrier()
        acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
        for p in range(0, n_split):
            src = part_ptr + (t * n_split + p).to(tl.int64) * (NP * BM * BLOCK_N)
            acc += tl.load(src + e, cache_modifier=".cg")
            if FUSE_SILU:
                acc_up += tl.load(src + BM * BLOCK_N + e, cache_modifier=".cg")
        valid = slot < num_valid
        pos = (row0 + tl.arange(0, BM)).to(tl.int64)
        c_ptrs, c_mask = _c_tile(c_ptr, pos, slot, n0 + tl.arange(0, BLOCK_N), N, num_valid, num_slots, stride_cm,
                                 C_SORTED)
        acc = _epilogue(acc, acc_up, topk_w_ptr, slot, valid, MUL_WEIGHT, FUSE_SILU)
        tl.store(c_ptrs, (acc * scale).to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["num_valid", "num_m_blocks", "num_slots"])
def _moe_gemm_kernel(
    a_ptr, a_desc, a_desc_half, w_ptr, w_desc, c_ptr,
    sorted_ids_ptr, expert_ids_ptr, ntp_ptr,      # alignment (unused in pair mode)
    topk_ids_ptr, expert_map_ptr,                 # pair mode routing
    topk_w_ptr, part_ptr, count_ptr,
    N, K, num_valid, num_m_blocks, num_slots, top_k, up_offset, num_ids, num_local,
    stride_am, stride_we, stride_wn, stride_cm,
    scale, tail_slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr, WRITE_SKIP: tl.constexpr,
    PAIRS: tl.constexpr, HAS_MAP: tl.constexpr, EVEN_K: tl.constexpr, W_TMA: tl.constexpr,
    A_SORTED: tl.constexpr, A_TMA: tl.constexpr, C_SORTED: tl.constexpr, HALF_TAIL: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, PDL_TRIGGER: tl.constexpr, PDL_WAIT: tl.constexpr,
    TAIL_SPLIT: tl.constexpr = 0, GU_ONE: tl.constexpr = False, UP_FIRST: tl.constexpr = False,
):
    # Programmatic dependent launch (sm_90+, see moe_pdl): PDL_TRIGGER lets the next kernel of
    # the chain launch now (its programs wait in gdc_wait until this grid has finished);
    # PDL_WAIT is this kernel's side: nothing the previous kernel writes is read before gdc_wait.
    if PDL_TRIGGER:
        gdc_launch_dependents()
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m_blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    row0 = pid_m * BLOCK_M
    # int64: weights may be strided views (e.g. w1 stored [2I, E, H] and transposed), where
    # (N - 1) * stride(1) and I * stride(1) pass 2^31 elements; wrapped columns keep the loads in
    # bounds without a mask
    # b_ptrs point at the gate rows (up_offset past the up rows when UP_FIRST: w1 is [up; gate])
    gate_row, _ = _gate_up_rows(up_offset, UP_FIRST)
    w_base = tl.cast(gate_row, tl.int64) * stride_wn
    w_cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64) * stride_wn + w_base
    w_rows = tl.arange(0, BLOCK_K)[:, None]
    if PAIRS:  # routing ids come from before the chain: readable before the wait
        expert = _map_expert(expert_map_ptr, tl.load(topk_ids_ptr + pid_m).to(tl.int32), num_ids, num_local,
                             HAS_MAP)
        r = tl.arange(0, BLOCK_M)
        slot = tl.where(r == 0, pid_m, num_valid).to(tl.int64)
        if PDL_WAIT:
            gdc_wait()
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :] + w_rows
        _gemm_rows(a_ptr, a_desc, w_desc, b_ptrs, c_ptr, topk_w_ptr, slot, row0, pid_n, expert,
                   N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_wn, stride_cm, scale,
                   BLOCK_M, BLOCK_N, BLOCK_K, MUL_WEIGHT, FUSE_SILU, WRITE_SKIP, EVEN_K, W_TMA, A_SORTED,
                   A_TMA, C_SORTED, DOT_F32, PRECISION, GU_ONE, UP_FIRST)
    else:
        if PDL_WAIT:
            gdc_wait()
        ntp = tl.load(ntp_ptr)
        if TAIL_SPLIT > 1:
            # Tail split (config key "tail_split", see the note above TAIL_SLOTS_INTERP): the live
            # tiles in order; whole waves of tail_slots run as usual, the tiles of the last,
            # partial wave are split along K into up to TAIL_SPLIT pieces (piece 0 at the tile's
            # own program, the others at the programs past the static grid), so that wave is as
            # long as a piece instead of a tile.
            n_pid_n = tl.cdiv(N, BLOCK_N)
            live_m = tl.cdiv(ntp, BLOCK_M)
            live = live_m * n_pid_n
            full = live // tail_slots * tail_slots
            n_tail = live - full
            n_split = tl.minimum(TAIL_SPLIT, tail_slots // tl.maximum(n_tail, 1))
            pid = tl.program_id(0)
            tile = pid
            piece = pid * 0
            static_tiles = num_m_blocks * n_pid_n
            if pid >= static_tiles:  # pieces 1.. of the tail tiles, in tile order
                others = tl.maximum(n_split - 1, 1)
                t = (pid - static_tiles) // others
                piece = (pid - static_tiles) % others + 1
                tile = tl.where((n_split > 1) & (t < n_tail), full + t, live)
            if tile >= live:
                return
            pid_m, pid_n = _grouped_tile(tile, live_m, n_pid_n, GROUP_M)
            row0 = pid_m * BLOCK_M
            w_cols = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64) * stride_wn + w_base
            if (n_split > 1) & (tile >= full):
                expert = tl.load(expert_ids_ptr + pid_m).to(tl.int32)
                if expert >= 0:
                    s = row0 + tl.arange(0, BLOCK_M)
                    slot = tl.load(sorted_ids_ptr + s, mask=s < num_slots, other=num_valid).to(tl.int64)
                    _gemm_split_piece(a_desc, w_desc, c_ptr, topk_w_ptr, part_ptr, count_ptr, slot, row0, pid_n,
                                      expert, tile - full, piece, n_split, N, K, num_valid, num_slots, up_offset,
                                      stride_cm, scale, BLOCK_M, BLOCK_N, BLOCK_K, MUL_WEIGHT, FUSE_SILU, C_SORTED,
                                      DOT_F32, PRECISION, UP_FIRST)
                    return
                if piece > 0:  # a skipped block's tile: its piece 0 stores the zeros below
                    return
        if row0 >= ntp:
            return
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int32)
        b_ptrs = w_ptr + expert.to(tl.int64) * stride_we + w_cols[None, :] + w_rows
        s = row0 + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_ids_ptr + s, mask=s < num_slots, other=num_valid).to(tl.int64)
        if HALF_TAIL:
            # An expert's last block is partly padding: when its second half holds no pair, only
            # the first half is multiplied (half the MMA work and A reads of a full block). Its
            # other rows of a sorted intermediate stay unwritten: pads, whose GEMM2 rows are
            # never stored (and GEMM2 takes the half path on the same block).
            HALF: tl.constexpr = BLOCK_M // 2
            r = tl.arange(0, BLOCK_M)
            if tl.max(((r >= HALF) & (slot < num_valid)).to(tl.int32), axis=0) == 0:
                s_half = row0 + tl.arange(0, HALF)
                slot_half = tl.load(sorted_ids_ptr + s_half, mask=s_half < num_slots, other=num_valid).to(tl.int64)
                _gemm_rows(a_ptr, a_desc_half, w_desc, b_ptrs, c_ptr, topk_w_ptr, slot_half, row0, pid_n, expert,
                           N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_wn, stride_cm, scale,
                           HALF, BLOCK_N, BLOCK_K, MUL_WEIGHT, FUSE_SILU, WRITE_SKIP, EVEN_K, W_TMA, A_SORTED,
                           A_TMA, C_SORTED, DOT_F32, PRECISION, GU_ONE, UP_FIRST)
            else:
                _gemm_rows(a_ptr, a_desc, w_desc, b_ptrs, c_ptr, topk_w_ptr, slot, row0, pid_n, expert,
                           N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_wn, stride_cm, scale,
                           BLOCK_M, BLOCK_N, BLOCK_K, MUL_WEIGHT, FUSE_SILU, WRITE_SKIP, EVEN_K, W_TMA, A_SORTED,
                           A_TMA, C_SORTED, DOT_F32, PRECISION, GU_ONE, UP_FIRST)
        else:
            _gemm_rows(a_ptr, a_desc, w_desc, b_ptrs, c_ptr, topk_w_ptr, slot, row0, pid_n, expert,
                       N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_wn, stride_cm, scale,
                       BLOCK_M, BLOCK_N, BLOCK_K, MUL_WEIGHT, FUSE_SILU, WRITE_SKIP, EVEN_K, W_TMA, A_SORTED,
                       A_TMA, C_SORTED, DOT_F32, PRECISION, GU_ONE, UP_FIRST)


@triton.jit(do_not_specialize=["num_valid", "num_slots"])
def _moe_gemm_persistent_kernel(
    a_ptr, a_desc, w_desc, c_ptr, sorted_ids_ptr, expert_ids_ptr, ntp_ptr, topk_w_ptr,
    N, K, num_valid, num_slots, top_k, up_offset, stride_am, stride_cm, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr, MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr, WRITE_SKIP: tl.constexpr,
    A_SORTED: tl.constexpr, A_TMA: tl.constexpr, EVEN_K: tl.constexpr, C_SORTED: tl.constexpr,
    FLATTEN: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    PDL_TRIGGER: tl.constexpr, PDL_WAIT: tl.constexpr, GU_ONE: tl.constexpr = False,
    UP_FIRST: tl.constexpr = False,
):
    """The aligned grouped GEMM as NUM_PROGS persistent programs, the weights through a tensor
    descriptor, A by one too (A_TMA: slot-ordered rows) or gathered by pointers (rows
    slot // top_k of x, or slot positions with A_SORTED). Each program walks the tiles of the blocks up to the
    last block of a local expert with a stride of NUM_PROGS; with FLATTEN the compiler pipelines
    that tile loop and the K loop as one, so the next tile's loads are in flight during this
    tile's epilogue (a short K, e.g. GEMM2 with I = 192..512, otherwise spends much of each
    program in its prologue and store). Blocks past the last local one (the skip bucket, which
    the alignment puts last) only store zeros (WRITE_SKIP); a skip block among them would run
    its MMA on expert 0 and store zeros too."""
    if PDL_TRIGGER:
        gdc_launch_dependents()
    if PDL_WAIT:
        gdc_wait()
    m_blocks = tl.cdiv(tl.load(ntp_ptr), BLOCK_M)
    # m_live: one past the last block with a local expert
    m_live = 0
    for c0 in range(0, m_blocks, 1024):
        i = c0 + tl.arange(0, 1024)
        e = tl.load(expert_ids_ptr + i, mask=i < m_blocks, other=-1)
        m_live = tl.maximum(m_live, tl.max(tl.where(e >= 0, i + 1, 0), axis=0))
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    r = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), m_live * num_pid_n, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, m_live, num_pid_n, GROUP_M)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int32)
        e = tl.maximum(expert, 0)
        row0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        pos = row0 + r
        slot = tl.load(sorted_ids_ptr + pos, mask=pos < num_slots, other=num_valid).to(tl.int64)
        valid = slot < num_valid
        if not A_TMA:
            if A_SORTED:
                a_row = pos.to(tl.int64)
            else:
                a_row = tl.where(valid, slot // top_k, 0)  # padding slots read row 0; never stored
            a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]
        GU: tl.constexpr = 2 if GU_ONE else 1
        acc = tl.zeros((BLOCK_M, GU * BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, k_tiles):  # a bound the tile loop does not change: FLATTEN needs it
            if A_TMA:
                a = a_desc.load([row0, kk * BLOCK_K])
            elif EVEN_K:
                a = tl.load(a_ptrs + kk * BLOCK_K)
            else:
                a = tl.load(a_ptrs + kk * BLOCK_K, mask=(offs_k < K - kk * BLOCK_K)[None, :], other=0.0)
            acc, acc_up = _w_desc_dots(a, w_desc, e, n0, kk * BLOCK_K, up_offset, acc, acc_up, BLOCK_N, BLOCK_K,
                                       FUSE_SILU, DOT_F32, PRECISION, GU_ONE, UP_FIRST)
        if GU_ONE:
            acc, acc_up = _gu_split(acc, BLOCK_M, BLOCK_N, UP_FIRST)
        acc = _epilogue(acc, acc_up, topk_w_ptr, slot, valid, MUL_WEIGHT, FUSE_SILU)
        c_ptrs, c_mask = _c_tile(c_ptr, pos, slot, n0 + cols, N, num_valid, num_slots, stride_cm, C_SORTED)
        tl.store(c_ptrs, tl.where(expert >= 0, acc * scale, 0.0).to(c_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_SKIP:
        for tile in range(m_live * num_pid_n + tl.program_id(0), m_blocks * num_pid_n, NUM_PROGS):
            pos = (tile // num_pid_n) * BLOCK_M + r
            offs_n = (tile % num_pid_n) * BLOCK_N + cols
            slot = tl.load(sorted_ids_ptr + pos, mask=pos < num_slots, other=num_valid).to(tl.int64)
            c_ptrs, c_mask = _c_tile(c_ptr, pos, slot, offs_n, N, num_valid, num_slots, stride_cm, C_SORTED)
            tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _act_and_mul_kernel(x_ptr, y_ptr, d, stride_x, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (_act(g, ACT) * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["T"])
def _moe_sum_kernel(x_ptr, y_ptr, T, H, stride_xt, stride_xk, stride_yt, scale,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, PDL_WAIT: tl.constexpr):
    if PDL_WAIT:  # launched while the GEMM that writes x runs
        gdc_wait()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = (t < T)[:, None] & (cols < H)[None, :]
    src = x_ptr + t.to(tl.int64)[:, None] * stride_xt + cols[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed order: deterministic
        # int64: a [k, T, H] buffer viewed as [T, k, H] has stride(1) = T * H, (k - 1) times that can pass 2^31
        acc += tl.load(src + j * tl.cast(stride_xk, tl.int64), mask=m, other=0.0).to(tl.float32)
    dst = y_ptr + t.to(tl.int64)[:, None] * stride_yt + cols[None, :]
    tl.store(dst, (acc * scale).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _decode_in_pair(ids_ptr, map_ptr, item, n_iblk, ok, num_ids, num_local, TOP_K: tl.constexpr,
                    BI: tl.constexpr, HAS_MAP: tl.constexpr):
    """Work item ``item`` of the decode kernel's phase 1 -> (pair p, first intermediate row i0,
    expert e; -1 for none, and unless ``ok``)."""
    p = item // n_iblk
    i0 = (item % n_iblk) * BI
    e = _map_expert(map_ptr, tl.load(ids_ptr + p, mask=ok, other=-1).to(tl.int32), num_ids, num_local, HAS_MAP)
    return p, i0, e


@triton.jit
def _decode_in_w(w1_ptr, e, i0, k0, I, H, stride_w1e, stride_w1n, BI: tl.constexpr, BK: tl.constexpr,
                 UP_FIRST: tl.constexpr = False):
    """w1 rows [2, BI, BK] of expert e: gate rows i0 + [0, BI) and the matching up rows (I
    further; with UP_FIRST, ``[up; gate]``, I before), columns k0 + [0, BK) of H; zeros (no
    traffic) for e = -1."""
    s = tl.arange(0, 2)[:, None, None]
    if UP_FIRST:
        s = 1 - s
    rows = i0 + tl.arange(0, BI)[None, :, None]
    cols = k0 + tl.arange(0, BK)[None, None, :]
    ptrs = w1_ptr + tl.maximum(e, 0).to(tl.int64) * stride_w1e + (s * I + rows).to(tl.int64) * stride_w1n + cols
    # (no rows for e = -1 by the row bound, not ``(e >= 0) & ...``: the interpreter makes a
    # scalar-and-block ``&`` an int32 block, which triton 3.9's interpreted load refuses as a mask)
    return tl.load(ptrs, mask=(rows < tl.where(e >= 0, I, 0)) & (cols < H), other=0.0)


@triton.jit
def _decode_in_acc(x_ptr, w, p, k0, H, stride_xt, TOP_K: tl.constexpr, BK: tl.constexpr):
    """[2, BI] partial dot products of the w1 rows with x[p // TOP_K] over columns k0 + [0, BK)."""
    cols = k0 + tl.arange(0, BK)
    xv = tl.load(x_ptr + (p // TOP_K).to(tl.int64) * stride_xt + cols, mask=cols < H, other=0.0)
    return tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, None, :], axis=2)


@triton.jit
def _decode_in_store(h_ptr, tw_ptr, acc, p, i0, I, BI: tl.constexpr, ON_INPUT: tl.constexpr):
    """h[p, i0 + [0, BI)] = silu(gate) * up (times the routing weight if on the input), rounded
    to h's dtype."""
    if ON_INPUT:
        acc = acc * tl.load(tw_ptr + p).to(tl.float32)
    first = tl.arange(0, 2)[:, None] == 0
    g = tl.sum(tl.where(first, acc, 0.0), axis=0)
    u = tl.sum(tl.where(first, 0.0, acc), axis=0)
    ri = i0 + tl.arange(0, BI)
    tl.store(h_ptr + p.to(tl.int64) * I + ri, (_silu(g) * u).to(h_ptr.dtype.element_ty), mask=ri < I)


@triton.jit
def _decode_out_pairs(ids_ptr, map_ptr, item, n_hblk, ok, num_ids, num_local, TOP_K: tl.constexpr,
                      KP: tl.constexpr, BH: tl.constexpr, HAS_MAP: tl.constexpr):
    """Output tile ``item`` of the decode kernel's phase 2 -> (token t, first column h0, its pairs
    p [KP], their experts e [KP], -1 for none; all -1 unless ``ok``)."""
    j = tl.arange(0, KP)
    t = item // n_hblk
    h0 = (item % n_hblk) * BH
    p = t * TOP_K + j
    e = _map_expert(map_ptr, tl.load(ids_ptr + p, mask=(j < TOP_K) & ok, other=-1).to(tl.int32), num_ids, num_local,
                    HAS_MAP)
    return t, h0, p, e


@triton.jit
def _decode_out_w(w2_ptr, e, h0, k0, H, I, stride_w2e, stride_w2n, BH: tl.constexpr, BJ: tl.constexpr):
    """The w2 weights [KP, BH, BJ] of experts e, rows h0 + [0, BH), columns k0 + [0, BJ) of I."""
    rows = h0 + tl.arange(0, BH)[None, :, None]
    cols = k0 + tl.arange(0, BJ)[None, None, :]
    w_rows = w2_ptr + tl.maximum(e, 0).to(tl.int64)[:, None, None] * stride_w2e + rows.to(tl.int64) * stride_w2n
    return tl.load(w_rows + cols, mask=(e >= 0)[:, None, None] & (rows < H) & (cols < I), other=0.0)


@triton.jit
def _decode_out_acc(h_ptr, p, e, w, k0, I, BJ: tl.constexpr):
    """[KP, BH] partial sums w . h[p] over columns k0 + [0, BJ) of I (h written by phase 1:
    read past L1)."""
    cols = k0 + tl.arange(0, BJ)[None, None, :]
    hv = tl.load(h_ptr + p.to(tl.int64)[:, None, None] * I + cols, mask=(e >= 0)[:, None, None] & (cols < I),
                 other=0.0, cache_modifier=".cg")
    return tl.sum(w.to(tl.float32) * hv.to(tl.float32), axis=2)


@triton.jit
def _decode_out_store(out_ptr, tw_ptr, acc, t, h0, p, e, H, stride_ot, scale, TOP_K: tl.constexpr,
                      KP: tl.constexpr, BH: tl.constexpr, ON_INPUT: tl.constexpr):
    """out[t, h0 + [0, BH)] = scale * sum_j w[p_j] * acc[j] (j in a fixed order)."""
    if not ON_INPUT:
        j = tl.arange(0, KP)
        wt = tl.load(tw_ptr + p, mask=(j < TOP_K) & (e >= 0), other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
    y = tl.sum(acc, axis=0) * scale
    ro = h0 + tl.arange(0, BH)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + ro, y.to(out_ptr.dtype.element_ty), mask=ro < H)


@triton.jit(do_not_specialize=["T"])
def _moe_decode_kernel(x_ptr, w1_ptr, w2_ptr, h_ptr, out_ptr, ids_ptr, map_ptr, tw_ptr, sync_ptr,
                       T, H, I, num_ids, num_local, stride_xt, stride_w1e, stride_w1n, stride_w2e, stride_w2n,
                       stride_ot, scale,
                       TOP_K: tl.constexpr, KP: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
                       BH: tl.constexpr, BJ: tl.constexpr, HAS_MAP: tl.constexpr, ON_INPUT: tl.constexpr,
                       PHASE: tl.constexpr, PREFETCH: tl.constexpr, PIPE1: tl.constexpr,
                       GEN_BARRIER: tl.constexpr = False, UP_FIRST: tl.constexpr = False):
    """The whole MoE layer for a decode batch (the pair path) in one launch of a persistent
    grid. PHASE 1: h[p, i] = silu(x[t] . gate[e, i]) * (x[t] . up[e, i]) for every pair p =
    t*TOP_K + j and i in [0, I), as [2, BI, BK] weight tiles (gate and up rows together) striped
    over the grid. PHASE 2: out[t, c] = scale * sum_j w[p] * (w2[e_p, c, :] . h[p]) for
    [KP, BH, BJ] tiles (all k experts of a token at once), in fp32, j in fixed order. PHASE 0
    runs both with a grid barrier between them: every program must be resident at once (the
    launcher sizes the grid from the SM count), and ``sync_ptr`` holds two int32 counters that
    are 0 at launch and that the last program out resets (so graph replays find them at 0),
    and with GEN_BARRIER a generation word (sync[2]) that the last arrival advances.
    Pairs with expert -1 (skipped rows, remote experts) contribute 0; h is rounded to x's
    dtype, as the unfused path rounds its intermediate. PREFETCH (one launch, I <= BJ, at most
    one phase-2 tile a program): each program requests its phase-2 weight tile before phase 1,
    so those bytes stream while phase 1 runs and only the small h rows wait for the barrier.
    PIPE1 (H <= BK): phase 1 asks for its next item's weights before this item's math (two
    tiles in flight a program)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    numel = T * TOP_K
    n_hblk = tl.cdiv(H, BH)
    n_out = T * n_hblk
    if PREFETCH:  # (one launch, I <= BJ) request the first output tile's w2 weights before phase 1
        t_pre, h0_pre, p_pre, e_pre = _decode_out_pairs(ids_ptr, map_ptr, tl.minimum(pid, n_out - 1), n_hblk,
                                                        pid < n_out, num_ids, num_local, TOP_K, KP, BH, HAS_MAP)
        w_pre = _decode_out_w(w2_ptr, e_pre, h0_pre, 0, H, I, stride_w2e, stride_w2n, BH, BJ)
    if PHASE != 2:
        n_iblk = tl.cdiv(I, BI)
        n_in = numel * n_iblk
        if PIPE1:  # H in one tile: the next item's weights are requested before this one's math
            pa, ia, ea = _decode_in_pair(ids_ptr, map_ptr, tl.minimum(pid, n_in - 1), n_iblk, pid < n_in, num_ids,
                                         num_local, TOP_K, BI, HAS_MAP)
            wa = _decode_in_w(w1_ptr, ea, ia, 0, I, H, stride_w1e, stride_w1n, BI, BK, UP_FIRST)
            for item in range(pid, n_in, nprog):
                nxt = item + nprog
                pb, ib, eb = _decode_in_pair(ids_ptr, map_ptr, tl.minimum(nxt, n_in - 1), n_iblk, nxt < n_in, num_ids,
                                             num_local, TOP_K, BI, HAS_MAP)
                wb = _decode_in_w(w1_ptr, eb, ib, 0, I, H, stride_w1e, stride_w1n, BI, BK, UP_FIRST)
                acc1 = _decode_in_acc(x_ptr, wa, pa, 0, H, stride_xt, TOP_K, BK)
                _decode_in_store(h_ptr, tw_ptr, acc1, pa, ia, I, BI, ON_INPUT)
                pa, ia, wa = pb, ib, wb
        else:
            for item in range(pid, n_in, nprog):
                pa, ia, ea = _decode_in_pair(ids_ptr, map_ptr, item, n_iblk, True, num_ids, num_local, TOP_K, BI,
                                             HAS_MAP)
                acc1 = tl.zeros((2, BI), dtype=tl.float32)
                for k0 in range(0, H, BK):
                    wa = _decode_in_w(w1_ptr, ea, ia, k0, I, H, stride_w1e, stride_w1n, BI, BK, UP_FIRST)
                    acc1 += _decode_in_acc(x_ptr, wa, pa, k0, H, stride_xt, TOP_K, BK)
                _decode_in_store(h_ptr, tw_ptr, acc1, pa, ia, I, BI, ON_INPUT)
    if PHASE == 0:  # grid barrier: every h row is written before any program reads one
        tl.debug_barrier()
        if GEN_BARRIER:  # one arrival atomic; waiters poll a generation word with acquire loads
            # its own word (sync[2]): the other form's leave counter (sync[1]) stays 0 between
            # launches, so the two forms may follow each other on one slot
            gen = tl.load(sync_ptr + 2, volatile=True)  # read before arriving: it moves only after all arrive
            if tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") == nprog - 1:
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")  # 0 for the next launch
                tl.atomic_xchg(sync_ptr + 2, gen + 1, sem="release", scope="gpu")
            else:  # (an acquire add of 0 compiles to an acquire load: no read-modify-write in the poll)
                while tl.atomic_add(sync_ptr + 2, 0, sem="acquire", scope="gpu") == gen:
                    pass
        else:
            tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
            while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < nprog:
                pass
            if tl.atomic_add(sync_ptr + 1, 1, sem="relaxed", scope="gpu") == nprog - 1:
                tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")  # every program has left the wait
                tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
    if PHASE != 1:
        start = pid
        if PREFETCH:  # this program's first output tile: its weights arrived during phase 1
            if pid < n_out:
                acc = _decode_out_acc(h_ptr, p_pre, e_pre, w_pre, 0, I, BJ)
                _decode_out_store(out_ptr, tw_ptr, acc, t_pre, h0_pre, p_pre, e_pre, H, stride_ot, scale,
                                  TOP_K, KP, BH, ON_INPUT)
            start = pid + nprog
        for item in range(start, n_out, nprog):
            t, h0, p, e = _decode_out_pairs(ids_ptr, map_ptr, item, n_hblk, True, num_ids, num_local, TOP_K, KP, BH,
                                            HAS_MAP)
            acc = tl.zeros((KP, BH), dtype=tl.float32)
            for k0 in range(0, I, BJ):
                w = _decode_out_w(w2_ptr, e, h0, k0, H, I, stride_w2e, stride_w2n, BH, BJ)
                acc += _decode_out_acc(h_ptr, p, e, w, k0, I, BJ)
            _decode_out_store(out_ptr, tw_ptr, acc, t, h0, p, e, H, stride_ot, scale, TOP_K, KP, BH, ON_INPUT)

@triton.jit
def _gather_rows_kernel(x_ptr, out_ptr, sorted_ids_ptr, ntp_ptr, num_valid, top_k, H, stride_x, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[p] = x[sorted_ids[p] // top_k] for slots p < num_tokens_post_pad (pads: zeros), so
    GEMM1 can read its A tiles contiguously (by TMA) instead of gathering rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ntp = tl.load(ntp_ptr)
    if tl.program_id(0) * BLOCK_R >= ntp:
        return
    live = rows < ntp
    src = tl.load(sorted_ids_ptr + rows, mask=live, other=num_valid)
    ok = src < num_valid
    src_row = tl.where(ok, src // top_k, 0).to(tl.int64)
    dst_row = rows.to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        cm = (cols < H)[None, :]
        v = tl.load(x_ptr + src_row[:, None] * stride_x + cols[None, :], mask=ok[:, None] & cm, other=0.0)
        tl.store(out_ptr + dst_row[:, None] * stride_o + cols[None, :], v, mask=live[:, None] & cm)


@triton.jit
def _bucket(ids_ptr, map_ptr, offs, mask, num_ids, num_local, HAS_MAP: tl.constexpr):
    """Bucket of each pair: its local expert, or ``num_local`` (the skip bucket) for id -1,
    experts not on this rank (expert_map -1) and ids or map entries out of range."""
    e = _map_expert(map_ptr, tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32), num_ids, num_local, HAS_MAP)
    return tl.where(e >= 0, e, num_local)


@triton.jit
def _align_count_kernel(ids_ptr, map_ptr, counts_ptr, sorted_ptr, numel, num_ids, num_local, cap,
                        HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr):
    """Pass 1: fill slots [pid*CH, pid*CH + CH) with the pad value numel; add this chunk's
    per-bucket pair counts to counts[NB]."""
    offs = tl.program_id(0) * CH + tl.arange(0, CH)
    tl.store(sorted_ptr + offs, tl.zeros([CH], tl.int32) + numel, mask=offs < cap)
    m = offs < numel
    if tl.program_id(0) * CH < numel:
        h = tl.histogram(_bucket(ids_ptr, map_ptr, offs, m, num_ids, num_local, HAS_MAP), NB, mask=m)
        tl.atomic_add(counts_ptr + tl.arange(0, NB), h, mask=h > 0)


@triton.jit
def _align_scatter_kernel(ids_ptr, map_ptr, counts_ptr, sorted_ptr, eid_ptr, ntp_ptr, numel, num_ids, num_local,
                          block_size, n_blocks, HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr,
                          EB: tl.constexpr):
    """Pass 2: bucket b starts at slot start[b] (padded counts, exclusive prefix sum); each pair
    takes the next free slot of its bucket (an integer atomic on cursor[b] = counts[NB + b]), so
    the order inside a bucket is unspecified but every pair lands exactly once. Blocks
    [pid*EB, ...) get their bucket's expert (-1 for the skip bucket); program 0 writes the padded
    total. GEMM rows do not depend on their slot, so results stay deterministic."""
    pid = tl.program_id(0)
    bins = tl.arange(0, NB)
    counts = tl.load(counts_ptr + bins)
    padded = (counts + block_size - 1) // block_size * block_size
    start = tl.cumsum(padded, 0) - padded
    ntp = tl.sum(padded, 0)
    if pid == 0:
        tl.store(ntp_ptr, ntp)
    offs = pid * CH + tl.arange(0, CH)
    m = offs < numel
    b = _bucket(ids_ptr, map_ptr, offs, m, num_ids, num_local, HAS_MAP)
    pos = tl.atomic_add(counts_ptr + NB + b, tl.full([CH], 1, tl.int32), mask=m)
    tl.store(sorted_ptr + tl.gather(start, b, 0) + pos, offs, mask=m)
    first_blk = start // block_size
    used = padded > 0
    for j in range(pid * EB, tl.minimum(ntp // block_size, n_blocks), tl.num_programs(0) * EB):
        blk = j + tl.arange(0, EB)
        hit = used[None, :] & (first_blk[None, :] <= blk[:, None])
        e = tl.max(tl.where(hit, bins[None, :], -1), 1)
        tl.store(eid_ptr + blk, tl.where(e < num_local, e, -1), mask=blk < ntp // block_size)


@triton.jit
def _align_one_kernel(ids_ptr, map_ptr, cursor_ptr, sorted_ptr, eid_ptr, ntp_ptr, numel, num_ids, num_local,
                      block_size, HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr, FB: tl.constexpr,
                      EB: tl.constexpr, PDL_TRIGGER: tl.constexpr):
    """The whole alignment of ``numel <= CH`` pairs in one program: no memset, one launch
    (decode batches, where the two-launch path's fixed cost is the whole cost). Bucket counts
    by histogram, slot starts by prefix sum; pads, expert ids and the padded total are written
    first; then, past a CTA barrier (which orders this program's global writes), each pair takes
    the next free slot of its bucket by an integer atomic on this launch's own cursors (set to
    the bucket starts before the barrier). Order inside a bucket: unspecified, as in the
    two-launch path."""
    if PDL_TRIGGER:  # GEMM1 may launch now; it waits (gdc_wait) for this program to finish
        gdc_launch_dependents()
    offs = tl.arange(0, CH)
    m = offs < numel
    b = _bucket(ids_ptr, map_ptr, offs, m, num_ids, num_local, HAS_MAP)
    bins = tl.arange(0, NB)
    counts = tl.histogram(b, NB, mask=m)
    padded = (counts + block_size - 1) // block_size * block_size
    start = tl.cumsum(padded, 0) - padded
    ntp = tl.sum(padded, 0)
    tl.store(ntp_ptr, ntp)
    tl.store(cursor_ptr + bins, start)
    for s0 in range(0, ntp, FB):
        s = s0 + tl.arange(0, FB)
        tl.store(sorted_ptr + s, tl.zeros([FB], tl.int32) + numel, mask=s < ntp)
    first_blk = start // block_size
    used = padded > 0
    n_used = ntp // block_size
    for j in range(0, n_used, EB):
        blk = j + tl.arange(0, EB)
        hit = used[None, :] & (first_blk[None, :] <= blk[:, None])
        e = tl.max(tl.where(hit, bins[None, :], -1), 1)
        tl.store(eid_ptr + blk, tl.where(e < num_local, e, -1), mask=blk < n_used)
    tl.debug_barrier()
    pos = tl.atomic_add(cursor_ptr + b, tl.full([CH], 1, tl.int32), mask=m)
    tl.store(sorted_ptr + pos, offs, mask=m)


# ------------------------------------------------------------------- launch heuristics
# The one place where tile sizes, warps and stages are chosen. A config is
# {"block_m": B, "pairs": bool, "gemm1": G, "gemm2": G} with
# G = {"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} and optional keys (each falls
# back to the plain form where its preconditions fail, e.g. unaligned strides for "tma"):
#   "tma"         weight tiles (and slot-ordered A tiles) by tensor descriptors
#   "sort_x"      GEMM1: copy x into slot order first, so A is read by descriptor
#   "one_dot"     GEMM1 with "tma": gate and up tiles as one box, one dot (not in tail-split pieces)
#   "persistent"  aligned path with "tma": one program per SM ("progs_per_sm"), loops flattened
#                 ("flatten": False turns that off)
#   "tail_split"  aligned block GEMM with A by descriptor: split the last partial wave along K
# Tables may carry "ms" (the tuner's timings) and "note" (how an entry was chosen) beside them.

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "moe")
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _g(bn, bk, gm, warps, stages):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": warps, "num_stages": stages}


# Per BLOCK_M: (GEMM1 with fused activation, plain GEMM) for shapes without a table entry:
# conservative pointer-load tiles, each checked on an H100 by the GPU tests; the tuned tables
# (benchmarks/suites/moe.py --tune) mostly pick bigger TMA tiles.
_DEFAULTS = {
    16: (_g(64, 128, 1, 4, 4), _g(64, 128, 1, 4, 4)),
    32: (_g(64, 128, 8, 4, 4), _g(64, 128, 8, 4, 4)),
    64: (_g(64, 64, 8, 4, 4), _g(128, 64, 8, 4, 4)),
    128: (_g(128, 64, 8, 8, 3), _g(128, 64, 8, 8, 4)),
    256: (_g(64, 64, 8, 8, 3), _g(128, 64, 8, 8, 3)),
}


def _interp_gemm(N, K):
    # Small tiles under the interpreter: the tests use H, I of a few dozen.
    return _g(max(16, min(32, next_pow2(N))), max(16, min(32, next_pow2(K))), 4, 4, 1)


def gemm_config(block_m: int, N: int, K: int, fused: bool) -> dict:
    """Tile config of one grouped GEMM when no whole-layer config applies (the standalone op)."""
    if _config.interpreting():
        return _interp_gemm(N, K)
    return dict(_DEFAULTS[block_m][0 if fused else 1])


def config_file_name(E: int, N: int, K: int, device_name: str, dtype: torch.dtype) -> str:
    """``E8_N7168_K4096_NVIDIA_H100_80GB_HBM3_bf16.json`` (N = I per GPU, K = H)."""
    return f"E{E}_N{N}_K{K}_{re.sub(r'[^A-Za-z0-9]+', '_', device_name)}_{_DTYPE_NAMES[dtype]}.json"


@functools.lru_cache(maxsize=None)
def _load_table(name: str) -> Optional[dict]:
    path = os.path.join(CONFIG_DIR, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {int(t): cfg for t, cfg in json.load(f).items()}


def _pairs_rule(T: int, k: int, E: int) -> bool:
    return T * k * 4 <= E  # decode: few pairs, each its own block, no alignment pass


def default_moe_config(T: int, k: int, E: int, I: int, H: int) -> dict:
    """Shape heuristic: BLOCK_M from the mean number of pairs per expert."""
    if _config.interpreting():
        return {"block_m": 16, "pairs": _pairs_rule(T, k, E), "gemm1": _interp_gemm(I, H), "gemm2": _interp_gemm(H, I)}
    per_expert = T * k / max(E, 1)
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64 if per_expert <= 128 else 128
    g1, g2 = _DEFAULTS[block_m]
    return {"block_m": block_m, "pairs": _pairs_rule(T, k, E), "gemm1": dict(g1), "gemm2": dict(g2)}


_TUNED: dict = {}


# Cards that share a chip run the same tiles best: an H200 or H800 is an H100's compute with other
# memory, so without a table of its own it takes the H100's (tuned on that card) rather than the
# untuned defaults. Looked up by compute capability. A card's own table may hold only the token
# counts where it measured differently: its entries replace the chip table's at those counts.
_SAME_CHIP_TABLES = {(9, 0): ("NVIDIA H100 80GB HBM3",)}


def table_devices(device_name: str, capability: tuple) -> tuple:
    """Device names whose shipped tables serve this card, best first: its own, then its chip's."""
    return (device_name,) + tuple(d for d in _SAME_CHIP_TABLES.get(tuple(capability), ()) if d != device_name)


def merged_table(E: int, I: int, H: int, names: tuple, dtype: torch.dtype) -> Optional[dict]:
    """The launch-config table of devices ``names`` (best first): every token count any of
    their tables holds, each taken from the first table that has it; None without any table."""
    merged: dict = {}
    for name in reversed(names):
        merged.update(_load_table(config_file_name(E, I, H, name, dtype)) or {})
    return merged or None


@functools.lru_cache(maxsize=None)
def _table_for(E: int, I: int, H: int, device_index: int, dtype: torch.dtype) -> Optional[dict]:
    names = table_devices(torch.cuda.get_device_name(device_index), torch.cuda.get_device_capability(device_index))
    return merged_table(E, I, H, names, dtype)


def moe_config(T: int, k: int, E: int, I: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The whole-layer launch config for ``fused_moe`` (block size, both GEMMs' tiles)."""
    if device.type == "cuda" and not _config.interpreting():
        if _TUNED:
            hit = _TUNED.get((E, I, H, k, dtype, next_pow2(max(T, 1))))
            if hit is not None:
                return hit
        table = _table_for(E, I, H, device.index or 0, dtype)
        if table:
            cfg = table[min(table, key=lambda t: abs(t - T))]
            return cfg if "pairs" in cfg else {**cfg, "pairs": _pairs_rule(T, k, E)}
    return default_moe_config(T, k, E, I, H)


# ---------------------------------------------------------------------------- launchers


_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (Hopper: 227 KB per block)


def _fit_smem(cfg, block_m, fused, elem):
    """Fewer stages, then a smaller BLOCK_K, until the pipelined A and weight tiles fit shared
    memory (fp32 inputs, or a 16-bit config reused for a bigger element size). For elements
    wider than 16 bits it also reserves the persistent GEMM's extra stage (its flattened loop
    holds one more than ``num_stages``); 16-bit configs are the tuned ones and stay as compiled
    and measured (their real footprint is below this estimate: Qwen3's and DeepSeek-V3's
    persistent GEMM2 with 4 stages runs on an H100)."""
    c = dict(cfg)
    extra = 1 if c.get("persistent") and c.get("flatten", True) and elem > 2 else 0

    def smem():
        return (c["num_stages"] + extra) * (block_m + (2 if fused else 1) * c["BLOCK_N"]) * c["BLOCK_K"] * elem

    while smem() > _SMEM_BUDGET and c["num_stages"] > 2:
        c["num_stages"] -= 1
    while smem() > _SMEM_BUDGET and c["BLOCK_K"] > 16:
        c["BLOCK_K"] //= 2
    return c


def _gate_up_view(w):
    """w1 [E, 2I, H] ([gate; up] rows) as [E, 2, I, H]: one descriptor box [1, 2, BN, BK] holds
    gate rows n.. and up rows I + n.. of the same columns (config key "one_dot")."""
    E, n2, K = w.shape
    return w.as_strided((E, 2, n2 // 2, K), (w.stride(0), (n2 // 2) * w.stride(1), w.stride(1), w.stride(2)))


def _tma_ok(w) -> bool:
    """The copy engine needs 16-byte aligned base and strides (and a unit last stride)."""
    e = w.element_size()
    return w.stride(2) == 1 and w.data_ptr() % 16 == 0 and (w.stride(0) * e) % 16 == 0 and (w.stride(1) * e) % 16 == 0


# Aligned blocks of at least this many rows multiply only their first half when the second half
# is all padding (an expert's last block): the expected share of padded rows in random routing
# at BLOCK_M=128 falls from 20% to 11% at Qwen3-30B T=4096 and from 16% to 9% at Mixtral
# T=1024. Set to a huge value to turn it off. H100, 2026-12-06, whole layers (CUDA-graph
# replays, shipped tiles), off -> on: Qwen3 T=4096 379.5 -> 363.3 us, T=1024 180.0 -> 173.8;
# Mixtral T=1024 814.3 -> 798.0, T=4096 2533.0 -> 2535.3; DeepSeek-V3 T=4096 2745.3 -> 2607.8,
# T=16384 7122.0 -> 7008.6 (scripts/ab_gemm_modes.py, best of two rounds).
HALF_TAIL_MIN_BLOCK_M = 64


def half_tail_on(block_m: int) -> bool:
    return block_m >= max(HALF_TAIL_MIN_BLOCK_M, 32)


# Tail split (config key "tail_split": the most pieces a tile may split into; aligned path, A and
# the weights by descriptor). A grid of many waves of equal tiles ends in a partial wave that
# leaves most SMs idle for a whole tile (Mixtral GEMM2 at T=1024: about 2.4 waves of 128x256
# tiles of K=7168). The kernel counts the live tiles from num_tokens_post_pad, runs the whole
# waves (one program per SM) as usual and splits each tile of the last wave along K into as many
# pieces as fill a wave (at most "tail_split"); the pieces store fp32 partial tiles, and the
# last piece of a tile to finish folds them in piece order (deterministic) before the epilogue.
# H100, 2026-12-06 (scripts/ab_phase.py, GEMM2 alone, CUDA-graph replays, five rounds, us):
# Mixtral T=1024 263.3-278.2 -> 245.3-250.5 (shipped in its table: the layer 797.6 -> 765.9 at
# best, 1.21x -> 1.26x torch._grouped_mm); Mixtral T=4096 806-831 -> 782-838 (noise); DeepSeek
# T=4096 (K=512) 851-876 -> 891-932 (loses: short pieces, and the fold is a larger share).
# GEMM1 at Mixtral T=1024 / 4096: within noise.
# Programs of one wave under the interpreter: small CPU tests still split their tail.
TAIL_SLOTS_INTERP = 7
TAIL_SLOTS: Optional[int] = None  # programs of one wave on CUDA (None: the SM count; tests set it)


def tail_plan(live_tiles: int, slots: int, max_split: int) -> tuple[int, int, int]:
    """(whole-wave tiles, tail tiles, pieces per tail tile) as the kernel derives them from the
    live tiles (for tests and tuning; the kernel computes them on the device)."""
    full = live_tiles // slots * slots
    tail = live_tiles - full
    return full, tail, min(max_split, slots // max(tail, 1))


def _launch_gemm(a, w, c, *, num_valid, top_k, block_m, cfg, align=None, pairs=None, topk_w=None,
                 mul=False, fuse_silu=False, write_skip=True, scale=1.0, a_sorted=False, c_sorted=False,
                 pdl_trigger=False, pdl_wait=False, half_tail=None, up_first=False):
    """One grouped GEMM ``c = gather(a) @ w[e].T`` over aligned blocks (``align`` =
    (sorted_ids, expert_ids, ntp)) or single pairs (``pairs`` = (flat topk_ids, expert_map)).
    ``c_sorted``: rows of c are slot positions (the sorted intermediate [num_slots, N]);
    ``a_sorted``: rows of a are slot positions (read contiguously, by TMA when the config says).
    ``pdl_wait``: launched as a programmatic dependent of the previous kernel (which must
    trigger, or finish); ``pdl_trigger``: lets the next kernel launch early (see moe_pdl).
    ``half_tail``: blocks whose second half is all padding multiply only their first half
    (aligned path; default: ``half_tail_on(block_m)``). ``up_first`` (with ``fuse_silu``): w is
    ``[up; gate]`` instead of ``[gate; up]``, read in place."""
    assert fuse_silu or not up_first, "up_first needs fuse_silu (a gate/up weight)"
    n_out = w.shape[1] // 2 if fuse_silu else w.shape[1]
    K = w.shape[2]
    if num_valid == 0 or n_out == 0:
        return
    if align is not None:
        sorted_ids, expert_ids, ntp = align
        num_slots = sorted_ids.numel()
        num_m_blocks = cdiv(num_slots, block_m)
        ids, emap = sorted_ids, sorted_ids
    else:
        ids, emap = pairs
        sorted_ids = expert_ids = ntp = ids
        num_slots = num_m_blocks = num_valid
        emap = emap if emap is not None else ids
        a_sorted = c_sorted = False  # a pair's slot is its own row already
    interp = _config.interpreting()
    if not interp:
        cfg = _fit_smem(cfg, block_m, fuse_silu, a.element_size())
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    use_tma = bool(cfg.get("tma")) and _tma_ok(w)
    a_tma = use_tma and a_sorted and _tma_ok(a.unsqueeze(0))
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m, bk]) if a_tma else a
    persistent = align is not None and bool(cfg.get("persistent")) and use_tma
    split = int(cfg.get("tail_split", 0)) if align is not None and a_tma and not persistent else 0
    # config "one_dot": gate and up tiles by one 4-D box and one dot (not with tail-split pieces)
    gu_one = fuse_silu and use_tma and bool(cfg.get("one_dot")) and split <= 1
    if gu_one:
        w4 = _gate_up_view(w)
        w_desc = TensorDescriptor(w4, list(w4.shape), list(w4.stride()), [1, 2, bn, bk])
    else:
        w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, bn, bk]) if use_tma else w
    if persistent:
        n_tiles = num_m_blocks * cdiv(n_out, bn)
        per_sm = cfg.get("progs_per_sm", 1)
        progs = min(n_tiles, 3 if interp else per_sm * _config.sm_count(a.device.index or 0))
        _moe_gemm_persistent_kernel[(progs,)](
            a, a_desc, w_desc, c, sorted_ids, expert_ids, ntp, topk_w if topk_w is not None else c,
            n_out, K, num_valid, num_slots, top_k, n_out, a.stride(0), c.stride(0), float(scale),
            BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], NUM_PROGS=progs,
            MUL_WEIGHT=mul, FUSE_SILU=fuse_silu, WRITE_SKIP=write_skip, A_SORTED=a_sorted, A_TMA=a_tma,
            EVEN_K=K % bk == 0, C_SORTED=c_sorted,
            FLATTEN=bool(cfg.get("flatten", True)),
            DOT_F32=interp and a.dtype != torch.float32,
            PRECISION="ieee" if (interp or a.dtype == torch.float32) else "tf32",
            PDL_TRIGGER=pdl_trigger, PDL_WAIT=pdl_wait, GU_ONE=gu_one, UP_FIRST=up_first, launch_pdl=pdl_wait,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **COMPILE_OPTIONS,
        )
        return
    half = align is not None and (half_tail_on(block_m) if half_tail is None else half_tail) and block_m >= 32
    a_desc_half = TensorDescriptor(a, list(a.shape), list(a.stride()), [block_m // 2, bk]) if a_tma and half else a
    grid = (num_m_blocks * cdiv(n_out, bn),)
    part = count = c
    slots = 0
    if split > 1:
        slots = TAIL_SLOTS_INTERP if interp else TAIL_SLOTS or _config.sm_count(a.device.index or 0)
        count = torch.zeros((slots,), dtype=torch.int32, device=a.device)
        part = torch.empty((slots * (2 if fuse_silu else 1) * block_m * bn,), dtype=torch.float32, device=a.device)
        grid = (grid[0] + slots,)
    _moe_gemm_kernel[grid](
        a, a_desc, a_desc_half, w, w_desc, c, sorted_ids, expert_ids, ntp, ids, emap,
        topk_w if topk_w is not None else c, part, count,
        n_out, K, num_valid, num_m_blocks, num_slots, top_k, n_out,
        _num_ids(pairs[1] if pairs is not None else None, w.shape[0]), w.shape[0],
        a.stride(0), w.stride(0), w.stride(1), c.stride(0), float(scale), slots,
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        MUL_WEIGHT=mul, FUSE_SILU=fuse_silu, WRITE_SKIP=write_skip,
        PAIRS=pairs is not None, HAS_MAP=pairs is not None and pairs[1] is not None,
        EVEN_K=K % bk == 0, W_TMA=use_tma, A_SORTED=a_sorted, A_TMA=a_tma, C_SORTED=c_sorted, HALF_TAIL=half,
        DOT_F32=interp and a.dtype != torch.float32,
        PRECISION="ieee" if (interp or a.dtype == torch.float32) else "tf32",
        PDL_TRIGGER=pdl_trigger, PDL_WAIT=pdl_wait, TAIL_SPLIT=split if split > 1 else 0, GU_ONE=gu_one,
        UP_FIRST=up_first, launch_pdl=pdl_wait,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **COMPILE_OPTIONS,
    )


def _intermediate(x, route, numel, I):
    """GEMM1's output: [numel, I] (pair rows) or, aligned, [slots, I] in slot order."""
    rows = route["align"][0].numel() if "align" in route else numel
    return x.new_empty((rows, I))


# Expert size (I * H elements) up to which the aligned path chains its kernels by PDL.
PDL_MAX_EXPERT_ELEMS = 1 << 20


def moe_pdl(device, pairs: bool = True, I: int = 0, H: int = 0) -> bool:
    """Whether fused_moe chains its kernels by programmatic dependent launch (sm_90+, not under
    the interpreter): each kernel lets the next one launch at its start, and the next one's
    programs wait (``gdc_wait``) for it to finish before reading what it wrote, so a launch's
    latency overlaps the previous grid instead of following it. Only state from before the
    chain (x, routing ids and weights, the expert weights) is read before a wait. The chain's
    first kernel (the align, or GEMM1 on the pair path) is a plain launch, so the layer still
    starts after whatever ran before it.

    On for the pair path (single-token decode) and for small experts (``I * H <=
    PDL_MAX_EXPERT_ELEMS``), whose kernels last a few microseconds. H200, 2026-12-04, CUDA-graph
    replays, PDL off -> on in the same call: pair path (T=1) Qwen3 16.5 -> 15.2 us, DeepSeek-V3
    59.6 -> 58.0, Mixtral 103.7 -> 103.0-103.4; Qwen3 aligned T=16 / 64 / 256: 71.0 -> 68.8,
    96.6 -> 94.1, 107.2 -> 105.7. Long GEMMs gain nothing and can lose: Mixtral T=16 337.7 ->
    345.2 (the dependent's programs, placed while the last wave runs, end up unevenly spread),
    DeepSeek-V3 T=16 388.3 -> 389.2."""
    device = torch.device(device)
    if device.type != "cuda" or _config.interpreting():
        return False
    if not pairs and I * H > PDL_MAX_EXPERT_ELEMS:
        return False
    return _config.sm_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def _gemm1(x, w1, h, cfg, route, block_m, k, flat_w, on_input, pdl_trigger=False, pdl_wait=False, up_first=False):
    """GEMM1 with silu_and_mul fused: h = silu(x @ gate.T) * (x @ up.T) (times w if on_input).
    Config "sort_x": copy x's rows into slot order first, so the GEMM reads A contiguously.
    ``up_first``: w1 is ``[up; gate]`` (FlashInfer's CUTLASS order)."""
    numel = x.shape[0] * k
    a, a_sorted = x, False
    if cfg.get("sort_x") and "align" in route:
        sorted_ids, _, ntp = route["align"]
        slots, H = sorted_ids.numel(), x.shape[1]
        a, a_sorted = x.new_empty((slots, H)), True
        _gather_rows_kernel[(cdiv(slots, 16),)](x, a, sorted_ids, ntp, numel, k, H, x.stride(0), a.stride(0),
                                                BLOCK_R=16, BLOCK_H=min(next_pow2(H), 512), num_warps=4,
                                                    **COMPILE_OPTIONS,
                                                )
    _launch_gemm(a, w1, h, num_valid=numel, top_k=k, block_m=block_m, cfg=cfg, topk_w=flat_w,
                 mul=on_input, fuse_silu=True, write_skip=False, a_sorted=a_sorted, c_sorted=True,
                 pdl_trigger=pdl_trigger, pdl_wait=pdl_wait, up_first=up_first, **route)


def _gemm2(h, w2, y, cfg, route, block_m, numel, flat_w, on_input, scale=1.0, pdl_trigger=False, pdl_wait=False):
    """GEMM2: y[pair] = (h @ w2[e].T) * (w unless on_input) * scale; zeros for skipped pairs."""
    _launch_gemm(h, w2, y, num_valid=numel, top_k=1, block_m=block_m, cfg=cfg, topk_w=flat_w,
                 mul=not on_input, write_skip=True, scale=scale, a_sorted=True,
                 pdl_trigger=pdl_trigger, pdl_wait=pdl_wait, **route)


def moe_sum_config(T: int, k: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) of the finalize sum: one token row per program, up to 1024
    columns, 4 warps (each thread loads 16-byte vectors of all k rows at once)."""
    return 1, min(next_pow2(H), 1024), 4


def _launch_moe_sum(x3, out, scale, pdl_wait=False):
    T, k, H = x3.shape
    if T == 0 or H == 0:
        return
    bt, bh, warps = moe_sum_config(T, k, H)
    _moe_sum_kernel[(cdiv(T, bt), cdiv(H, bh))](
        x3, out, T, H, x3.stride(0), x3.stride(1), out.stride(0), float(scale), TOP_K=k, BLOCK_T=bt, BLOCK_H=bh,
        PDL_WAIT=pdl_wait, launch_pdl=pdl_wait, num_warps=warps, **COMPILE_OPTIONS)


def _flat(t):
    """A contiguous 1-D view (or copy) of t: kernels index these by expanded pair index."""
    return t.contiguous().view(-1)


def moe_grouped_gemm_cuda(a, w, sorted_token_ids, expert_ids, num_tokens_post_pad, block_size, top_k,
                          topk_weights=None, mul_routed_weight=False):
    c = a.new_empty((a.shape[0] * top_k, w.shape[1]))
    flat_w = _flat(topk_weights) if mul_routed_weight else None
    _launch_gemm(a, w, c, num_valid=c.shape[0], top_k=top_k, block_m=block_size,
                 cfg=gemm_config(block_size, w.shape[1], w.shape[2], False),
                 align=(sorted_token_ids, expert_ids, num_tokens_post_pad), topk_w=flat_w, mul=mul_routed_weight)
    return c


def _act_and_mul_into(x2, y2, act):
    rows, d = y2.shape
    if rows == 0 or d == 0:
        return
    block = min(next_pow2(d), 1024)
    _act_and_mul_kernel[(rows, cdiv(d, block))](x2, y2, d, x2.stride(0), y2.stride(0), ACT=act, BLOCK=block,
                                                 num_warps=4, **COMPILE_OPTIONS)


def _act_and_mul_cuda(input, act):
    d = input.shape[-1] // 2
    out = input.new_empty((*input.shape[:-1], d))
    if out.numel() == 0:  # (a last dim of 0 cannot be flattened to [-1, 0])
        return out
    _act_and_mul_into(input.reshape(-1, 2 * d), out.view(-1, d), act)
    return out


def _act_and_mul_out_cuda(input, out, act):
    d = input.shape[-1] // 2
    if out.numel() == 0:
        return
    x2 = input.reshape(-1, 2 * d)
    try:
        y2 = out.view(-1, d)
    except RuntimeError:  # leading dims of out not flattenable: compute, then copy in
        out.copy_(_act_and_mul_cuda(input, act))
        return
    _act_and_mul_into(x2, y2, act)


def _gelu_act(approximate_tanh):
    return ACT_GELU_TANH if approximate_tanh else ACT_GELU


def silu_and_mul_cuda(input):
    return _act_and_mul_cuda(input, ACT_SILU)


def silu_and_mul_out_cuda(input, out):
    _act_and_mul_out_cuda(input, out, ACT_SILU)


def gelu_and_mul_cuda(input, approximate_tanh=False):
    return _act_and_mul_cuda(input, _gelu_act(approximate_tanh))


def gelu_and_mul_out_cuda(input, out, approximate_tanh=False):
    _act_and_mul_out_cuda(input, out, _gelu_act(approximate_tanh))


def moe_sum_cuda(input, routed_scaling_factor=1.0):
    out = input.new_empty((input.shape[0], input.shape[2]))
    x3 = input if input.stride(-1) == 1 else input.contiguous()
    _launch_moe_sum(x3, out, routed_scaling_factor)
    return out


def fused_moe_cuda(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu",
                   apply_router_weight_on_input=False, routed_scaling_factor=1.0, expert_map=None,
                   global_num_experts=-1, w1_up_first=False):
    x = hidden_states
    T, H = x.shape
    E, I, k = w1.shape[0], w2.shape[2], topk_ids.shape[1]
    out = x.new_empty((T, H))
    if T == 0 or k == 0:
        return out.zero_()
    numel = T * k
    if _autotune_enabled() and x.is_cuda and not torch.cuda.is_current_stream_capturing():
        cfg = autotune_moe_config(x, w1, w2, topk_weights, topk_ids, expert_map, up_first=w1_up_first)
    else:
        cfg = moe_config(T, k, E, I, H, x.dtype, x.device)
    if cfg["pairs"] and decode_one_launch(x.device, numel, I, H):
        return _moe_decode(x, w1, w2, _flat(topk_weights), _flat(topk_ids), expert_map, out,
                           apply_router_weight_on_input, routed_scaling_factor, up_first=w1_up_first)
    block_m = 16 if cfg["pairs"] else cfg["block_m"]
    pdl = moe_pdl(x.device, cfg["pairs"], I, H)
    route = _route(cfg, topk_ids, block_m, E, expert_map, pdl_trigger=pdl)
    flat_w = _flat(topk_weights)
    on_input = apply_router_weight_on_input
    h = _intermediate(x, route, numel, I)
    # the pair path's GEMM1 opens the chain (a plain launch); after the align it is a dependent
    _gemm1(x, w1, h, cfg["gemm1"], route, block_m, k, flat_w, on_input, pdl_trigger=pdl,
           pdl_wait=pdl and not cfg["pairs"], up_first=w1_up_first)
    # k == 1: GEMM2 writes the layer output itself (scaled), no finalize pass
    y = out if k == 1 else x.new_empty((numel, H))
    _gemm2(h, w2, y, cfg["gemm2"], route, block_m, numel, flat_w, on_input,
           scale=routed_scaling_factor if k == 1 else 1.0, pdl_trigger=pdl and k > 1, pdl_wait=pdl)
    if k > 1:
        _launch_moe_sum(y.view(T, k, H), out, routed_scaling_factor, pdl_wait=pdl)
    return out


# ------------------------------------------------------------- decode: the layer in one launch

# Small decode layers run as one persistent kernel (_moe_decode_kernel) instead of the pair
# path's GEMM1 -> GEMM2 -> finalize: see decode_one_launch. False: never (tests of the pair GEMMs;
# the environment variable FLASHOPS_MOE_DECODE_ONE_LAUNCH=0 does the same without code).
DECODE_ONE_LAUNCH = True
DECODE_MAX_ELEMS = 1 << 24  # numel * I * H up to which CUDA layers take it (decode_one_launch)
# The grid barrier's form: False, arrive + spin on the count (atomics) + leave; True, one arrival
# atomic and an acquire poll of a generation word (sync[2]), which only the last arrival writes
# (so sync[2] is not 0 between launches; sync[0] and sync[1] are, in both forms). H100,
# 2026-12-06, CUDA-graph replays, Qwen3 T=1 / 2 / 4: 13.24 / 20.47 / 33.89 us (count) against
# 13.79 / 21.17 / 34.55 (generation), so the count form stays.
DECODE_GEN_BARRIER = False
DECODE_PROGRAMS_PER_SM = 2  # 4-warp programs: two always fit an SM's registers (2 x 128 x 255 < 64K)


def decode_one_launch(device, numel: int, I: int, H: int) -> bool:
    """Whether fused_moe's pair path (decode) runs as ``_moe_decode_kernel``: always under the
    interpreter (its two phases, so CI tests the kernel), on CUDA where the touched expert
    weights (``numel * I * H`` elements per matrix) are few enough that every program's share
    of both GEMMs is requested at once. Larger layers stream better through the pipelined
    GEMMs. H100, 2026-12-05, CUDA-graph replays of 16 routings, this kernel (4 warps, two
    programs per SM) vs the pair-path GEMMs (us): Qwen3 (I 192, H 2048, k 8) T=1 / 2 / 4 13.1 /
    21.3 / 35.7 vs 15.6 / 22.7 / 38.4 (numel * I * H = 2^21.6 .. 2^23.6); DeepSeek (I 512,
    H 7168) T=1 80.5 vs 71.1 (2^24.8); Mixtral (I 7168, H 4096) T=1 141.0 vs 129.3.

    The kernel's grid barrier needs all of its programs (``DECODE_PROGRAMS_PER_SM`` per SM of
    the device) resident at once; it is launched cooperatively, so a grid the driver's
    occupancy check rejects is refused at launch and ``_moe_decode`` runs the kernel's two
    phases as two launches instead. Where a process gets fewer SMs than the device reports it
    is off: under an MPS active-thread limit below 100% (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``),
    and wherever ``FLASHOPS_MOE_DECODE_ONE_LAUNCH=0`` (or ``DECODE_ONE_LAUNCH = False``), which
    SM-partitioned green contexts need (whether the driver refuses the grid there is not
    tested); decode layers then take the pair-path GEMMs. Launches on different streams (two
    micro-batches overlapped on two streams, eagerly or inside one capture) use separate barrier
    counters (``_decode_sync``: one slot per stream). The same switch is still needed where two
    CUDA graphs captured on one stream are replayed at the same time on two streams: their
    launches share that capture stream's counters."""
    if not DECODE_ONE_LAUNCH or os.environ.get("FLASHOPS_MOE_DECODE_ONE_LAUNCH", "1") in ("0", "false", "False"):
        return False
    if _mps_limited():
        return False
    if _config.interpreting():
        return True
    return torch.device(device).type == "cuda" and numel * I * H <= DECODE_MAX_ELEMS


def _mps_limited() -> bool:
    """Whether this process is an MPS client held to a share of the SMs."""
    pct = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "").strip()
    try:
        return bool(pct) and float(pct) < 100.0
    except ValueError:
        return True  # unreadable: assume a limit


_DECODE_SYNC: dict = {}  # device index -> int32 [_DECODE_SLOTS * _SLOT_INTS]: every stream's barrier counters
_DECODE_SLOT: dict = {}  # (device index, raw stream handle) -> that stream's int32[3] barrier words (a view)
_DECODE_LOCK = threading.Lock()
_DECODE_SLOTS = 64  # streams per device with counters of their own; past that, two launches
_SLOT_INTS = 32  # one 128-byte line per slot
_DECODE_TILE = 16384  # weight elements per tile load (a program's loads in flight)


def decode_tiles(T: int, k: int, I: int, H: int, tile: int = _DECODE_TILE) -> dict:
    """Tile sizes of ``_moe_decode_kernel``: phase 1 loads [2, BI, BK] (gate and up rows of one
    pair), phase 2 [KP, BH, BJ] (one token's k experts); about ``tile`` elements each, so that
    a program keeps a large load in flight (only phase 1, where H fits one tile, overlaps the next
    tile's load with this one's math)."""
    bk = next((b for b in (2048, 1024, 512, 256) if H % b == 0), min(next_pow2(H), 2048))
    bi = max(1, min(next_pow2(I), tile // (2 * bk)))
    kp = next_pow2(k)
    bj = min(next_pow2(I), 1024)
    bh = max(1, min(next_pow2(H), tile // (kp * bj)))
    return {"BI": bi, "BK": bk, "BH": bh, "BJ": bj, "KP": kp}


def _zeros_int32(n: int, idx: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int32, device=torch.device("cuda", idx))


def _decode_sync(idx: int):
    """The grid barrier's words for the current stream of CUDA device ``idx``: two int32
    counters, 0 between launches, and a generation word (``DECODE_GEN_BARRIER``). Each stream
    gets a slot of its own in one per-device buffer, so decode layers running at once on two
    streams never count on each other's barrier. The buffer is made on first use outside graph
    capture; inside a capture a new stream takes a free slot (no allocation). None (the caller then launches the two phases): capturing before any
    eager call on the device, or every slot taken."""
    stream = torch._C._cuda_getCurrentRawStream(idx)
    view = _DECODE_SLOT.get((idx, stream))
    if view is not None:
        return view
    with _DECODE_LOCK:  # streams may first appear on several threads at once (one per micro-batch)
        view = _DECODE_SLOT.get((idx, stream))
        if view is not None:
            return view
        buf = _DECODE_SYNC.get(idx)
        if buf is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            buf = _DECODE_SYNC[idx] = _zeros_int32(_DECODE_SLOTS * _SLOT_INTS, idx)
        slot = sum(1 for key in list(_DECODE_SLOT) if key[0] == idx)
        if slot >= _DECODE_SLOTS:
            return None
        view = _DECODE_SLOT[(idx, stream)] = buf[slot * _SLOT_INTS:slot * _SLOT_INTS + 3]
        return view


_DECODE_COOP: dict = {}  # (device index, programs) -> whether the cooperative one-launch grid fits


def _moe_decode(x, w1, w2, tw_flat, ids_flat, expert_map, out, on_input, scale, *, programs=None,
                num_warps=4, tile=_DECODE_TILE, one_launch=None, prefetch=True, pipe1=True, up_first=False):
    """fused_moe's pair path in one launch (or, under the interpreter, while capturing before
    the first eager call, and where the grid cannot be resident at once, the same kernel's two
    phases as two launches). ``programs``: grid size; by default ``DECODE_PROGRAMS_PER_SM`` per
    SM. Every program must be resident at once (the grid barrier waits for all of them): two
    4-warp programs fit any SM's 64K registers and the kernel's shared memory is a few KB, and
    the one launch is cooperative, so the driver guarantees residency or refuses the launch.
    A refusal (more programs than the driver's occupancy check lets be resident at once) is
    remembered per (device, grid size) and the two launches run instead; inside a CUDA-graph
    capture the one launch is taken only once an eager launch of that grid has been accepted.
    ``up_first``: w1 is ``[up; gate]`` (FlashInfer's CUTLASS order)."""
    T, H = x.shape
    k = ids_flat.numel() // max(T, 1)
    I = w2.shape[2]
    h = x.new_empty((T * k, I))
    cfg = decode_tiles(T, k, I, H, tile)
    interp = _config.interpreting()
    idx = None if interp else (x.device.index if x.device.index is not None else torch.cuda.current_device())
    sync = None if interp else _decode_sync(idx)
    if programs is None:
        programs = 3 if interp else DECODE_PROGRAMS_PER_SM * _config.sm_count(idx)
    coop = _DECODE_COOP.get((idx, programs))
    if coop is not True and sync is not None and torch.cuda.is_current_stream_capturing():
        coop = False  # not known to fit: a refused launch would invalidate the capture
    if one_launch is None:
        one_launch = sync is not None and coop is not False
    args = (x, w1, w2, h, out, ids_flat, expert_map if expert_map is not None else ids_flat, tw_flat,
            sync if sync is not None else ids_flat,
            T, H, I, _num_ids(expert_map, w1.shape[0]), w1.shape[0],
            x.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), out.stride(0), float(scale))
    # PREFETCH pays where each program's phase 2 is the one tile it prefetched (H100, same call,
    # us with / without: Qwen3 T=1 13.1 / 13.7 (256 tiles, 264 programs); T=2 21.2 / 20.5, T=4
    # 35.6 / 34.4, DeepSeek T=1 79.7 / 74.4 (several tiles a program)
    n_out = T * cdiv(H, cfg["BH"])
    pipe1 = bool(pipe1 and H <= cfg["BK"])
    meta = dict(TOP_K=k, HAS_MAP=expert_map is not None, ON_INPUT=on_input, UP_FIRST=up_first, num_warps=num_warps,
                **cfg)
    if one_launch:
        prefetch1 = bool(prefetch and I <= cfg["BJ"] and n_out <= programs)
        try:
            _moe_decode_kernel[(programs,)](*args, PHASE=0, PREFETCH=prefetch1, PIPE1=pipe1,
                                            GEN_BARRIER=DECODE_GEN_BARRIER, launch_cooperative_grid=not interp,
                                            **meta, **COMPILE_OPTIONS)
            _DECODE_COOP[(idx, programs)] = True
            return out
        except RuntimeError as e:  # the driver refused the cooperative grid (checked at launch)
            if "cooperative" not in str(e):
                raise
            _DECODE_COOP[(idx, programs)] = False
    for phase in (1, 2):
        _moe_decode_kernel[(programs,)](*args, PHASE=phase, PREFETCH=False, PIPE1=pipe1, **meta, **COMPILE_OPTIONS)
    return out


def _route(cfg, topk_ids, block_m, num_local, expert_map, pdl_trigger=False):
    """How the GEMMs find their rows: single pairs (decode) or an alignment into blocks."""
    if cfg["pairs"]:
        return {"pairs": (_flat(topk_ids), expert_map)}
    return {"align": fused_align(topk_ids, block_m, num_local, expert_map, pdl_trigger=pdl_trigger)}


def align_one_program(numel: int, nb: int) -> bool:
    """Whether ``numel`` pairs into ``nb`` buckets (a power of 2) align in one program: its
    per-block expert search is [blocks, nb] wide, so the limit falls as nb grows. H200,
    2026-12-04, CUDA-graph replays, one program vs memset + two launches (us): E=8 128 / 1024 /
    2048 pairs 3.5 / 8.2 / 13.7 vs 6.7 / 11.1 / 11.5; E=128 128 / 512 / 1024 pairs 6.6 / 8.9 /
    11.2 vs 9.5 / 8.9 / 8.1; E=256 128 / 512 pairs 9.5 / 17.2 vs 12.2 / 13.8."""
    return numel * max(nb, 64) <= ALIGN_ONE_PROGRAM_WORK


# Pairs from which fused_align takes the table path (moe_routing.align_launch) instead of its
# atomic two-launch path. Off: on an H100 (2026-12-06, scripts/ab_align.py) the table path
# aligned DeepSeek T=4096 / 16384 in 16.8 / 38.8 us against 21.4 / 63.0, but was slower for E=128
# and no whole layer moved beyond noise (the align hides behind the GEMM chain).
ALIGN_TABLE_MIN = 1 << 62
ALIGN_ONE_PROGRAM_WORK = 1 << 16  # numel * max(buckets, 64): 1024 pairs of 8 experts, 256 of 128, 128 of 256


def fused_align(topk_ids, block_size, num_local, expert_map=None, one_program_max=None, pdl_trigger=False,
                table_min=None):
    """fused_moe's own ``moe_align_block_size``: the same buckets, padding and expert ids
    (local experts in order, then the skip bucket for -1 and remote pairs), but the order of
    pairs inside a bucket is unspecified and slots and blocks past ``num_tokens_post_pad`` are
    not written (the GEMMs never read them). Up to ``one_program_max`` pairs (default: the
    ``align_one_program`` rule) one launch (``pdl_trigger``: it lets a programmatic dependent
    launch at its start), else a memset and two launches with integer atomics; from
    ``table_min`` pairs (default ``ALIGN_TABLE_MIN``) the public op's table path instead
    (``moe_routing.align_launch``: per-chunk histograms, no atomics, every slot written). Static
    sizes: ``sorted [numel + (num_local + 1) * (block_size - 1)]``, ``expert_ids [cdiv(that, block_size)]``."""
    ids = _flat(topk_ids)
    numel = ids.numel()
    dev = ids.device
    cap = numel + (num_local + 1) * (block_size - 1)
    n_blocks = cdiv(cap, block_size)
    nb = max(16, next_pow2(num_local + 1))
    sorted_ids = torch.empty((cap,), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    ntp = torch.empty((1,), dtype=torch.int32, device=dev)
    emap = expert_map if expert_map is not None else ids
    num_ids = _num_ids(expert_map, num_local)
    if numel >= (ALIGN_TABLE_MIN if table_min is None else table_min):
        return moe_routing.align_launch(ids, block_size, num_ids, num_local, expert_map, cap, n_blocks, fused=False)
    if align_one_program(numel, nb) if one_program_max is None else numel <= one_program_max:
        cursors = torch.empty((nb,), dtype=torch.int32, device=dev)
        _align_one_kernel[(1,)](ids, emap, cursors, sorted_ids, expert_ids, ntp, numel, num_ids, num_local, block_size,
                                HAS_MAP=expert_map is not None, CH=max(128, next_pow2(numel)), NB=nb, FB=1024,
                                EB=max(16, 8192 // nb), PDL_TRIGGER=pdl_trigger, num_warps=4, **COMPILE_OPTIONS)
        return sorted_ids, expert_ids, ntp
    counts = torch.zeros((2 * nb,), dtype=torch.int32, device=dev)  # counts, then cursors
    ch = 1024 if nb <= 64 else 256
    common = dict(HAS_MAP=expert_map is not None, CH=ch, NB=nb, num_warps=4)
    _align_count_kernel[(cdiv(cap, ch),)](ids, emap, counts, sorted_ids, numel, num_ids, num_local, cap, **common,
                                              **COMPILE_OPTIONS,
                                          )
    grid = max(1, cdiv(numel, ch))
    _align_scatter_kernel[(grid,)](ids, emap, counts, sorted_ids, expert_ids, ntp, numel, num_ids, num_local,
                                   block_size, n_blocks, EB=max(16, 8192 // nb), **common, **COMPILE_OPTIONS)
    return sorted_ids, expert_ids, ntp


# ----------------------------------------------------------------------------- autotune


def _autotune_enabled() -> bool:
    return os.environ.get("FLASHOPS_MOE_AUTOTUNE", "0") not in ("", "0")


def _c(bn, bk, gm, warps, stages, tma=False):
    return {**_g(bn, bk, gm, warps, stages), **({"tma": True} if tma else {})}


# Tile configs worth timing per BLOCK_M (fused GEMM1, plain GEMM2): Hopper-sized shared memory
# and registers; "tma" loads the weight tiles through tensor descriptors.
_CANDIDATES = {
    "small": ([_c(16, 256, 1, 4, 4), _c(32, 256, 1, 4, 4), _c(64, 128, 1, 4, 4), _c(64, 256, 1, 4, 3),
               _c(128, 128, 1, 4, 3), _c(32, 128, 1, 4, 6, True), _c(64, 128, 8, 4, 4, True),
               _c(128, 64, 1, 4, 6, True)],
              [_c(32, 256, 1, 4, 4), _c(64, 128, 1, 4, 4), _c(64, 256, 1, 4, 3), _c(128, 128, 1, 4, 3),
               _c(64, 128, 8, 4, 4, True), _c(128, 64, 1, 4, 6, True), _c(128, 128, 1, 4, 4, True)]),
    64: ([_c(64, 64, 8, 4, 4), _c(128, 64, 8, 4, 3), _c(64, 128, 8, 4, 3), _c(128, 64, 8, 8, 4, True),
          _c(64, 128, 8, 4, 4, True), _c(64, 64, 8, 4, 6, True)],
         [_c(128, 64, 8, 4, 4), _c(128, 128, 8, 8, 3), _c(256, 64, 8, 8, 3), _c(128, 64, 8, 4, 4, True),
          _c(128, 128, 8, 4, 3, True), _c(256, 64, 8, 8, 4, True)]),
    128: ([_c(64, 64, 8, 4, 4), _c(128, 64, 8, 8, 3), _c(64, 128, 8, 8, 3), _c(128, 64, 8, 8, 4, True),
           _c(128, 64, 8, 8, 3, True), _c(128, 64, 16, 8, 4, True), _c(64, 64, 8, 4, 5, True),
           _c(64, 64, 8, 4, 3, True), _c(64, 128, 8, 4, 3, True)],
          [_c(128, 64, 8, 8, 4), _c(256, 64, 8, 8, 3), _c(128, 128, 8, 8, 3), _c(256, 64, 8, 8, 4, True),
           _c(256, 64, 8, 8, 3, True), _c(128, 128, 8, 8, 3, True), _c(256, 64, 16, 8, 4, True),
           _c(128, 64, 8, 8, 3, True), _c(128, 64, 8, 4, 3, True), _c(64, 64, 8, 4, 3, True)]),
    256: ([_c(64, 64, 8, 8, 4, True), _c(64, 64, 8, 8, 3)],
          [_c(128, 64, 8, 8, 4, True), _c(128, 64, 8, 8, 3)]),
}


def gemm_candidates(block_m: int, fused: bool) -> list[dict]:
    """Tile configs to time; for GEMM2 at BLOCK_M >= 64 also the persistent form of each
    TMA config (it paid at short K, I <= 512, on an H100: RESULTS.md, fourteenth session), and
    at BLOCK_M 128 its tail-split form (it paid at long K, Mixtral T=1024: fifteenth session);
    for GEMM1 at BLOCK_M >= 64 also the one-dot form ("one_dot") of each TMA config, and at
    BLOCK_M 128 its persistent form reading x sorted (3 stages: the flattened loop holds one
    more; it paid at Mixtral's large T, nineteenth session)."""
    cands = [dict(c) for c in _CANDIDATES["small" if block_m <= 32 else block_m][0 if fused else 1]]
    if fused and block_m >= 64:
        one = [{**c, "one_dot": True} for c in cands if c.get("tma") and c["BLOCK_N"] <= 128]
        cands += one
        if block_m >= 128:
            cands += [{**c, "persistent": True, "sort_x": True, "num_stages": min(c["num_stages"], 3)} for c in one]
    if not fused and block_m >= 64:
        tma = [c for c in cands if c.get("tma")]
        cands += [{**c, "persistent": True} for c in tma]
        if block_m >= 128:
            cands += [{**c, "tail_split": 4} for c in tma]
    unique = {json.dumps(c, sort_keys=True): c for c in cands}  # (the persistent forms can coincide)
    return list(unique.values())


def block_m_choices(T: int, k: int, E: int) -> tuple:
    """BLOCK_M values worth timing for a mean of T*k/E pairs per expert."""
    m = T * k / max(E, 1)
    if m <= 48:
        return (16,) if m <= 8 else (16, 32) if m <= 24 else (16, 32, 64)
    return (32, 64, 128) if m <= 160 else (64, 128) if m <= 400 else (64, 128, 256)


def autotune_moe_config(x, w1, w2, topk_weights, topk_ids, expert_map=None, *,
                        options=None, candidates=None, timer=None, cache=True, up_first=False) -> dict:
    """Time GEMM1 (+act) and GEMM2 candidates on these inputs and return the fastest config.

    Host-synchronising; used by the tuning script and, opt-in (``FLASHOPS_MOE_AUTOTUNE=1``),
    on the first call of a shape (never during graph capture). ``options``: (BLOCK_M, pairs)
    pairs to try; ``candidates(block_m, fused)``: tile configs; ``timer(fn) -> ms``;
    ``up_first``: w1 is ``[up; gate]`` (the GEMM1 kernels timed are the ones the call will run;
    the choice is shared with ``[gate; up]`` layers of the same shape).
    """
    T, H = x.shape
    E, I, k = w1.shape[0], w2.shape[2], topk_ids.shape[1]
    key = (E, I, H, k, x.dtype, next_pow2(max(T, 1)))
    if cache and key in _TUNED:
        return _TUNED[key]
    if options is None:
        options = [(16, True)] if _pairs_rule(T, k, E) else []
        options += [(b, False) for b in block_m_choices(T, k, E)]
    timer = timer or (lambda fn: triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))
    numel = T * k
    flat_w = _flat(topk_weights)
    best = None
    for block_m, pairs in options:
        route = _route({"pairs": pairs}, topk_ids, block_m, E, expert_map)
        # the alignment pass is part of the price of a BLOCK_M (pair mode has none)
        t_align = 0.0 if pairs else timer(lambda: _route({"pairs": False}, topk_ids, block_m, E, expert_map))
        h = _intermediate(x, route, numel, I)
        y = x.new_empty((numel, H))
        picks = []
        for fused in (True, False):
            best_g = None
            for g in (candidates or gemm_candidates)(block_m, fused):
                if fused:
                    def run(g=g):
                        _gemm1(x, w1, h, g, route, block_m, k, flat_w, False, up_first=up_first)
                else:
                    def run(g=g):
                        _gemm2(h, w2, y, g, route, block_m, numel, flat_w, False)
                try:
                    run()
                    ms = timer(run)
                except Exception:  # e.g. out of shared memory for this tile: skip it
                    continue
                if best_g is None or ms < best_g[0]:
                    best_g = (ms, g)
            if fused and best_g is not None and not pairs:  # the best GEMM1 tiles, x copied into slot order first
                g = {**best_g[1], "sort_x": True}

                def run(g=g):
                    _gemm1(x, w1, h, g, route, block_m, k, flat_w, False, up_first=up_first)
                try:
                    run()
                    ms = timer(run)
                    if ms < best_g[0]:
                        best_g = (ms, g)
                except Exception:
                    pass
            picks.append(best_g)
        if None in picks:
            continue
        total = t_align + picks[0][0] + picks[1][0]
        if best is None or total < best[0]:
            best = (total, {"block_m": block_m, "pairs": pairs, "gemm1": picks[0][1], "gemm2": picks[1][1],
                            "ms": [round(t_align, 5), round(picks[0][0], 5), round(picks[1][0], 5)]})
    if best is None:
        raise RuntimeError("no MoE launch config could run")
    if cache:
        _TUNED[key] = best[1]
    return best[1]


# -------------------------------------------------------------------------- registration

moe_grouped_gemm = register_op(
    "moe_grouped_gemm(Tensor a, Tensor w, Tensor sorted_token_ids, Tensor expert_ids, "
    "Tensor num_tokens_post_pad, int block_size, int top_k, Tensor? topk_weights=None, "
    "bool mul_routed_weight=False) -> Tensor",
    cuda=moe_grouped_gemm_cuda, reference=ref.moe_grouped_gemm_cpu, fake=meta.moe_grouped_gemm_fake,
)
silu_and_mul = register_op(
    "silu_and_mul(Tensor input) -> Tensor",
    cuda=silu_and_mul_cuda, reference=ref.silu_and_mul_cpu, fake=meta.silu_and_mul_fake,
)


def _writable_out(input, out, *args, **kwargs):
    """``check`` of the activation ops' ``_out`` forms: reject an ``out`` whose elements share
    memory (checked inside the op, on real tensors, so compiled graphs check it too without
    tracing the query)."""
    check_writable(out, "out")


silu_and_mul_out = register_op(
    "silu_and_mul_out(Tensor input, Tensor out) -> ()",
    cuda=silu_and_mul_out_cuda, reference=ref.silu_and_mul_out_cpu, mutates=["out"], check=_writable_out,
)
gelu_and_mul = register_op(
    "gelu_and_mul(Tensor input, bool approximate_tanh=False) -> Tensor",
    cuda=gelu_and_mul_cuda, reference=ref.gelu_and_mul_cpu, fake=meta.gelu_and_mul_fake,
)
gelu_and_mul_out = register_op(
    "gelu_and_mul_out(Tensor input, Tensor out, bool approximate_tanh=False) -> ()",
    cuda=gelu_and_mul_out_cuda, reference=ref.gelu_and_mul_out_cpu, mutates=["out"], check=_writable_out,
)
moe_sum = register_op(
    "moe_sum(Tensor input, float routed_scaling_factor=1.0) -> Tensor",
    cuda=moe_sum_cuda, reference=ref.moe_sum_cpu, fake=meta.moe_sum_fake,
)
fused_moe = register_op(
    "fused_moe(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
    "str activation=\"silu\", bool apply_router_weight_on_input=False, float routed_scaling_factor=1.0, "
    "Tensor? expert_map=None, int global_num_experts=-1, bool w1_up_first=False) -> Tensor",
    cuda=fused_moe_cuda, reference=ref.fused_moe_cpu, fake=meta.fused_moe_fake,
)
