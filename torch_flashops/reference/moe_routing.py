"""Plain-PyTorch side of the ``moe_routing`` family (spec moe.md §1, §2, §8).

Two kinds of functions live here, and neither imports the code under test:

* ``ref_*``: the test oracles, written straight from the spec's reference section (fp32,
  ``torch.topk``, a Python loop over buckets). Tie order among equal scores is whatever
  ``torch.topk`` does, so tests use tie-free logits or compare ids as sets.
* ``*_cpu``: the CPU backend of each op, with exactly the op's signature and output contract
  (fp32 weights, int32 ids, fresh contiguous outputs). These follow the contract's tie rule
  (descending score, ties to the lower expert id) through stable sorts, and align without a
  Python loop over experts.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..meta.moe_routing import align_sizes

__all__ = [
    "ref_topk_softmax",
    "ref_grouped_topk",
    "ref_topk_sigmoid",
    "ref_moe_align_block_size",
    "topk_softmax_cpu",
    "grouped_topk_cpu",
    "topk_sigmoid_cpu",
    "moe_align_block_size_cpu",
]


# --------------------------------------------------------------------------- oracles (spec §8)

def ref_topk_softmax(logits: torch.Tensor, k: int, renormalize: bool = False):
    """Softmax over experts, keep the k largest probabilities, optionally renormalise them."""
    probs = logits.float().softmax(dim=-1)
    w, ids = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


def ref_grouped_topk(logits: torch.Tensor, k: int, n_group: int, topk_group: int,
                     bias: Optional[torch.Tensor] = None, scoring_func: str = "sigmoid",
                     renormalize: bool = True, rsf: float = 1.0):
    """DeepSeek grouped routing: score, rank contiguous groups, top-k inside the kept groups."""
    T, E = logits.shape
    x = logits.float()
    scores = x.sigmoid() if scoring_func == "sigmoid" else x.softmax(dim=-1)
    select = scores + bias.float() if bias is not None else scores
    per_group = select.view(T, n_group, E // n_group)
    if bias is not None:
        group_score = per_group.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_score = per_group.amax(dim=-1)
    kept = torch.zeros_like(group_score, dtype=torch.bool)
    kept.scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    expert_kept = kept.repeat_interleave(E // n_group, dim=1)
    select = select.masked_fill(~expert_kept, float("-inf"))
    ids = select.topk(k, dim=-1).indices
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * rsf, ids.to(torch.int32)


def ref_topk_sigmoid(logits: torch.Tensor, k: int = 1):
    """Llama 4: the k largest logits, weights are their sigmoids."""
    v, ids = logits.float().topk(k, dim=-1)
    return v.sigmoid(), ids.to(torch.int32)


def ref_moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                             expert_map: Optional[torch.Tensor] = None, pad_sorted_ids: bool = False):
    """Bucket every expanded pair by (local) expert, skip bucket last; pad buckets to blocks."""
    flat = topk_ids.reshape(-1).long().cpu()
    numel, E, B = flat.numel(), num_experts, block_size
    if expert_map is not None:
        local = expert_map.long().cpu()[flat.clamp(min=0)]
        flat = torch.where(flat >= 0, local, torch.full_like(flat, -1))
    bucket = torch.where(flat >= 0, flat, torch.full_like(flat, E))
    cap, n_blocks = align_sizes(numel, E, B, pad_sorted_ids)
    sorted_ids = torch.full((cap,), numel, dtype=torch.int32)
    expert_ids = torch.full((n_blocks,), -1, dtype=torch.int32)
    pos = 0
    for e in range(E + 1):
        members = (bucket == e).nonzero().flatten()
        n = members.numel()
        if n == 0:
            continue
        sorted_ids[pos:pos + n] = members.to(torch.int32)
        blocks = -(-n // B)
        expert_ids[pos // B:pos // B + blocks] = e if e < E else -1
        pos += blocks * B
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32)


# --------------------------------------------------------------------------- CPU backend

def _topk_desc(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, descending, ties to the lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]


def topk_softmax_cpu(gating_output: torch.Tensor, topk: int, renormalize: bool):
    probs = gating_output.float().softmax(dim=-1)
    ids = _topk_desc(probs, topk)
    w = probs.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.contiguous(), ids.to(torch.int32).contiguous()


def grouped_topk_cpu(gating_output: torch.Tensor, topk: int, n_group: int, topk_group: int,
                     bias: Optional[torch.Tensor], scoring_func: str, renormalize: bool,
                     routed_scaling_factor: float):
    T, E = gating_output.shape
    G = E // n_group
    x = gating_output.float()
    scores = x.sigmoid() if scoring_func == "sigmoid" else x.softmax(dim=-1)
    select = scores + bias.float() if bias is not None else scores
    per_group = select.view(T, n_group, G)
    if bias is not None:
        top2 = torch.sort(per_group, dim=-1, descending=True).values[..., :2]
        group_score = top2.sum(dim=-1)
    else:
        group_score = per_group.amax(dim=-1)
    kept = torch.zeros((T, n_group), dtype=torch.bool, device=x.device)
    kept.scatter_(1, _topk_desc(group_score, topk_group), True)
    select = select.masked_fill(~kept.repeat_interleave(G, dim=1), float("-inf"))
    ids = _topk_desc(select, topk)
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * routed_scaling_factor
    return w.contiguous(), ids.to(torch.int32).contiguous()


def topk_sigmoid_cpu(gating_output: torch.Tensor, topk: int):
    x = gating_output.float()
    ids = _topk_desc(x, topk)
    return x.gather(1, ids).sigmoid().contiguous(), ids.to(torch.int32).contiguous()


def moe_align_block_size_cpu(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                             expert_map: Optional[torch.Tensor], pad_sorted_ids: bool):
    """Same layout as the Triton kernels: pairs ascending inside each bucket."""
    flat = topk_ids.reshape(-1).long()
    numel, E, B = flat.numel(), num_experts, block_size
    ok = (flat >= 0) & (flat < E)  # out-of-range ids (undefined by contract) go to the skip bucket
    if expert_map is not None:
        local = expert_map.long()[flat.clamp(0, max(E - 1, 0))] if E > 0 else flat
        flat = torch.where(ok, local, torch.full_like(flat, -1))
        ok = (flat >= 0) & (flat < E)
    bucket = torch.where(ok, flat, torch.full_like(flat, E))
    counts = torch.bincount(bucket, minlength=E + 1)
    padded = (counts + B - 1) // B * B
    start = padded.cumsum(0) - padded
    first = counts.cumsum(0) - counts  # first position of each bucket in the stable sort
    order = torch.sort(bucket, stable=True).indices
    sb = bucket[order]
    dest = start[sb] + torch.arange(numel, device=flat.device) - first[sb]
    cap, n_blocks = align_sizes(numel, E, B, pad_sorted_ids)
    sorted_ids = torch.full((cap,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[dest] = order.to(torch.int32)
    block_bucket = torch.repeat_interleave(torch.arange(E + 1, device=flat.device), padded // B)
    expert_ids = torch.full((n_blocks,), -1, dtype=torch.int32, device=flat.device)
    expert_ids[: block_bucket.numel()] = torch.where(block_bucket < E, block_bucket, -1).to(torch.int32)
    ntp = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, ntp
