"""Multi-level cascade attention (FlashInfer's ``MultiLevelCascadeAttentionWrapper``, spec
attention.md §7): shared-prefix KV is attended once per group of query rows, not once per row.

Level l is one ``BatchPrefillWithPagedKVCacheWrapper`` over the *same* paged cache, with its own
``qo_indptr`` (groups of consecutive query rows that share level l's pages, e.g. ``[0, N]`` for
one prefix shared by all N rows) and page table. ``run`` computes each level's attention state
``(o, lse)`` and merges them with ``merge_state_in_place`` (the cascade family's op), which gives
attention over the union of a row's keys. ``causal`` applies to the last level only.

FlashInfer's older two-level forms, ``BatchDecodeWithSharedPrefixPagedKVCacheWrapper`` and
``BatchPrefillWithSharedPrefixPagedKVCacheWrapper``, live here too: their shared prefix is a
contiguous K/V pair passed to ``forward``, attended by ``single_prefill_with_kv_cache`` and merged
with the paged suffix's state the same way.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Union

import torch

from ._attention_plan import host_only
from ._checks import expect
from .cascade import merge_state_in_place
from .decode import BatchDecodeWithPagedKVCacheWrapper
from .prefill import BatchPrefillWithPagedKVCacheWrapper, single_prefill_with_kv_cache

__all__ = ["MultiLevelCascadeAttentionWrapper", "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
           "BatchPrefillWithSharedPrefixPagedKVCacheWrapper"]


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


class _SharedPrefixWrapper:
    """What the two shared-prefix wrappers share: the inner batch wrapper over the paged suffixes
    (kept under FlashInfer's attribute name too), the workspace swap, and the re-plan for q's
    dtype. Parameters: ``float_workspace_buffer`` (uint8/int8 bytes for the inner wrapper's
    split-KV scratch, 128 MiB recommended) and ``kv_layout`` (``"NHD"`` or ``"HND"``, for the
    shared K/V and the paged cache alike)."""

    _INNER: type
    _INNER_NAME: str  # FlashInfer's attribute for the inner wrapper

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD") -> None:
        self._inner = self._INNER(float_workspace_buffer, kv_layout)
        setattr(self, self._INNER_NAME, self._inner)
        self._kv_layout = kv_layout
        self._plan_args: Optional[dict] = None

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        """Swap the float workspace (the int workspace is not used here)."""
        self._inner.reset_workspace_buffer(float_workspace_buffer, int_workspace_buffer)

    def _begin(self, args: dict, **dtypes) -> None:
        """Plan the inner wrapper; keep ``args`` only once that worked (a refused plan keeps the
        last one and its arguments)."""
        self._inner.begin_forward(**args, **dtypes)
        self._plan_args = args

    def _attend(self, q, k_shared, v_shared, unique_kv_cache, shared: dict, unique: dict) -> torch.Tensor:
        """Every row of ``q`` over the whole shared prefix (``single_prefill_with_kv_cache``, no
        mask; options ``shared``) and over its planned suffix (the inner wrapper's
        ``forward_return_lse``; options ``unique``), the two states merged."""
        o, lse = single_prefill_with_kv_cache(q, k_shared, v_shared, causal=False, pos_encoding_mode="NONE",
                                              kv_layout=self._kv_layout, return_lse=True, **shared)
        o_unique, lse_unique = self._inner.forward_return_lse(q, unique_kv_cache, pos_encoding_mode="NONE", **unique)
        merge_state_in_place(o, lse, o_unique, lse_unique)
        return o

    def _planned_for(self, q: torch.Tensor):
        """The inner wrapper, re-planned from the ``begin_forward`` arguments when ``q``'s dtype is
        not the planned one: FlashInfer's shared-prefix ``begin_forward`` plans float16 (the prefill
        form takes no dtype at all), and q, k and v share one dtype here."""
        w = self._inner
        if w._plan is None:
            raise RuntimeError(f"{type(self).__name__}.forward() called before a successful begin_forward()")
        if q.dtype != w._plan.q_dtype:
            w.begin_forward(**self._plan_args, q_data_type=q.dtype, kv_data_type=q.dtype)
        return w


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapper):
    """Batch decode over a prefix every request shares plus each request's own pages: FlashInfer's
    older two-level cascade, which it keeps (marked for deprecation) beside
    ``MultiLevelCascadeAttentionWrapper``. The shared prefix is one contiguous K/V pair given at
    ``forward``; the per-request suffixes live in a paged cache planned by ``begin_forward``.
    ``forward`` attends every query to the whole prefix (``single_prefill_with_kv_cache``), to its
    own suffix (a ``BatchDecodeWithPagedKVCacheWrapper``), and merges the two states
    (``merge_state_in_place``). No positional encoding is applied inside attention. Parameters:
    ``float_workspace_buffer`` and ``kv_layout``, as ``_SharedPrefixWrapper`` describes them.
    """

    _INNER, _INNER_NAME = BatchDecodeWithPagedKVCacheWrapper, "_batch_decode_wrapper"

    @host_only
    def begin_forward(self, unique_kv_indptr: torch.Tensor, unique_kv_indices: torch.Tensor,
                      unique_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int, data_type: Union[str, torch.dtype] = "float16") -> None:
        """Plan the per-request suffixes: ``unique_kv_indptr [B+1]``, ``unique_kv_indices``,
        ``unique_kv_last_page_len [B]`` (int32, host or device) form the page table of the
        unique part; ``data_type`` is the dtype of q and of the caches (FlashInfer's decode plan
        would keep q at float16 beside it). A ``forward`` with q of another dtype re-plans for
        it."""
        self._begin(dict(indptr=unique_kv_indptr, indices=unique_kv_indices, last_page_len=unique_kv_last_page_len,
                         num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                         page_size=page_size, pos_encoding_mode="NONE"),
                    q_data_type=data_type, kv_data_type=data_type)

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor,
                unique_kv_cache) -> torch.Tensor:
        """Attention of ``q [B, num_qo_heads, head_dim]`` over ``k_shared``/``v_shared``
        (``[shared_len, num_kv_heads, head_dim]``, or ``[num_kv_heads, shared_len, head_dim]`` for
        HND) followed by each request's planned pages of ``unique_kv_cache`` (5-D tensor or
        ``(k_cache, v_cache)``). Returns ``o [B, num_qo_heads, head_dim]``."""
        w = self._planned_for(q)
        return self._attend(q, k_shared, v_shared, unique_kv_cache,
                            dict(sm_scale=w._sm_scale, rope_scale=w._rope_scale, rope_theta=w._rope_theta), {})


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapper):
    """Batch prefill/append over a prefix every request shares plus each request's own pages:
    FlashInfer's older two-level cascade for prefill (see
    ``BatchDecodeWithSharedPrefixPagedKVCacheWrapper``). ``forward`` attends every query row to
    the whole shared prefix, to its request's planned pages (causal there when asked, bottom-right
    aligned), and merges the two states. No positional encoding is applied inside attention.
    Parameters: ``float_workspace_buffer`` and ``kv_layout``, as ``_SharedPrefixWrapper``
    describes them.
    """

    _INNER, _INNER_NAME = BatchPrefillWithPagedKVCacheWrapper, "_batch_prefill_wrapper"

    @host_only
    def begin_forward(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
                      paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                      page_size: int) -> None:
        """Plan ``qo_indptr [B+1]`` query rows against each request's unique pages
        (``paged_kv_indptr [B+1]``, ``paged_kv_indices``, ``paged_kv_last_page_len [B]``; int32,
        host or device). As in FlashInfer, the plan is for float16 q and caches; a ``forward``
        with q of another dtype re-plans for it."""
        self._begin(dict(qo_indptr=qo_indptr, paged_kv_indptr=paged_kv_indptr, paged_kv_indices=paged_kv_indices,
                         paged_kv_last_page_len=paged_kv_last_page_len, num_qo_heads=num_qo_heads,
                         num_kv_heads=num_kv_heads, head_dim_qk=head_dim, page_size=page_size))

    def forward(self, q: torch.Tensor, k_shared: torch.Tensor, v_shared: torch.Tensor, unique_kv_cache,
                causal: bool = False, use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None) -> torch.Tensor:
        """Attention of ``q [qo_indptr[-1], num_qo_heads, head_dim]`` over ``k_shared``/``v_shared``
        (``[shared_len, num_kv_heads, head_dim]``, or ``[num_kv_heads, shared_len, head_dim]`` for
        HND) followed by each request's planned pages of ``unique_kv_cache`` (5-D tensor or
        ``(k_cache, v_cache)``); ``causal`` masks the unique part only. Returns
        ``o [qo_indptr[-1], num_qo_heads, head_dim]``."""
        self._planned_for(q)
        options = dict(sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta,
                       use_fp16_qk_reduction=use_fp16_qk_reduction)
        return self._attend(q, k_shared, v_shared, unique_kv_cache, options, dict(options, causal=causal))
