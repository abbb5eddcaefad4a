"""Fake (meta) implementations for the ``moe_routing`` family: shapes only, SymInt-safe.

Every size here is a polynomial of input sizes and plain int arguments (no ``int()`` of a
SymInt, no ``min``/``max``, no data reads), so ``torch.compile(dynamic=True)`` traces one graph
for every token count.
"""
from __future__ import annotations

import torch

__all__ = [
    "align_sizes",
    "topk_softmax_fake",
    "grouped_topk_fake",
    "topk_sigmoid_fake",
    "moe_align_block_size_fake",
]


def align_sizes(numel, num_experts: int, block_size: int, pad_sorted_ids: bool):
    """Static sizes of ``moe_align_block_size`` (spec moe.md §2) from ``numel = T * k``.

    Returns ``(max_num_tokens_padded, num_blocks)``: the length of ``sorted_token_ids`` and of
    ``expert_ids``. Works on ints and SymInts alike (only +, *, //).
    """
    cap = numel + (num_experts + 1) * (block_size - 1)
    if pad_sorted_ids:
        cap = (cap + block_size - 1) // block_size * block_size
    return cap, (cap + block_size - 1) // block_size


def _routing_outputs(gating_output: torch.Tensor, topk: int):
    T = gating_output.shape[0]
    w = gating_output.new_empty((T, topk), dtype=torch.float32)
    ids = gating_output.new_empty((T, topk), dtype=torch.int32)
    return w, ids


def topk_softmax_fake(gating_output, topk, renormalize):
    return _routing_outputs(gating_output, topk)


def grouped_topk_fake(gating_output, topk, n_group, topk_group, bias, scoring_func, renormalize,
                      routed_scaling_factor):
    return _routing_outputs(gating_output, topk)


def topk_sigmoid_fake(gating_output, topk):
    return _routing_outputs(gating_output, topk)


def moe_align_block_size_fake(topk_ids, block_size, num_experts, expert_map, pad_sorted_ids):
    cap, n_blocks = align_sizes(topk_ids.numel(), num_experts, block_size, pad_sorted_ids)
    sorted_ids = topk_ids.new_empty((cap,), dtype=torch.int32)
    expert_ids = topk_ids.new_empty((n_blocks,), dtype=torch.int32)
    ntp = topk_ids.new_empty((1,), dtype=torch.int32)
    return sorted_ids, expert_ids, ntp
