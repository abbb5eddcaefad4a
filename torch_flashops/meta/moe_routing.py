"""Fake (meta) implementations for the ``moe_routing`` family: shapes only, SymInt-safe.

Every size here is a polynomial of input sizes and plain int arguments (no ``int()`` of a
SymInt, no ``min``/``max``, no data reads), so ``torch.compile(dynamic=True)`` traces one graph
for every token count.
"""
from __future__ import annotations

import torch

from .._checks import fail_if as _fail_if

__all__ = [
    "align_sizes",
    "check_topk_args",
    "check_grouped_topk_args",
    "check_align_args",
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


# Argument checks every implementation runs (register_op's ``check``): the kernels index by
# these ints, so a direct ``torch.ops.flashops`` call with bad ones must raise, not read out of
# bounds or return a shape its fake does not promise. Sizes and ints only (cheap, SymInt-safe).

def check_topk_args(gating_output, topk, *_):
    _fail_if(gating_output.dim() != 2, "gating_output",
             lambda: f"must be 2-D [T, E], got shape {tuple(gating_output.shape)}")
    E = gating_output.shape[1]
    _fail_if((topk < 1) | (topk > E), "topk", lambda: f"must satisfy 1 <= topk <= num_experts ({E}), got {topk}")


def check_grouped_topk_args(gating_output, topk, n_group, topk_group, bias, scoring_func, *_):
    check_topk_args(gating_output, topk)
    E = gating_output.shape[1]
    _fail_if(scoring_func not in ("sigmoid", "softmax"), "scoring_func",
             lambda: f"must be 'sigmoid' or 'softmax', got {scoring_func!r}")
    _fail_if(n_group < 1, "n_group", lambda: f"must be >= 1, got {n_group}")
    _fail_if(E % n_group != 0, "n_group", lambda: f"must divide num_experts ({E}), got {n_group}")
    _fail_if((topk_group < 1) | (topk_group > n_group), "topk_group",
             lambda: f"must satisfy 1 <= topk_group <= n_group ({n_group}), got {topk_group}")
    _fail_if(topk > topk_group * (E // n_group), "topk",
             lambda: f"must be <= topk_group * experts per group ({topk_group} * {E // n_group}), got {topk}")
    if bias is not None:
        _fail_if((bias.dim() != 1) | (bias.numel() != E), "bias",
                 lambda: f"shape {tuple(bias.shape)} must be ({E},) (one per expert)")
        _fail_if(E // n_group < 2, "bias", lambda: "biased group scores sum each group's top 2: needs >= 2 experts "
                                                  f"per group, got {E // n_group}")


def check_align_args(topk_ids, block_size, num_experts, expert_map, *_):
    _fail_if(block_size < 1, "block_size", lambda: f"must be >= 1, got {block_size}")
    _fail_if(num_experts < 1, "num_experts", lambda: f"must be >= 1, got {num_experts}")
    if expert_map is not None:
        _fail_if((expert_map.dim() != 1) | (expert_map.numel() != num_experts), "expert_map",
                 lambda: f"shape {tuple(expert_map.shape)} must be ({num_experts},) (one entry per expert)")


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
