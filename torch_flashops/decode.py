"""Decode attention (FlashInfer's ``flashinfer.decode``): one query row per request (or
``q_len_per_req`` rows for speculative verification) over a paged KV cache, and the
single-request function (spec attention.md §2, §3, §4).

Decode is prefill with append length 1: the wrapper plans the same work lists as
``BatchPrefillWithPagedKVCacheWrapper`` with ``qo_indptr = arange(B + 1) * L`` and runs the same
op, so the two agree by construction. Long KV ranges are split across programs (split-KV) when
the batch alone cannot fill the GPU, then merged deterministically.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

from . import _attention_plan as P
from ._checks import check_tensor, expect, reject_fp8
from .meta.attention import check_pos_encoding_mode
from .meta.page import check_kv_layout
from .ops import attention as attn_ops
from .ops._host import next_pow2
from .page import get_seq_lens
from .prefill import _BatchAttention, _check_graph_buf, _return_lse_alias

__all__ = [
    "single_decode_with_kv_cache",
    "BatchDecodeWithPagedKVCacheWrapper",
    "CUDAGraphBatchDecodeWithPagedKVCacheWrapper",
    "get_seq_lens",  # re-exported, as FlashInfer's decode module does (vLLM imports it there)
    "fast_decode_plan",
]


def single_decode_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_tensor_cores: bool = False,
    q_scale: Optional[float] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    return_lse: bool = False,
    *,
    lse_base: str = "log2",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Decode attention of one query token over one request's keys/values.

    Parameters
    ----------
    q : torch.Tensor
        fp16, bf16 or fp32, shape ``[num_qo_heads, head_dim]``; sits at position ``kv_len - 1``.
    k, v : torch.Tensor
        Same dtype, ``[kv_len, num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, kv_len,
        head_dim]`` (HND); ``v``'s head dim must equal ``k``'s.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    pos_encoding_mode : str
        ``"NONE"``, ``"ROPE_LLAMA"`` or ``"ALIBI"``.
    use_tensor_cores : bool
        Accepted; results do not depend on it.
    q_scale, k_scale, v_scale : float, optional
        Scalar scales (q/k multiply ``sm_scale``, v the output).
    window_left : int
        Keys ``j >= kv_len - 1 - window_left`` are kept (``-1``: all).
    logits_soft_cap : float, optional
        ``s = c * tanh(s / c)`` when ``c > 0``.
    sm_scale : float, optional
        Default ``1 / sqrt(head_dim)``.
    rope_scale, rope_theta : float, optional
        RoPE parameters (defaults 1 and 1e4).
    return_lse : bool
        Also return the log-sum-exp.
    lse_base : str
        ``"log2"`` (default) or ``"ln"``.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``o [num_qo_heads, head_dim]`` in q's dtype, and with ``return_lse`` the fp32
        ``lse [num_qo_heads]``.
    """
    check_kv_layout(kv_layout)
    check_pos_encoding_mode(pos_encoding_mode)
    check_tensor(q, "q", ndim=2)
    check_tensor(k, "k", ndim=3)
    check_tensor(v, "v", ndim=3)
    reject_fp8(k, "k")
    reject_fp8(v, "v")
    expect(v.shape[-1] == k.shape[-1], "v", "head dim {} must equal k's {} for decode", v.shape[-1], k.shape[-1])
    window = P.check_window_left(window_left)
    cap = P.check_soft_cap(logits_soft_cap)
    rs, rt = P.rope_defaults(rope_scale, rope_theta)
    lse_ln = P.check_lse_base(lse_base)
    scale = P.resolve_sm_scale(sm_scale, q.shape[-1], q_scale, k_scale)
    o, lse = attn_ops.single_attention_op(q.unsqueeze(0), k, v, None, kv_layout, False, window, scale, cap,
                                          pos_encoding_mode, rs, rt, P.scalar_scale(v_scale, "v_scale"), lse_ln, None)
    return (o[0], lse[0]) if return_lse else o[0]


_PLAN_POSITIONAL = ("pos_encoding_mode", "window_left", "logits_soft_cap", "q_data_type", "kv_data_type",
                    "o_data_type", "data_type", "sm_scale", "rope_scale", "rope_theta", "non_blocking",
                    "block_tables", "seq_lens", "fixed_split_size", "disable_split_kv", "q_len_per_req")


def _no_duplicate_options(plan):
    """``plan()`` options given after ``page_size`` both positionally (FlashInfer's deprecated
    order) and by keyword raise ``TypeError``, as Python does for declared parameters; the
    signature alone cannot tell a keyword from its default."""
    @functools.wraps(plan)
    def checked(self, *args, **kwargs):
        for name in _PLAN_POSITIONAL[:max(0, len(args) - 7)]:
            if name in kwargs:
                raise TypeError(f"plan() got multiple values for argument {name!r}")
        return plan(self, *args, **kwargs)
    return checked


class BatchDecodeWithPagedKVCacheWrapper(_BatchAttention):
    """Batch decode attention over a paged KV cache (FlashInfer-compatible).

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        uint8/int8 byte buffer, 16-byte aligned (128 MiB recommended); bounds the split-KV
        partial states of a plan.
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_cuda_graph : bool
        Freeze the batch size (``len(paged_kv_last_page_len_buffer)``) and list sizes so ``run``
        can be replayed from a CUDA graph; then the three ``paged_kv_*_buffer`` (int32) are
        required and ``plan`` copies into them.
    use_tensor_cores : bool
        Needed for ``q_len_per_req > 1``; otherwise results do not depend on it.
    backend : str
        ``"auto"``, ``"fa2"``, ``"fa3"``, ``"trtllm-gen"``, ``"cute-dsl"`` (FlashInfer's names) or
        ``"triton"``: all run our Triton kernel. As in FlashInfer, ``"trtllm-gen"`` and
        ``"cute-dsl"`` imply ``use_tensor_cores=True``.
    jit_args : None
        Reserved (``NotImplementedError``).
    """

    _EXTRA_BACKENDS = ("trtllm-gen", "cute-dsl")
    _forward_takes_causal = False  # FlashInfer's decode forward() has no causal: it follows q_len_per_req
    _ARG_NAMES = dict(batch="indptr", head_dim_qk="head_dim", kv_indptr="indptr", kv_indices="indices",
                      last_page_len="last_page_len")
    _FORWARD_POSITIONAL = ("pos_encoding_mode", "q_scale", "k_scale", "v_scale", "window_left", "logits_soft_cap",
                           "sm_scale", "rope_scale", "rope_theta")

    _name = "BatchDecodeWithPagedKVCacheWrapper"
    _uniform_rows = True

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer: Optional[torch.Tensor] = None,
                 paged_kv_indices_buffer: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buffer: Optional[torch.Tensor] = None, backend: str = "auto",
                 jit_args: Optional[Any] = None) -> None:
        self._init_common(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args)
        # (FlashInfer's trtllm-gen and cute-dsl decode backends are tensor-core kernels: they imply it)
        self._use_tensor_cores = bool(use_tensor_cores) or backend in self._EXTRA_BACKENDS
        if self._use_cuda_graph:
            _check_graph_buf(paged_kv_last_page_len_buffer, "paged_kv_last_page_len_buffer")
            B = paged_kv_last_page_len_buffer.shape[0]
            _check_graph_buf(paged_kv_indptr_buffer, "paged_kv_indptr_buffer", B + 1)
            _check_graph_buf(paged_kv_indices_buffer, "paged_kv_indices_buffer")
            self._fixed_batch_size = B
            self._qo_indptr_buf = torch.zeros(B + 1, dtype=torch.int32, device=self.device)
        else:
            self._qo_indptr_buf = None
        self._paged_kv_indptr_buf = paged_kv_indptr_buffer
        self._paged_kv_indices_buf = paged_kv_indices_buffer
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buffer
        self._q_len_per_req: Optional[int] = None

    @property
    def use_tensor_cores(self) -> bool:
        return self._use_tensor_cores

    @P.host_only
    @_no_duplicate_options
    def plan(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim: int, page_size: int, *args, pos_encoding_mode="NONE", window_left=-1,
             window_right=0, logits_soft_cap=None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             data_type=None, sm_scale=None, rope_scale=None, rope_theta=None, non_blocking=True, block_tables=None,
             seq_lens=None, fixed_split_size=None, disable_split_kv=False, q_len_per_req=1) -> None:
        """Plan decode for the page table ``indptr [B+1]``, ``indices``, ``last_page_len [B]``
        (int32, host or device), heads, head dim and page size; keyword options as FlashInfer's
        (spec §4; ``fixed_split_size`` in pages). Arguments after ``page_size`` given
        positionally (in FlashInfer's old order, without ``window_right``) are deprecated
        (warning). Host code; not for compiled regions."""
        kwargs = dict(pos_encoding_mode=pos_encoding_mode, window_left=window_left, window_right=window_right,
                      logits_soft_cap=logits_soft_cap, q_data_type=q_data_type, kv_data_type=kv_data_type,
                      o_data_type=o_data_type, data_type=data_type, sm_scale=sm_scale, rope_scale=rope_scale,
                      rope_theta=rope_theta, non_blocking=non_blocking, block_tables=block_tables,
                      seq_lens=seq_lens, fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv,
                      q_len_per_req=q_len_per_req)
        if args:
            expect(len(args) <= len(_PLAN_POSITIONAL), "plan", "takes at most {} positional arguments", 7 + len(_PLAN_POSITIONAL))
            warnings.warn("BatchDecodeWithPagedKVCacheWrapper.plan: passing options after page_size positionally is "
                          "deprecated; pass them by keyword", DeprecationWarning, stacklevel=2)
            for name, value in zip(_PLAN_POSITIONAL, args):  # (_no_duplicate_options saw no keyword twice)
                kwargs[name] = value
        self._plan_decode(indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kwargs)

    def _plan_decode(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
                     pos_encoding_mode="NONE", window_left=-1, window_right=0, logits_soft_cap=None,
                     q_data_type="float16", kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None,
                     rope_scale=None, rope_theta=None, non_blocking=True, block_tables=None, seq_lens=None,
                     fixed_split_size=None, disable_split_kv=False, q_len_per_req=1):
        P.reject(block_tables=block_tables, seq_lens=seq_lens)
        self._non_blocking = bool(non_blocking)
        if window_right != 0:
            raise NotImplementedError("window_right != 0 is not supported (the right window is the causal bound)")
        L = P.check_int(q_len_per_req, "q_len_per_req")
        expect(L >= 1, "q_len_per_req", "must be >= 1, got {}", L)
        if L > 1:
            expect(self._use_tensor_cores, "q_len_per_req", "> 1 requires use_tensor_cores=True (as FlashInfer)")
        if self._use_cuda_graph and self._q_len_per_req is not None:
            expect(L == self._q_len_per_req, "q_len_per_req",
                   "is frozen in CUDA-graph mode: planned {}, got {}", self._q_len_per_req, L)
        if data_type is not None:
            q_data_type = data_type if q_data_type is None else q_data_type
            kv_data_type = data_type if kv_data_type is None else kv_data_type
        kv_indptr_h = P.to_host_int(indptr, "indptr")
        last_h = P.to_host_int(last_page_len, "last_page_len")
        P.check_page_ids(indices, "indices")
        page_size = P.check_int(page_size, "page_size")
        kv_lens_h = P.validate_paged_csr(kv_indptr_h, last_h, indices.shape[0], page_size, indptr_name="indptr",
                                         last_name="last_page_len", indices_name="indices")
        B = last_h.size
        live = kv_lens_h[kv_lens_h > 0]  # requests without pages (CUDA-graph padding) have no rows to check
        if L > 1 and live.size:
            expect(int(live.min()) >= L, "q_len_per_req",
                   "={} needs kv_len >= q_len_per_req for every request with pages, got kv_len {}", L, int(live.min()))
        qo_h = np.arange(B + 1, dtype=np.int64) * L
        self._plan_paged(qo_h, kv_indptr_h, kv_lens_h, indices, last_h, num_qo_heads=num_qo_heads,
                         num_kv_heads=num_kv_heads, head_dim_qk=head_dim, head_dim_vo=None, page_size=page_size,
                         custom_mask=None, packed_custom_mask=None, causal=L > 1,
                         pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, window_left=window_left,
                         logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta,
                         q_data_type=q_data_type, kv_data_type=kv_data_type, o_data_type=o_data_type,
                         fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)
        self._q_len_per_req = L

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, *args, q_scale: Optional[float] = None,
            k_scale: Optional[float] = None, v_scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False, enable_pdl: Optional[bool] = None,
            window_left: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
            q_len_per_req: Optional[int] = None, skip_softmax_threshold_scale_factor: Optional[float] = None,
            kv_cache_sf: Optional[torch.Tensor] = None,
            lse_base: str = "log2") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Decode attention of ``q [B * q_len_per_req, num_qo_heads, head_dim]`` over the planned
        pages of ``paged_kv_cache`` (5-D tensor or ``(k_cache, v_cache)``). Returns
        ``o [B * L, num_qo_heads, head_dim]`` and, with ``return_lse``, the fp32
        ``lse [B * L, num_qo_heads]`` (base 2, or e with ``lse_base="ln"``)."""
        L = self._q_len_per_req

        def check_q(q):
            if not torch.compiler.is_compiling():  # compiled: the kernel masks rows past q.shape[0]
                B = self._plan.batch
                expect(q.shape[0] == B * L, "q", "has {} rows, expected batch_size * q_len_per_req = {} * {}", q.shape[0], B, L)
            if q_len_per_req is not None:
                expect(int(q_len_per_req) == L, "q_len_per_req", "={} differs from the planned {}", q_len_per_req, L)

        reserved = dict(args=args or None, sinks=sinks, kv_cache_sf=kv_cache_sf,
                        skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor)
        return self._run_paged(q, paged_kv_cache, window_left, reserved, lse_base, q_scale, k_scale, v_scale, out,
                               lse, return_lse, check_q)

    run_return_lse = _return_lse_alias(run)



class CUDAGraphBatchDecodeWithPagedKVCacheWrapper(BatchDecodeWithPagedKVCacheWrapper):
    """``BatchDecodeWithPagedKVCacheWrapper`` with ``use_cuda_graph=True`` (FlashInfer's alias)."""

    def __init__(self, workspace_buffer: torch.Tensor, indptr_buffer: torch.Tensor, indices_buffer: torch.Tensor,
                 last_page_len_buffer: torch.Tensor, kv_layout: str = "NHD", use_tensor_cores: bool = False) -> None:
        super().__init__(workspace_buffer, kv_layout, use_cuda_graph=True, use_tensor_cores=use_tensor_cores,
                         paged_kv_indptr_buffer=indptr_buffer, paged_kv_indices_buffer=indices_buffer,
                         paged_kv_last_page_len_buffer=last_page_len_buffer)


_RANGES: dict = {}


def _get_range_buf(seq_len: int, device) -> torch.Tensor:
    """``[0, 1, ..., seq_len - 1]`` (int32 on ``device``), a view of one cached buffer per
    power-of-two length and device: FlashInfer's private helper of the same name, which SGLang's
    and vLLM's FlashInfer backends import from ``flashinfer.decode`` to build a decode batch's
    ``qo_indptr`` (read it, never write it: later calls return views of the same storage)."""
    n = int(seq_len)
    expect(n >= 0, "seq_len", "must be >= 0, got {}", seq_len)
    dev = torch.device(device)
    size = next_pow2(n)
    buf = _RANGES.get((size, dev))
    if buf is None:
        buf = _RANGES[(size, dev)] = torch.arange(size, dtype=torch.int32, device=dev)
    return buf[:n]


def fast_decode_plan(
    self: BatchDecodeWithPagedKVCacheWrapper,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_page_len: torch.Tensor,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pos_encoding_mode: str = "NONE",
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    q_data_type: Optional[Union[str, torch.dtype]] = None,
    kv_data_type: Optional[Union[str, torch.dtype]] = None,
    data_type: Optional[Union[str, torch.dtype]] = None,
    sm_scale: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    non_blocking: bool = True,
    fixed_split_size: Optional[int] = None,
    disable_split_kv: bool = False,
    global_override_indptr_cpu: Optional[torch.Tensor] = None,
) -> None:
    """FlashInfer's ``fast_decode_plan``, a function taking a decode wrapper as ``self`` (SGLang
    binds it to its draft-step wrappers): the same plan as ``self.plan(...)``.

    FlashInfer's version skips copies into the CUDA-graph buffers, which its callers fill
    themselves; here it is ``plan()`` (those copies, when ``indices`` already is the buffer, copy
    it onto itself), with FlashInfer's defaults of this function: ``q_data_type`` (and
    ``data_type``) None mean float16, ``kv_data_type`` None means ``q_data_type``.
    ``global_override_indptr_cpu``: the host copy of ``indptr`` (planned from instead of
    ``indptr``, which then is not read back from the device)."""
    expect(isinstance(self, BatchDecodeWithPagedKVCacheWrapper), "self",
           "must be a BatchDecodeWithPagedKVCacheWrapper, got {}", type(self).__name__)
    if q_data_type is None and data_type is None:  # (plan() reads data_type the same way otherwise)
        q_data_type = "float16"
    host_indptr = indptr if global_override_indptr_cpu is None else global_override_indptr_cpu
    self.plan(host_indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
              pos_encoding_mode=pos_encoding_mode, window_left=window_left, logits_soft_cap=logits_soft_cap,
              q_data_type=q_data_type, kv_data_type=kv_data_type, data_type=data_type, sm_scale=sm_scale,
              rope_scale=rope_scale, rope_theta=rope_theta, non_blocking=non_blocking,
              fixed_split_size=fixed_split_size, disable_split_kv=disable_split_kv)
