# MoE routing and alignment (spec moe.md §1, §2, §6): Triton kernels and their registration.
#
# Routing, per token t (router logits x[t, :E], math in fp32):
#   topk_softmax : p = softmax(x);          ids = top-k of p;          w = p[ids]  (/ sum w)
#   topk_sigmoid :                          ids = top-k of x;          w = sigmoid(x[ids])
#   grouped_topk : s = sigmoid(x) | softmax(x);  sel = s (+ bias)
#                  group g = experts [g*G, (g+1)*G), score = top-2 sum of sel (bias) | max sel
#                  keep topk_group groups;  ids = top-k of sel in kept groups
#                  w = s[ids] (/ (sum w + 1e-20)) * routed_scaling_factor
#   outputs w [T, k] fp32, ids [T, k] int32, descending selection score, ties to the lower id.
#   One program per BLOCK_T tokens holds all E logits in registers; top-k is k rounds of
#   argmax-and-mask.
#
# Alignment (moe_align_block_size), numel = T*k expanded pairs i = t*k + j:
#   bucket(i) = ids.flat[i] (through expert_map), or S = num_experts for -1 / remote pairs
#   counts[b] -> padded[b] = roundup(counts[b], B) -> start = exclusive cumsum(padded)
#   sorted_token_ids[start[b] + r] = r-th pair of bucket b (ascending i), pads = numel
#   expert_ids[blk] = bucket of blk (-1 for S and past num_tokens_post_pad / B)
#   num_tokens_post_pad = sum(padded)   (a 1-element device tensor: no host sync)
# Pair i of bucket b lands at start[b] + (pairs of b before i): pairs are walked in order in
# steps of SUB, a running per-bucket cursor (histogram of each step) plus the rank among the
# step's equal buckets (a SUB x SUB mask) gives the slot. Deterministic, ascending within a
# bucket, no atomics on the pair path.
# Small inputs: one program does everything (one launch). Larger: a count launch (histogram
# per chunk of CH pairs + output fill) and a scatter launch (one program per chunk, which sums
# the earlier chunks' histograms for its cursors, plus one program for expert_ids and
# num_tokens_post_pad).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import COMPILE_OPTIONS, cdiv, next_pow2
from .._registry import register_op
from ..meta import moe_routing as _meta
from ..reference import moe_routing as _ref

_I32_MAX = tl.constexpr(2147483647)


# --------------------------------------------------------------------------- launch heuristics

def _routing_config(lanes: int) -> dict:
    """Tokens per program and warps for a routing kernel holding ``lanes`` (power of 2) scores
    per token. Each top-k round is a chain of row reductions, so a wide row's latency is that
    chain: from 128 lanes a program takes one token on one warp (reductions stay in the warp,
    shuffles only; one more warp per 1024 lanes) and a big batch gets its width from more
    programs. Narrow rows pack many tokens into 4-8 warps. Measured on an H200 (2026-12-04,
    ``benchmarks/tune_routing.py``, CUDA-graph replays; before -> after): DeepSeek-V3 grouped
    E=256 k=8 T=1 36.5 -> 4.8 us, T=4097 37.5 -> 11.0, T=16384 147.6 -> 32.9; Kimi-K2 E=384
    T=1 16.4 -> 5.7; DeepSeek-V2 E=160 T=1 11.7 -> 4.7; Qwen3 topk_softmax E=128 k=8 T=1 10.8
    -> 3.9, T=16384 18.7 -> 16.9. Mixtral's 8 lanes run best packed (T=4097: 3.4 us against 5.2
    at one token per warp)."""
    if lanes >= 128:
        return dict(BLOCK_T=1, num_warps=max(1, min(8, lanes // 1024)))
    return packed_routing_config(lanes)


def packed_routing_config(lanes: int) -> dict:
    """Up to 64 tokens per program, 4096 scores on 4 warps (8 past that): the narrow-row launch
    (and, before 2026-12-04, the launch for every width)."""
    block_t = max(1, min(64, 4096 // lanes))
    return dict(BLOCK_T=block_t, num_warps=4 if lanes * block_t <= 4096 else 8)


def _align_config(numel: int) -> dict:
    """Path and chunk size for ``moe_align_block_size``. Decode-sized inputs: one fused program
    (one launch). Beyond: the two-launch path with one scatter program per chunk of CH pairs,
    CH growing so that there are at most ~128 chunks (each scatter program sums all chunks'
    histograms, so their count must stay small); CH takes few values (few compiled variants)."""
    if numel <= _FUSED_MAX:
        return dict(CH=1024, fused=True, num_warps=4)
    ch = min(4096, max(256, next_pow2(cdiv(numel, 128))))
    return dict(CH=ch, fused=False, num_warps=4)


# Pairs (T * k) up to which one program does the whole alignment. H100, 2026-11-25: the fused
# program took 8-12 us at 256 pairs but 17-24 us at 512 and 28-31 us at 1024, while the
# two-launch path took 10-14 us from 1024 to 4096 pairs (benchmarks/RESULTS.md, moe_routing).
_FUSED_MAX = 256
_FILL = 4096  # slots written per fill step / per fill program
_HIST_ROWS = 8  # per-chunk histograms summed per step in the scatter launch
_SUB = 128  # pairs ranked per step (a SUB x SUB equality mask)


# --------------------------------------------------------------------------- routing kernels

@triton.jit
def _select_topk(sel, val, avail, eid, K: tl.constexpr, KP: tl.constexpr):
    """K rounds of argmax over ``avail`` lanes of ``sel`` [BT, L]: column j of the results is the
    j-th largest (ties to the lower expert id ``eid``), with ``val`` at that lane. Ids are -1 when
    nothing is left (NaN scores)."""
    kcol = tl.arange(0, KP)[None, :]
    out_v = tl.zeros([sel.shape[0], KP], tl.float32)
    out_i = tl.full([sel.shape[0], KP], -1, tl.int32)
    for j in tl.static_range(K):
        cand = tl.where(avail, sel, float("-inf"))
        best = tl.max(cand, 1)
        idx = tl.min(tl.where(avail & (cand == best[:, None]), eid, _I32_MAX), 1)
        idx = tl.where(idx == _I32_MAX, -1, idx)
        pick = eid == idx[:, None]
        v = tl.sum(tl.where(pick, val, 0.0), 1)
        avail = avail & ~pick
        out_v = tl.where(kcol == j, v[:, None], out_v)
        out_i = tl.where(kcol == j, idx[:, None], out_i)
    return out_v, out_i


@triton.jit
def _store_topk(w_ptr, ids_ptr, rows, T, w, ids, K: tl.constexpr, KP: tl.constexpr):
    kcol = tl.arange(0, KP)[None, :]
    m = (rows[:, None] < T) & (kcol < K)
    off = rows[:, None].to(tl.int64) * K + kcol
    tl.store(w_ptr + off, w, mask=m)
    tl.store(ids_ptr + off, ids, mask=m)


@triton.jit
def _topk_flat_kernel(x_ptr, w_ptr, ids_ptr, T, E, stride_x,
                      K: tl.constexpr, KP: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """topk_softmax (SOFTMAX) and topk_sigmoid (not SOFTMAX): plain top-k over all experts."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)[None, :]
    lane_ok = cols < E
    m = (rows[:, None] < T) & lane_ok
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols, mask=m, other=float("-inf"))
    x = x.to(tl.float32)
    avail = m
    if SOFTMAX:
        mx = tl.max(x, 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        p = tl.where(m, tl.exp(x - mx[:, None]), 0.0)
        p = p / tl.maximum(tl.sum(p, 1), 1e-30)[:, None]
        w, ids = _select_topk(p, p, avail, cols, K, KP)
        if RENORM:
            w = w / tl.maximum(tl.sum(w, 1), 1e-30)[:, None]  # guard only bites on masked rows
    else:
        w, ids = _select_topk(x, tl.sigmoid(x), avail, cols, K, KP)
    _store_topk(w_ptr, ids_ptr, rows, T, w, ids, K, KP)


@triton.jit
def _grouped_topk_kernel(x_ptr, bias_ptr, w_ptr, ids_ptr, T, G, n_group, topk_group, stride_x, rsf,
                         K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
                         BLOCK_T: tl.constexpr, NGP: tl.constexpr, GP: tl.constexpr):
    """grouped_topk: scores laid out [token, group, expert-in-group] (padded to NGP x GP)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, NGP)
    jj = tl.arange(0, GP)
    eid = g[None, :, None] * G + jj[None, None, :]  # [1, NGP, GP] global expert id
    lane_ok = (g[None, :, None] < n_group) & (jj[None, None, :] < G)
    m = (rows[:, None, None] < T) & lane_ok
    x = tl.load(x_ptr + rows[:, None, None].to(tl.int64) * stride_x + eid, mask=m, other=float("-inf"))
    x = x.to(tl.float32)
    if SOFTMAX:
        mx = tl.max(tl.max(x, 2), 1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        p = tl.where(m, tl.exp(x - mx[:, None, None]), 0.0)
        s = p / tl.maximum(tl.sum(tl.sum(p, 2), 1), 1e-30)[:, None, None]
    else:
        s = tl.sigmoid(x)
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + eid, mask=lane_ok, other=0.0).to(tl.float32)
    sel = tl.where(lane_ok, sel, float("-inf"))

    # Group scores: the best (max) or the two best (sum) selection scores of each group.
    top1 = tl.max(sel, 2)
    if HAS_BIAS:
        j1 = tl.min(tl.where(sel == top1[:, :, None], jj[None, None, :], GP), 2)
        top2 = tl.max(tl.where(jj[None, None, :] == j1[:, :, None], float("-inf"), sel), 2)
        gscore = top1 + top2
    else:
        gscore = top1
    # Keep the topk_group best groups (ties to the lower group).
    gavail = tl.broadcast_to(g[None, :] < n_group, [BLOCK_T, NGP])
    keep = tl.zeros([BLOCK_T, NGP], tl.int1)
    for _ in range(topk_group):
        cand = tl.where(gavail, gscore, float("-inf"))
        best = tl.max(cand, 1)
        gi = tl.min(tl.where(gavail & (cand == best[:, None]), g[None, :], NGP), 1)
        hit = g[None, :] == gi[:, None]
        keep = keep | hit
        gavail = gavail & ~hit

    # Top-k experts of the kept groups, on the flattened [token, group * expert] view.
    L: tl.constexpr = NGP * GP
    avail = tl.reshape(tl.broadcast_to(lane_ok & keep[:, :, None], [BLOCK_T, NGP, GP]), [BLOCK_T, L])
    eid2 = tl.reshape(tl.broadcast_to(eid, [BLOCK_T, NGP, GP]), [BLOCK_T, L])
    w, ids = _select_topk(tl.reshape(sel, [BLOCK_T, L]), tl.reshape(s, [BLOCK_T, L]), avail, eid2, K, KP)
    if RENORM:
        w = w / (tl.sum(w, 1)[:, None] + 1e-20)
    w = w * rsf
    _store_topk(w_ptr, ids_ptr, rows, T, w, ids, K, KP)


# --------------------------------------------------------------------------- align kernels

@triton.jit
def _bucket_of(ids_ptr, map_ptr, offs, mask, num_ids, num_experts, HAS_MAP: tl.constexpr):
    """Bucket of each pair: its (local) expert, or num_experts (the skip bucket) for id -1,
    remote experts, any id outside [0, num_ids) and any mapped id outside [0, num_experts)
    (memory safety for unchecked input). ``num_ids``: ids the map covers (num_experts without one)."""
    e = tl.load(ids_ptr + offs, mask=mask, other=-1).to(tl.int32)
    ok = mask & (e >= 0) & (e < num_ids)
    if HAS_MAP:
        e = tl.load(map_ptr + e, mask=ok, other=-1).to(tl.int32)
        ok = ok & (e >= 0) & (e < num_experts)
    return tl.where(ok, e, num_experts)


@triton.jit
def _chunk_hist(ids_ptr, map_ptr, c, numel, num_ids, num_experts,
                HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr):
    offs = c * CH + tl.arange(0, CH)
    m = offs < numel
    return tl.histogram(_bucket_of(ids_ptr, map_ptr, offs, m, num_ids, num_experts, HAS_MAP), NB, mask=m)


@triton.jit
def _bucket_layout(counts, block_size):
    """First slot of each bucket and its padded size (counts rounded up to whole blocks)."""
    padded = (counts + block_size - 1) // block_size * block_size
    return tl.cumsum(padded, 0) - padded, padded


@triton.jit
def _scatter_range(ids_ptr, map_ptr, sorted_ptr, lo, hi, num_ids, num_experts, base,
                   HAS_MAP: tl.constexpr, NB: tl.constexpr, SUB: tl.constexpr):
    """Write pairs [lo, hi) in order; ``base[b]`` is the slot of the range's first pair of bucket b.
    Within a step of SUB pairs, a pair's rank in its bucket counts the equal buckets before it."""
    lane = tl.arange(0, SUB)
    earlier = lane[None, :] < lane[:, None]
    for s in range(lo, hi, SUB):
        offs = s + lane
        m = offs < hi
        b = _bucket_of(ids_ptr, map_ptr, offs, m, num_ids, num_experts, HAS_MAP)
        rank = tl.sum(((b[None, :] == b[:, None]) & earlier).to(tl.int32), 1)
        tl.store(sorted_ptr + tl.gather(base, b, 0) + rank, offs, mask=m)
        base += tl.histogram(b, NB, mask=m)


@triton.jit
def _write_expert_ids(eid_ptr, ntp_ptr, start, padded, num_experts, block_size, n_blocks,
                      NB: tl.constexpr, EB: tl.constexpr):
    """expert_ids and num_tokens_post_pad. expert_ids arrives zero-filled: each non-empty bucket b
    adds +b at its first block and -b after its last, so a running sum over blocks is the bucket
    of each block; the skip bucket and blocks past num_tokens_post_pad become -1."""
    ntp = tl.sum(padded, 0)
    tl.store(ntp_ptr, ntp)
    b = tl.arange(0, NB)
    used = padded > 0
    first = start // block_size
    after = (start + padded) // block_size
    tl.atomic_add(eid_ptr + first, b, mask=used)
    tl.atomic_add(eid_ptr + after, -b, mask=used & (after < n_blocks))
    tl.debug_barrier()  # the marks are read back by other threads of this program
    n_used = ntp // block_size
    carry = tl.full([], 0, tl.int32)
    for j in range(0, n_blocks, EB):
        blk = j + tl.arange(0, EB)
        mk = blk < n_blocks
        v = tl.load(eid_ptr + blk, mask=mk, other=0)
        run = tl.cumsum(v, 0) + carry
        carry += tl.sum(v, 0)
        tl.store(eid_ptr + blk, tl.where((blk < n_used) & (run < num_experts), run, -1), mask=mk)


@triton.jit
def _fill_range(ptr, lo, hi, value, FB: tl.constexpr):
    for j in range(lo, hi, FB):
        offs = j + tl.arange(0, FB)
        tl.store(ptr + offs, tl.zeros([FB], tl.int32) + value, mask=offs < hi)


@triton.jit
def _align_fused_kernel(ids_ptr, map_ptr, sorted_ptr, eid_ptr, ntp_ptr,
                        numel, num_ids, num_experts, block_size, cap, n_blocks,
                        HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr,
                        SUB: tl.constexpr, FB: tl.constexpr):
    """The whole alignment in one program (decode-sized inputs)."""
    _fill_range(sorted_ptr, 0, cap, numel, FB)
    _fill_range(eid_ptr, 0, n_blocks, 0, FB)
    counts = tl.zeros([NB], tl.int32)
    for c in range(0, (numel + CH - 1) // CH):
        counts += _chunk_hist(ids_ptr, map_ptr, c, numel, num_ids, num_experts, HAS_MAP, CH, NB)
    tl.debug_barrier()  # fills visible to every thread of the program
    start, padded = _bucket_layout(counts, block_size)
    _write_expert_ids(eid_ptr, ntp_ptr, start, padded, num_experts, block_size, n_blocks, NB, FB)
    _scatter_range(ids_ptr, map_ptr, sorted_ptr, 0, numel, num_ids, num_experts, start, HAS_MAP, NB, SUB)


@triton.jit
def _align_count_kernel(ids_ptr, map_ptr, sorted_ptr, eid_ptr, hist_ptr,
                        numel, num_ids, num_experts, cap, n_blocks,
                        HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr, FB: tl.constexpr):
    """Launch 1: histogram of chunk pid; fill slice pid of the outputs (pads, zeros)."""
    pid = tl.program_id(0)
    if pid * CH < numel:
        h = _chunk_hist(ids_ptr, map_ptr, pid, numel, num_ids, num_experts, HAS_MAP, CH, NB)
        tl.store(hist_ptr + pid * NB + tl.arange(0, NB), h)
    offs = pid * FB + tl.arange(0, FB)
    tl.store(sorted_ptr + offs, tl.zeros([FB], tl.int32) + numel, mask=offs < cap)
    tl.store(eid_ptr + offs, tl.zeros([FB], tl.int32), mask=offs < n_blocks)


@triton.jit
def _align_scatter_kernel(ids_ptr, map_ptr, sorted_ptr, eid_ptr, ntp_ptr, hist_ptr,
                          numel, num_ids, num_experts, block_size, n_blocks, n_chunks,
                          HAS_MAP: tl.constexpr, CH: tl.constexpr, NB: tl.constexpr,
                          SUB: tl.constexpr, HB: tl.constexpr, EB: tl.constexpr):
    """Launch 2: programs < n_chunks scatter their chunk; the last one writes expert_ids."""
    pid = tl.program_id(0)
    bins = tl.arange(0, NB)
    counts = tl.zeros([NB], tl.int32)
    seen = tl.zeros([NB], tl.int32)  # pairs per bucket in chunks before pid
    for c0 in range(0, n_chunks, HB):
        rows = c0 + tl.arange(0, HB)
        h = tl.load(hist_ptr + rows[:, None] * NB + bins[None, :], mask=rows[:, None] < n_chunks, other=0)
        counts += tl.sum(h, 0)
        seen += tl.sum(tl.where(rows[:, None] < pid, h, 0), 0)
    start, padded = _bucket_layout(counts, block_size)
    if pid < n_chunks:
        hi = tl.minimum(pid * CH + CH, numel)
        _scatter_range(ids_ptr, map_ptr, sorted_ptr, pid * CH, hi, num_ids, num_experts, start + seen, HAS_MAP, NB,
                       SUB)
    else:
        _write_expert_ids(eid_ptr, ntp_ptr, start, padded, num_experts, block_size, n_blocks, NB, EB)


# --------------------------------------------------------------------------- launchers

def _routing_out(gating_output: torch.Tensor, topk: int):
    T = gating_output.shape[0]
    w = torch.empty((T, topk), dtype=torch.float32, device=gating_output.device)
    ids = torch.empty((T, topk), dtype=torch.int32, device=gating_output.device)
    return w, ids


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _topk_flat_launch(gating_output, topk, softmax, renormalize):
    w, ids = _routing_out(gating_output, topk)
    T, E = gating_output.shape
    if T == 0:
        return w, ids
    x = _last_contiguous(gating_output)
    block_e = next_pow2(E)
    cfg = _routing_config(block_e)
    grid = (cdiv(T, cfg["BLOCK_T"]),)
    _topk_flat_kernel[grid](x, w, ids, T, E, x.stride(0), K=topk, KP=next_pow2(topk),
                            SOFTMAX=softmax, RENORM=renormalize, BLOCK_T=cfg["BLOCK_T"], BLOCK_E=block_e,
                            num_warps=cfg["num_warps"], **COMPILE_OPTIONS)
    return w, ids


def topk_softmax_launch(gating_output, topk, renormalize):
    return _topk_flat_launch(gating_output, topk, True, renormalize)


def topk_sigmoid_launch(gating_output, topk):
    return _topk_flat_launch(gating_output, topk, False, False)


def grouped_topk_launch(gating_output, topk, n_group, topk_group, bias, scoring_func, renormalize,
                        routed_scaling_factor):
    w, ids = _routing_out(gating_output, topk)
    T, E = gating_output.shape
    if T == 0:
        return w, ids
    x = _last_contiguous(gating_output)
    G = E // n_group
    ngp, gp = next_pow2(n_group), next_pow2(G)
    cfg = _routing_config(ngp * gp)
    grid = (cdiv(T, cfg["BLOCK_T"]),)
    b = bias.contiguous() if bias is not None else x
    _grouped_topk_kernel[grid](x, b, w, ids, T, G, n_group, topk_group, x.stride(0), float(routed_scaling_factor),
                               K=topk, KP=next_pow2(topk), HAS_BIAS=bias is not None,
                               SOFTMAX=scoring_func == "softmax", RENORM=renormalize,
                               BLOCK_T=cfg["BLOCK_T"], NGP=ngp, GP=gp, num_warps=cfg["num_warps"], **COMPILE_OPTIONS)
    return w, ids


def moe_align_block_size_launch(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids):
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    cap, n_blocks = _meta.align_sizes(ids.numel(), num_experts, block_size, pad_sorted_ids)
    emap = expert_map.contiguous() if expert_map is not None else None
    return align_launch(ids, block_size, num_experts, num_experts, emap, cap, n_blocks)


def align_launch(ids, block_size, num_ids, num_experts, expert_map, cap, n_blocks, fused=None):
    """The alignment into ``sorted_ids [cap]`` (every slot written: pairs, then the pad value
    ``numel``), ``expert_ids [n_blocks]`` (-1 past the used blocks and for the skip bucket) and
    the padded total, from contiguous int ids. ``num_ids``: ids ``expert_map`` covers (ids
    outside it, like -1, go to the skip bucket); ``num_experts``: local experts (buckets).
    ``fused``: one program (default: ``_align_config``'s rule by size) or the two-launch table
    path (per-chunk histograms, no atomics)."""
    numel = ids.numel()
    dev = ids.device
    sorted_ids = torch.empty((cap,), dtype=torch.int32, device=dev)
    expert_ids = torch.empty((n_blocks,), dtype=torch.int32, device=dev)
    ntp = torch.empty((1,), dtype=torch.int32, device=dev)
    cfg = _align_config(numel)
    emap = expert_map if expert_map is not None else ids
    common = dict(HAS_MAP=expert_map is not None, CH=cfg["CH"], NB=max(32, next_pow2(num_experts + 1)),
                  num_warps=cfg["num_warps"])
    if (cfg["fused"] if fused is None else fused) or numel == 0:
        common["CH"] = 1024
        _align_fused_kernel[(1,)](ids, emap, sorted_ids, expert_ids, ntp, numel, num_ids, num_experts, block_size,
                                  cap, n_blocks, SUB=_SUB, FB=_FILL, **common, **COMPILE_OPTIONS)
        return sorted_ids, expert_ids, ntp
    if cfg["fused"]:  # a small input sent down the table path (tests): the smallest chunk
        common["CH"] = 256
    n_chunks = cdiv(numel, common["CH"])
    hist = torch.empty((n_chunks, common["NB"]), dtype=torch.int32, device=dev)
    grid1 = (max(n_chunks, cdiv(cap, _FILL)),)
    _align_count_kernel[grid1](ids, emap, sorted_ids, expert_ids, hist, numel, num_ids, num_experts, cap, n_blocks,
                               FB=_FILL, **common, **COMPILE_OPTIONS)
    _align_scatter_kernel[(n_chunks + 1,)](ids, emap, sorted_ids, expert_ids, ntp, hist, numel, num_ids,
                                           num_experts, block_size, n_blocks, n_chunks, SUB=_SUB, HB=_HIST_ROWS,
                                           EB=1024, **common, **COMPILE_OPTIONS)
    return sorted_ids, expert_ids, ntp


# --------------------------------------------------------------------------- registration

topk_softmax_op = register_op(
    "topk_softmax(Tensor gating_output, int topk, bool renormalize) -> (Tensor, Tensor)",
    cuda=topk_softmax_launch, reference=_ref.topk_softmax_cpu, fake=_meta.topk_softmax_fake,
    check=_meta.check_topk_args,
)
grouped_topk_op = register_op(
    "grouped_topk(Tensor gating_output, int topk, int n_group, int topk_group, Tensor? bias, "
    "str scoring_func, bool renormalize, float routed_scaling_factor) -> (Tensor, Tensor)",
    cuda=grouped_topk_launch, reference=_ref.grouped_topk_cpu, fake=_meta.grouped_topk_fake,
    check=_meta.check_grouped_topk_args,
)
topk_sigmoid_op = register_op(
    "topk_sigmoid(Tensor gating_output, int topk) -> (Tensor, Tensor)",
    cuda=topk_sigmoid_launch, reference=_ref.topk_sigmoid_cpu, fake=_meta.topk_sigmoid_fake,
    check=_meta.check_topk_args,
)
moe_align_block_size_op = register_op(
    "moe_align_block_size(Tensor topk_ids, int block_size, int num_experts, Tensor? expert_map, "
    "bool pad_sorted_ids) -> (Tensor, Tensor, Tensor)",
    cuda=moe_align_block_size_launch, reference=_ref.moe_align_block_size_cpu,
    fake=_meta.moe_align_block_size_fake,
    check=_meta.check_align_args,
)
