"""Fake (meta) implementations of the ``flashops::rope*`` ops: shapes only, SymInt-safe.

The in-place ops return nothing and need none.
"""
from __future__ import annotations


def rope_fake(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta, llama31,
              low_freq_factor, high_freq_factor, old_context_len):
    """``(q_out, k_out)``: fresh contiguous tensors shaped like ``q`` and ``k``."""
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope_cos_sin_cache_fake(q, k, positions, cos_sin_cache, interleave):
    """``(q_out, k_out)`` for ``[nnz, H, head_size]`` inputs: contiguous, same shapes."""
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope_positions_fake(indptr, offsets, nnz):
    """``pos_ids [nnz]`` in ``offsets``' dtype."""
    return offsets.new_empty((nnz,))
