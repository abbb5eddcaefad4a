"""Plain-PyTorch attention-state merging: the test oracle and the CPU backend.

A state is ``(o, s)``: ``o`` the softmax-weighted value sum over a key set, ``s`` its LSE
(base 2, or natural log with ``lse_ln``). Merging states i (spec attention.md §0.5):
``m = max s_i``, ``w_i = 2^(s_i - m)``, ``o = sum w_i o_i / sum w_i``,
``s = m + log2(sum w_i)``; all states empty (``-inf``) -> ``o = 0, s = -inf``; an empty state
contributes nothing (whatever its ``o``); NaN propagates.

``ref_*``: the oracle, fp64 by default, returns ``(o, s)`` in the compute dtype.
``*_cpu``: the CPU implementations of the ``flashops`` ops (fp32 math, outputs with the ops'
contract: fresh contiguous ``v`` in the values' dtype, ``s`` fp32; the in-place one writes
its arguments). This module does not import the Triton code it is the oracle for.
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)
NEG_INF = float("-inf")


def ref_merge_stacked(v, s, *, lse_ln=False, dtype=torch.float64):
    """Merge the K states stacked on the state axis: ``v [..., K, H, D]``, ``s [..., K, H]``
    -> ``(o [..., H, D], s [..., H])`` in ``dtype``; ``K == 0`` gives ``0 / -inf``."""
    v, s = v.to(dtype), s.to(dtype)
    if lse_ln:
        s = s * LOG2E
    if s.shape[-2] == 0:
        o = v.new_zeros(v.shape[:-3] + v.shape[-2:])
        return o, s.new_full(s.shape[:-2] + s.shape[-1:], NEG_INF)
    m = s.amax(dim=-2)  # NaN propagates
    shift = torch.where(m == NEG_INF, 0.0, m)  # every state empty: weights 2^-inf = 0
    w = torch.exp2(s - shift.unsqueeze(-2))
    d = w.sum(dim=-2)
    contrib = torch.where((s == NEG_INF).unsqueeze(-1), 0.0, w.unsqueeze(-1) * v)
    o = contrib.sum(dim=-3) / torch.where(d == 0, 1.0, d).unsqueeze(-1)
    lse = m + torch.log2(d)
    return o, (lse / LOG2E if lse_ln else lse)


def ref_merge_state(v_a, s_a, v_b, s_b, *, lse_ln=False, dtype=torch.float64):
    """Two states ``[N, H, D]`` / ``[N, H]`` -> merged ``(o, s)`` in ``dtype``."""
    return ref_merge_stacked(torch.stack([v_a.to(dtype), v_b.to(dtype)], dim=1),
                             torch.stack([s_a.to(dtype), s_b.to(dtype)], dim=1),
                             lse_ln=lse_ln, dtype=dtype)


def ref_variable_length_merge_states(v, s, indptr, *, lse_ln=False, dtype=torch.float64):
    """Row i of the result merges rows ``indptr[i]:indptr[i+1]`` of ``v [M, H, D]``, ``s [M, H]``."""
    bounds = [int(x) for x in indptr]
    outs = [ref_merge_stacked(v[lo:hi].unsqueeze(0), s[lo:hi].unsqueeze(0), lse_ln=lse_ln, dtype=dtype)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    H, D = v.shape[-2], v.shape[-1]
    if not outs:
        return torch.zeros(0, H, D, dtype=dtype), torch.zeros(0, H, dtype=dtype)
    return torch.cat([o for o, _ in outs]), torch.cat([x for _, x in outs])


# --------------------------------------------------------------- CPU backend (op contract)
def merge_state_cpu(v_a, s_a, v_b, s_b, lse_ln=False):
    o, s = ref_merge_state(v_a, s_a, v_b, s_b, lse_ln=lse_ln, dtype=torch.float32)
    return o.to(v_a.dtype).contiguous(), s.contiguous()


def merge_state_in_place_cpu(v, s, v_other, s_other, mask=None, lse_ln=False):
    o, s_new = ref_merge_state(v, s, v_other, s_other, lse_ln=lse_ln, dtype=torch.float32)
    o = o.to(v.dtype)
    if mask is not None:
        keep = mask.to(torch.bool)
        o = torch.where(keep[:, None, None], o, v)
        s_new = torch.where(keep[:, None], s_new, s)
    v.copy_(o)
    s.copy_(s_new)


def merge_states_cpu(v, s, lse_ln=False):
    o, lse = ref_merge_stacked(v, s, lse_ln=lse_ln, dtype=torch.float32)
    return o.to(v.dtype).contiguous(), lse.contiguous()


def variable_length_merge_states_cpu(v, s, indptr, lse_ln=False):
    """Vectorized over segments (scatter/index_add) rather than the oracle's loop."""
    M, H, D = v.shape
    N = indptr.shape[0] - 1
    # Same clamping as the kernel: segment i is [lo_i, hi_i) with 0 <= lo_i <= hi_i <= M, so
    # invalid indptr values (unchecked mode) never index outside v.
    ip = indptr.to(torch.int64)
    lo = ip[:-1].clamp(0, M)
    hi = torch.maximum(ip[1:].clamp(0, M), lo)
    counts = hi - lo
    seg = torch.repeat_interleave(torch.arange(N), counts)
    starts = torch.cumsum(counts, 0) - counts  # position of each segment's first row in `seg`
    rows = lo[seg] + torch.arange(seg.shape[0]) - starts[seg]
    sv = s[rows].float() * (LOG2E if lse_ln else 1.0)
    m = torch.full((N, H), NEG_INF).scatter_reduce(0, seg[:, None].expand(-1, H), sv, "amax")
    shift = torch.where(m == NEG_INF, 0.0, m)
    w = torch.exp2(sv - shift[seg])
    d = torch.zeros(N, H).index_add_(0, seg, w)
    contrib = torch.where((sv == NEG_INF)[..., None], 0.0, w[..., None] * v[rows].float())
    o = torch.zeros(N, H, D).index_add_(0, seg, contrib) / torch.where(d == 0, 1.0, d)[..., None]
    lse = m + torch.log2(d)
    return o.to(v.dtype), (lse / LOG2E if lse_ln else lse)
