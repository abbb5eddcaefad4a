"""Fake (meta) implementations of the ``moe`` family: output shapes from input shapes only.

SymInt-safe: no ``int()`` of a size, no data reads. ``fused_moe`` is opaque: its fake shows
only the ``[T, H]`` result, never the alignment buffers or the intermediates inside it.
"""
from __future__ import annotations


def moe_grouped_gemm_fake(a, w, sorted_token_ids, expert_ids, num_tokens_post_pad, block_size, top_k,
                          topk_weights=None, mul_routed_weight=False):
    return a.new_empty((a.shape[0] * top_k, w.shape[1]))


def silu_and_mul_fake(input):
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))


def gelu_and_mul_fake(input, approximate_tanh=False):
    return silu_and_mul_fake(input)


def moe_sum_fake(input, routed_scaling_factor=1.0):
    return input.new_empty((input.shape[0], input.shape[2]))


def fused_moe_fake(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu",
                   apply_router_weight_on_input=False, routed_scaling_factor=1.0, expert_map=None,
                   global_num_experts=-1, w1_up_first=False):
    return hidden_states.new_empty((hidden_states.shape[0], w2.shape[1]))
