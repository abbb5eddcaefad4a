"""Multi-level cascade attention (FlashInfer's ``MultiLevelCascadeAttentionWrapper``, spec
attention.md §7): shared-prefix KV is attended once per group of query rows, not once per row.

Level l is one ``BatchPrefillWithPagedKVCacheWrapper`` over the *same* paged cache, with its own
``qo_indptr`` (groups of consecutive query rows that share level l's pages, e.g. ``[0, N]`` for
one prefix shared by all N rows) and page table. ``run`` computes each level's attention state
``(o, lse)`` and merges them with ``merge_state_in_place`` (the cascade family's op), which gives
attention over the union of a row's keys. ``causal`` applies to the last level only.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Union

import torch

from ._attention_plan import host_only
from ._checks import expect
from .cascade import merge_state_in_place
from .prefill import BatchPrefillWithPagedKVCacheWrapper

__all__ = ["MultiLevelCascadeAttentionWrapper"]


def _level_list(x, n: int, name: str) -> list:
    expect(isinstance(x, (list, tuple)) and len(x) == n, name, "must be a list of num_levels = {} entries", n)
    return list(x)


class MultiLevelCascadeAttentionWrapper:
    """Attention over several levels of shared KV (e.g. a system prompt shared by the whole
    batch, then per-request suffixes), each level planned as a paged prefill.

    Parameters
    ----------
    num_levels : int
        Number of levels (>= 1).
    float_workspace_buffer : torch.Tensor
        uint8/int8 byte buffer shared by the levels (16-byte aligned; 128 MiB recommended).
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_cuda_graph : bool
        Freeze sizes for CUDA-graph replay; then the four ``*_buf_arr`` lists (one int32 buffer
        per level, as ``BatchPrefillWithPagedKVCacheWrapper`` takes them) are required.
    """

    def __init__(self, num_levels: int, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf_arr: Optional[Sequence[torch.Tensor]] = None,
                 paged_kv_indptr_buf_arr: Optional[Sequence[torch.Tensor]] = None,
                 paged_kv_indices_buf_arr: Optional[Sequence[torch.Tensor]] = None,
                 paged_kv_last_page_len_buf_arr: Optional[Sequence[torch.Tensor]] = None) -> None:
        try:  # any int-like (NumPy integers from a config), not bool or float
            levels = None if isinstance(num_levels, bool) else operator.index(num_levels)
        except TypeError:
            levels = None
        expect(levels is not None and levels >= 1, "num_levels", "must be an int >= 1, got {!r}", num_levels)
        num_levels = levels
        bufs = [[None] * num_levels] * 4
        if use_cuda_graph:
            bufs = [_level_list(b, num_levels, n) for b, n in (
                (qo_indptr_buf_arr, "qo_indptr_buf_arr"), (paged_kv_indptr_buf_arr, "paged_kv_indptr_buf_arr"),
                (paged_kv_indices_buf_arr, "paged_kv_indices_buf_arr"),
                (paged_kv_last_page_len_buf_arr, "paged_kv_last_page_len_buf_arr"))]
        self._num_levels = num_levels
        self._kv_layout = kv_layout
        self._batch_prefill_wrappers: List[BatchPrefillWithPagedKVCacheWrapper] = [
            BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout, use_cuda_graph=use_cuda_graph,
                                                qo_indptr_buf=bufs[0][i], paged_kv_indptr_buf=bufs[1][i],
                                                paged_kv_indices_buf=bufs[2][i],
                                                paged_kv_last_page_len_buf=bufs[3][i])
            for i in range(num_levels)
        ]

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._batch_prefill_wrappers[0].is_cuda_graph_enabled

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffers=None) -> None:
        """Swap the float workspace of every level."""
        for w in self._batch_prefill_wrappers:
            w.reset_workspace_buffer(float_workspace_buffer)

    @host_only
    def plan(self, qo_indptr_arr: Sequence[torch.Tensor], paged_kv_indptr_arr: Sequence[torch.Tensor],
             paged_kv_indices_arr: Sequence[torch.Tensor], paged_kv_last_page_len: Sequence[torch.Tensor],
             num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
             window_left: int = -1, logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type: Union[str, torch.dtype] = "float16",
             kv_data_type: Optional[Union[str, torch.dtype]] = None) -> None:
        """Plan every level. Each ``*_arr`` is a list of ``num_levels`` int32 tensors: level l's
        ``qo_indptr`` (groups of consecutive query rows sharing the level's pages), page-table
        ``indptr``/``indices``/``last_page_len``. Every ``qo_indptr[-1]`` must equal the number of
        query rows N. ``causal`` applies to the last level only; the other options to all.
        Positions (RoPE, ALiBi, window) are level-local, as in FlashInfer."""
        n = self._num_levels
        qo = _level_list(qo_indptr_arr, n, "qo_indptr_arr")
        ind = _level_list(paged_kv_indptr_arr, n, "paged_kv_indptr_arr")
        idx = _level_list(paged_kv_indices_arr, n, "paged_kv_indices_arr")
        last = _level_list(paged_kv_last_page_len, n, "paged_kv_last_page_len")
        for i, q in enumerate(qo):
            expect(isinstance(q, torch.Tensor) and q.dim() == 1 and q.shape[0] >= 1, "qo_indptr_arr",
                   "level {} must be a 1-D tensor with at least one element, got {!r}", i,
                   tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__)
        totals = [int(q[-1]) for q in qo]
        expect(all(t == totals[0] for t in totals), "qo_indptr_arr",
               "every level must cover the same N query rows (qo_indptr[-1] per level: {})", totals)
        try:
            for i, w in enumerate(self._batch_prefill_wrappers):
                w.plan(qo[i], ind[i], idx[i], last[i], num_qo_heads, num_kv_heads, head_dim, page_size,
                       causal=bool(causal) and i == n - 1, pos_encoding_mode=pos_encoding_mode,
                       use_fp16_qk_reduction=use_fp16_qk_reduction, sm_scale=sm_scale, window_left=window_left,
                       logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
                       q_data_type=q_data_type, kv_data_type=kv_data_type)
        except Exception:  # levels planned before the failing one must not merge with older plans
            for w in self._batch_prefill_wrappers:
                w._plan = None
            raise

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache) -> torch.Tensor:
        """Attention of ``q [N, num_qo_heads, head_dim]`` over the union of each row's levels in
        ``paged_kv_cache`` (one cache shared by all levels). Returns ``o [N, num_qo_heads,
        head_dim]`` in the planned output dtype."""
        wrappers = self._batch_prefill_wrappers
        if any(w._plan is None for w in wrappers):  # (a Python attribute: traced as a constant)
            raise RuntimeError("MultiLevelCascadeAttentionWrapper.run() called before a successful plan()")
        o, s = wrappers[-1].run(q, paged_kv_cache, return_lse=True)
        for w in wrappers[:-1]:
            o_i, s_i = w.run(q, paged_kv_cache, return_lse=True)
            merge_state_in_place(o, s, o_i, s_i)
        return o

    forward = run

    def end_forward(self) -> None:
        """No-op (FlashInfer compatibility)."""
