"""Plain-PyTorch side of the ``moe`` family (spec/moe.md §3-§5, §8).

Two kinds of code live here, and neither imports the kernels under test:

* ``ref_*``: the test oracle, straight from the spec's reference section, computed in fp32
  (``ref_fused_moe_dense`` needs no alignment at all; ``ref_fused_moe_pipeline`` replays the
  five-step pipeline with the align oracle of the ``moe_routing`` family).
* ``*_cpu``: the CPU backend of each op, with exactly the op's signature and output contract
  (dtype of the input, fresh contiguous outputs, in-place writes for ``_out``). The CPU
  ``fused_moe`` rounds its intermediates at the same points as the GPU pipeline (GEMM1 output,
  activation, GEMM2 output) and sums the k expert outputs of a token in fixed order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------- oracle


def ref_moe_grouped_gemm(a, w, sorted_ids, expert_ids, ntp, B, top_k, topk_w=None, mul=False):
    """Block by block, as spec §3: rows of a skip block (expert -1) become zeros; rows that no
    block lists stay NaN, so a comparison shows them."""
    numel = a.shape[0] * top_k
    c = torch.full((numel, w.shape[1]), float("nan"), dtype=a.dtype)
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    a, w = a.cpu(), w.cpu()
    for blk in range(int(ntp.reshape(-1)[0]) // B):
        rows = sorted_ids[blk * B:(blk + 1) * B].long()
        rows = rows[rows < numel]
        e = int(expert_ids[blk])
        if e < 0:
            c[rows] = 0
            continue
        acc = a[rows // top_k].float() @ w[e].float().T
        if mul:
            acc = acc * topk_w.reshape(-1).cpu()[rows].float()[:, None]
        c[rows] = acc.to(a.dtype)
    return c


def ref_silu_and_mul(h):
    d = h.shape[-1] // 2
    return (F.silu(h[..., :d].float()) * h[..., d:].float()).to(h.dtype)


def ref_gelu_and_mul(h, approximate_tanh=False):
    d = h.shape[-1] // 2
    gelu = F.gelu(h[..., :d].float(), approximate="tanh" if approximate_tanh else "none")
    return (gelu * h[..., d:].float()).to(h.dtype)


def ref_moe_sum(x, rsf=1.0):
    return (x.float().sum(1) * rsf).to(x.dtype)


def local_ids(ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """int64 ``ids`` through ``expert_map`` (global -> local id, -1: not on this rank); ids of
    -1 or outside the map (an empty map included) give -1, as the kernels skip them."""
    n = expert_map.numel()
    if n == 0:
        return torch.full_like(ids, -1)
    ok = (ids >= 0) & (ids < n)
    return torch.where(ok, expert_map.to(ids.device).long()[ids.clamp(0, n - 1)], -1)


def ref_fused_moe_pipeline(x, w1, w2, topk_w, topk_ids, B=16, on_input=False, rsf=1.0, expert_map=None):
    """align(B) -> GEMM1 -> silu_and_mul -> GEMM2 (x routing weight) -> moe_sum, as spec §5."""
    from .moe_routing import ref_moe_align_block_size

    x, w1, w2, topk_w, topk_ids = (t.cpu() for t in (x, w1, w2, topk_w, topk_ids))
    T, k = topk_ids.shape
    E = expert_map.numel() if expert_map is not None else w1.shape[0]
    emap = expert_map.cpu() if expert_map is not None else None
    sid, eid, ntp = ref_moe_align_block_size(topk_ids, B, E, emap)
    h = ref_moe_grouped_gemm(x, w1, sid, eid, ntp, B, k, topk_w, on_input)
    h = ref_moe_grouped_gemm(ref_silu_and_mul(h), w2, sid, eid, ntp, B, 1, topk_w, not on_input)
    return ref_moe_sum(h.view(T, k, w2.shape[1]), rsf)


def ref_fused_moe_dense(x, w1, w2, topk_w, topk_ids, on_input=False, rsf=1.0, expert_map=None):
    """fp32 oracle with no alignment: every (token, expert) pair, expert by expert.

    ``expert_map`` (global id -> local id or -1) is applied to the ids first; pairs whose id is
    -1 or remote contribute nothing.
    """
    x, w1, w2, topk_w, topk_ids = (t.cpu() for t in (x, w1, w2, topk_w, topk_ids))
    ids = topk_ids.long()
    if expert_map is not None:
        ids = local_ids(ids, expert_map)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(w1.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if t.numel():
            wt = topk_w[t, j].float()[:, None]
            xin = x[t].float() * (wt if on_input else 1)
            g, u = (xin @ w1[e].float().T).chunk(2, -1)
            y = (F.silu(g) * u) @ w2[e].float().T
            out.index_add_(0, t, y * (1 if on_input else wt))
    return (out * rsf).to(x.dtype)


# ------------------------------------------------------------------------------ CPU backend


def _expert_matmul(a_rows: torch.Tensor, w_e: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 ``a_rows @ w_e.T``, each row times ``row_scale`` when given (the routing weight)."""
    acc = a_rows.float() @ w_e.float().T
    return acc * row_scale.float()[:, None] if row_scale is not None else acc


def moe_grouped_gemm_cpu(a, w, sorted_token_ids, expert_ids, num_tokens_post_pad, block_size, top_k,
                         topk_weights=None, mul_routed_weight=False):
    numel = a.shape[0] * top_k
    c = a.new_zeros((numel, w.shape[1]))
    n = int(num_tokens_post_pad.reshape(-1)[0])
    slots = sorted_token_ids[:n].long()
    blk_e = expert_ids[: n // block_size].long().repeat_interleave(block_size)[: slots.numel()]
    keep = (slots < numel) & (blk_e >= 0)
    rows, ex = slots[keep], blk_e[keep]
    flat_w = topk_weights.reshape(-1) if mul_routed_weight else None
    for e in ex.unique().tolist():
        sel = rows[ex == e]
        acc = _expert_matmul(a[sel // top_k], w[e], flat_w[sel] if flat_w is not None else None)
        c[sel] = acc.to(a.dtype)
    return c


def silu_and_mul_cpu(input):
    return ref_silu_and_mul(input).contiguous()


def silu_and_mul_out_cpu(input, out):
    out.copy_(ref_silu_and_mul(input))


def gelu_and_mul_cpu(input, approximate_tanh=False):
    return ref_gelu_and_mul(input, approximate_tanh).contiguous()


def gelu_and_mul_out_cpu(input, out, approximate_tanh=False):
    out.copy_(ref_gelu_and_mul(input, approximate_tanh))


def moe_sum_cpu(input, routed_scaling_factor=1.0):
    acc = torch.zeros((input.shape[0], input.shape[2]), dtype=torch.float32, device=input.device)
    for j in range(input.shape[1]):  # fixed j order: deterministic
        acc += input[:, j].float()
    return (acc * routed_scaling_factor).to(input.dtype)


def fused_moe_cpu(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu",
                  apply_router_weight_on_input=False, routed_scaling_factor=1.0, expert_map=None,
                  global_num_experts=-1, w1_up_first=False):
    x = hidden_states
    if w1_up_first:  # [up; gate] (FlashInfer's CUTLASS order) -> [gate; up]
        I = w1.shape[1] // 2
        w1 = torch.cat([w1[:, I:], w1[:, :I]], dim=1)
    T, H = x.shape
    k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).long()
    if expert_map is not None:
        ids = local_ids(ids, expert_map)
    flat_w = topk_weights.reshape(-1)
    y = x.new_zeros((T * k, H))  # skipped pairs contribute zeros, as the GPU's GEMM2 writes them
    E = w1.shape[0]
    for e in ids.unique().tolist():
        if e < 0 or e >= E:  # -1 and ids past the local experts are skipped, as the kernels skip them
            continue
        pairs = (ids == e).nonzero().flatten()
        pw = flat_w[pairs]
        h = _expert_matmul(x[pairs // k], w1[e], pw if apply_router_weight_on_input else None).to(x.dtype)
        o = _expert_matmul(ref_silu_and_mul(h), w2[e], None if apply_router_weight_on_input else pw)
        y[pairs] = o.to(x.dtype)
    return moe_sum_cpu(y.view(T, k, H), routed_scaling_factor)
