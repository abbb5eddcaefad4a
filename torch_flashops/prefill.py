"""Prefill attention (FlashInfer's ``flashinfer.prefill``): one request, or a batch over a paged
or ragged KV cache, with the CSR of append lengths (spec attention.md §2, §3, §5, §6).

The batch wrappers follow FlashInfer's two-phase protocol: ``plan()`` is host code (it reads
the index arrays once, validates them and builds the kernel's work lists on the device, see
``_attention_plan``) and ``run()`` only launches ops, so it can be captured by
``torch.compile(fullgraph=True)`` and CUDA graphs. ``BatchDecodeWithPagedKVCacheWrapper``
(``decode.py``) is this paged path with one query row per request.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from . import _attention_plan as P
from ._checks import check_range_values, check_tensor, expect, reject_fp8
from ._config import checks_enabled
from .meta.attention import check_head_dim, check_heads, check_out, check_pos_encoding_mode
from .meta.page import check_kv_layout
from .ops import attention as attn_ops
from .ops import page as page_ops
from .page import _unpack_paged_kv_cache, get_batch_indices_positions, get_seq_lens

__all__ = [
    "single_prefill_with_kv_cache",
    "single_prefill_with_kv_cache_return_lse",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "get_seq_lens",  # re-exported, as FlashInfer's prefill module does
]

# Paged prefill with many query rows per key gathers the planned K/V rows into contiguous
# scratch at run() and attends through the ragged path. Measured on an H100 (bf16, D=128, causal,
# B=4 x 4096, 2026-11-25): the paged kernel reaches 313 TFLOP/s, the ragged one 404 -- the
# page-id load before every K/V tile costs the paged loop about a fifth -- while the gather moves
# each K/V byte twice (about 1/20 of the attention time at 2048 visible rows per key). Used when
# the plan has at least this many visible (query row, key) pairs per key, never in CUDA-graph
# mode (the scratch size follows the batch), and only while the scratch stays under the cap.
PAGED_GATHER_MIN_ROWS_PER_KEY = 1024
PAGED_GATHER_MAX_BYTES = 1 << 30


# ----------------------------------------------------------------------------- single request
def _pack_mask_little(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[qo_len, kv_len]`` -> uint8 ``[ceil(qo_len*kv_len/8)]``, little-endian (no sync)."""
    from .quantization import packbits

    return packbits(mask, bitorder="little")


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_q: Optional[torch.Tensor] = None,
    scale_k: Optional[torch.Tensor] = None,
    scale_v: Optional[torch.Tensor] = None,
    o_dtype: Optional[Union[str, torch.dtype]] = None,
    custom_mask: Optional[torch.Tensor] = None,
    packed_custom_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: Optional[float] = None,
    window_left: int = -1,
    logits_soft_cap: Optional[float] = None,
    rope_scale: Optional[float] = None,
    rope_theta: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
    kv_cache_sf: Optional[torch.Tensor] = None,
    k_scale: Optional[float] = None,
    v_scale: Optional[float] = None,
    *,
    lse_base: str = "log2",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Prefill attention of one request's queries over its own keys/values.

    Parameters
    ----------
    q : torch.Tensor
        fp16, bf16 or fp32, shape ``[qo_len, num_qo_heads, head_dim_qk]`` (``stride(-1) == 1``,
        other strides free). Row r sits at position ``kv_len - qo_len + r``.
    k : torch.Tensor
        Same dtype, ``[kv_len, num_kv_heads, head_dim_qk]`` (NHD) or
        ``[num_kv_heads, kv_len, head_dim_qk]`` (HND).
    v : torch.Tensor
        Same dtype and layout as ``k`` with last dim ``head_dim_vo``.
    scale_q, scale_k, scale_v : None
        Per-head fp8 scale tensors: reserved (``NotImplementedError``).
    o_dtype : torch.dtype or str, optional
        Output dtype (default q's).
    custom_mask : torch.Tensor, optional
        bool ``[qo_len, kv_len]`` (or the same flattened to ``[qo_len * kv_len]``), True =
        attend; overrides ``causal``.
    packed_custom_mask : torch.Tensor, optional
        uint8 ``[ceil(qo_len * kv_len / 8)]``, the same bits packed little-endian (overrides
        ``custom_mask``).
    causal : bool
        Bottom-right aligned causal mask (``kv_len >= qo_len`` required).
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    pos_encoding_mode : str
        ``"NONE"``, ``"ROPE_LLAMA"`` (rotate-half RoPE applied on the fly) or ``"ALIBI"``.
    use_fp16_qk_reduction : bool
        Accepted and ignored (fp32 accumulation always).
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(head_dim_qk)``.
    window_left : int
        Keys ``j >= p_r - window_left`` are kept (``-1``: no window).
    logits_soft_cap : float, optional
        ``s = c * tanh(s / c)`` when ``c > 0``.
    rope_scale, rope_theta : float, optional
        RoPE parameters (defaults 1 and 1e4).
    backend : str
        ``"auto"``, ``"fa2"``, ``"fa3"`` or ``"triton"``: all mean our Triton kernel.
    return_lse : bool
        Also return the log-sum-exp.
    kv_cache_sf : None
        Reserved (``NotImplementedError``).
    k_scale, v_scale : float, optional
        Scalar scales: ``k_scale`` multiplies ``sm_scale``, ``v_scale`` the output.
    lse_base : str
        ``"log2"`` (default, FlashInfer's) or ``"ln"``.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        ``o`` of shape ``[qo_len, num_qo_heads, head_dim_vo]`` (``o_dtype``), and with
        ``return_lse`` the fp32 ``lse [qo_len, num_qo_heads]``.
    """
    P.reject(scale_q=scale_q, scale_k=scale_k, scale_v=scale_v, kv_cache_sf=kv_cache_sf)
    P.check_backend(backend)
    check_kv_layout(kv_layout)
    check_pos_encoding_mode(pos_encoding_mode)
    check_tensor(q, "q", ndim=3)
    check_tensor(k, "k", ndim=3)
    check_tensor(v, "v", ndim=3)
    reject_fp8(k, "k")
    reject_fp8(v, "v")
    kv_len = k.shape[0] if kv_layout == "NHD" else k.shape[1]
    if causal and custom_mask is None and packed_custom_mask is None:
        expect(kv_len >= q.shape[0], "causal", "needs kv_len >= qo_len, got kv_len {} < qo_len {}", kv_len, q.shape[0])
    if packed_custom_mask is None and custom_mask is not None:
        check_tensor(custom_mask, "custom_mask", ndim=(1, 2), last_contiguous=False)
        if custom_mask.dim() == 1:  # FlashInfer reads the mask flat (row-major): accept it flattened
            expect(custom_mask.shape[0] == q.shape[0] * kv_len, "custom_mask",
                   "has {} elements, expected qo_len * kv_len = {} * {}", custom_mask.shape[0], q.shape[0], kv_len)
            custom_mask = custom_mask.reshape(q.shape[0], kv_len)
        expect(tuple(custom_mask.shape) == (q.shape[0], kv_len), "custom_mask",
               "shape {}, expected [qo_len, kv_len] = {} (or flattened)", tuple(custom_mask.shape),
               (q.shape[0], kv_len))
        packed_custom_mask = _pack_mask_little(custom_mask)
    window = P.check_window_left(window_left)
    cap = P.check_soft_cap(logits_soft_cap)
    rs, rt = P.rope_defaults(rope_scale, rope_theta)
    lse_ln = P.check_lse_base(lse_base)
    scale = P.resolve_sm_scale(sm_scale, q.shape[-1], None, k_scale)
    o, lse = attn_ops.single_attention_op(
        q, k, v, packed_custom_mask, kv_layout, bool(causal), window, scale, cap, pos_encoding_mode, rs, rt,
        P.scalar_scale(v_scale, "v_scale"), lse_ln, P.parse_dtype(o_dtype, "o_dtype"))
    return (o, lse) if return_lse else o


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)


# ----------------------------------------------------------------------------- batch wrappers
def _check_workspace(buf) -> None:
    check_tensor(buf, "float_workspace_buffer", dtypes=(torch.uint8, torch.int8), last_contiguous=False)
    expect(buf.is_contiguous(), "float_workspace_buffer", "must be contiguous")
    expect(buf.data_ptr() % 16 == 0, "float_workspace_buffer", "must be 16-byte aligned")


def _check_graph_buf(buf, name: str, length: Optional[int] = None) -> torch.Tensor:
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"{name}: must be a torch.Tensor when use_cuda_graph=True")
    check_tensor(buf, name, ndim=1, dtypes=(torch.int32,))
    expect(buf.is_contiguous(), name, "must be contiguous")
    if length is not None:
        expect(buf.shape[0] == length, name, "length {} must be batch_size + 1 = {}", buf.shape[0], length)
    return buf


def _check_mask_bufs(custom_mask_buf, mask_indptr_buf, B: int) -> None:
    if custom_mask_buf is not None:
        check_tensor(custom_mask_buf, "custom_mask_buf", ndim=1, dtypes=(torch.uint8,))
    if mask_indptr_buf is not None:
        _check_graph_buf(mask_indptr_buf, "mask_indptr_buf", B + 1)


def _fixed_config(disable_split_kv: bool, fixed_split_keys: Optional[int]) -> bool:
    """Whether a plan asked for batch-invariant results (``fixed_split_size`` or
    ``disable_split_kv``): then nothing about its launches may depend on the rest of the batch
    (tile height, key-tile width, warps, TMA or gathered K/V), only on the request itself."""
    return bool(disable_split_kv) or fixed_split_keys is not None


def _fixed_split(fixed_split_size) -> Optional[int]:
    """``fixed_split_size`` as FlashInfer reads it: None, 0 or negative (vLLM passes -1) mean off."""
    if fixed_split_size is None or int(fixed_split_size) <= 0:
        return None
    return int(fixed_split_size)


class _Plan:
    """Scalars fixed by one ``plan()`` (run() reads these as constants).

    The float options are also kept as their ``repr`` strings, which is what ``run()`` reads:
    under ``torch.compile(dynamic=True)`` a float attribute becomes a symbolic float, and when
    it reaches an opaque op dynamo restarts its analysis (compiling the frame twice); a string
    is a guarded constant, so ``float(s)`` folds at trace time.
    """

    _FLOATS = ("sm_scale", "soft_cap", "rope_scale", "rope_theta")
    __slots__ = ("num_qo_heads", "num_kv_heads", "head_dim_qk", "head_dim_vo", "page_size", "causal",
                 "pos_encoding_mode", "window_left", "soft_cap", "sm_scale", "rope_scale", "rope_theta",
                 "q_dtype", "kv_dtype", "o_dtype", "block_m", "nnz_pages", "total_rows", "batch", "fixed_config",
                 "float_reprs")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))
        self.float_reprs = tuple(repr(float(kw[k])) for k in self._FLOATS)


_FORWARD_PLAN_KEYS = ("causal", "pos_encoding_mode", "use_fp16_qk_reduction", "window_left", "logits_soft_cap",
                      "sm_scale", "rope_scale", "rope_theta")
# FlashInfer's deprecated forward() sets every one of these to its own default when not given
_FORWARD_DEFAULTS = dict(causal=False, pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, sm_scale=None,
                         rope_scale=None, rope_theta=None)


def _return_lse_alias(run):
    """``run_return_lse``: ``run(..., return_lse=True)``, with the signature FlashInfer's
    ``functools.partialmethod(run, return_lse=True)`` has. A plain function, because dynamo
    cannot trace a partialmethod's ``__get__`` (``fullgraph=True`` failed on it)."""
    def run_return_lse(self, *args, **kwargs):
        return run(self, *args, **{"return_lse": True, **kwargs})

    class _Probe:
        alias = functools.partialmethod(run, return_lse=True)

    run_return_lse.__signature__ = inspect.signature(_Probe.alias)
    run_return_lse.__doc__ = "``run(..., return_lse=True)``: returns ``(out, lse)``."
    return run_return_lse


class _BatchAttention:
    """Plan/run machinery shared by the paged/ragged prefill wrappers and the decode wrapper."""

    _paged = True
    _name = "wrapper"
    _uniform_rows = False  # every request has the same number of query rows (decode: q_len_per_req)
    _EXTRA_BACKENDS: Tuple[str, ...] = ()  # FlashInfer's backend names beyond auto / fa2 / fa3 (check_backend)
    # plan() argument names the shared checks report (decode's plan() has its own)
    _ARG_NAMES = dict(batch="qo_indptr", head_dim_qk="head_dim_qk", kv_indptr="paged_kv_indptr",
                      kv_indices="paged_kv_indices", last_page_len="paged_kv_last_page_len")

    def _init_common(self, float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args, jit_kwargs=None):
        _check_workspace(float_workspace_buffer)
        check_kv_layout(kv_layout)
        P.check_backend(backend, self._EXTRA_BACKENDS)
        P.reject(jit_args=jit_args, jit_kwargs=jit_kwargs)
        self._float_workspace_buffer = float_workspace_buffer
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self._backend = backend
        self.device = float_workspace_buffer.device
        self._plan: Optional[_Plan] = None
        self._t: Optional[P.PlanTensors] = None
        self._t_export: Optional[P.PlanTensors] = None  # the same tensors without unbacked marks
        self._tiles: dict = {}  # block_m -> its size-carrier tensor (P.tile_tensor)
        self._bounds: Optional[P.Bounds] = None
        self._frozen_block_m: Optional[int] = None
        self._kv_lens_buf: Optional[torch.Tensor] = None
        self._non_blocking = True  # plan()'s host-to-device copies (P.to_device); each plan() sets it
        self._gather: Optional[_GatherRows] = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor, int_workspace_buffer=None) -> None:
        """Swap the float workspace (its size bounds the split-KV scratch of later plans)."""
        _check_workspace(float_workspace_buffer)
        self._float_workspace_buffer = float_workspace_buffer

    def end_forward(self) -> None:
        """No-op (FlashInfer compatibility)."""

    # -- plan ---------------------------------------------------------------------------
    def _schedule(self, qo_h, kv_lens_h, *, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo, causal, window_left,
                  has_mask, disable_split_kv, fixed_split_keys, dtype, nnz_keys=None, page_size=None):
        """Tile size and work lists for one plan, and in CUDA-graph mode the sizes its first plan
        freezes (``freeze``, applied by ``_set_lists``): nothing on the wrapper changes here, so a
        plan that fails leaves the previous one intact."""
        qo_lens = np.diff(qo_h)
        group = num_qo_heads // num_kv_heads
        # a fixed split (batch invariance) must not take its tile height from the batch's longest
        # request: prefill plans then use the tallest tile (decode's rows per request are fixed)
        rows = 128 if _fixed_config(disable_split_kv, fixed_split_keys) and not self._uniform_rows \
            else int(qo_lens.max(initial=1))
        block_m = self._frozen_block_m or attn_ops.tile_m(group, rows)
        block_n = attn_ops.attn_config(block_m, head_dim_qk, head_dim_vo, dtype, self.device)[0]
        ws = self._float_workspace_buffer.numel()
        bounds, freeze = self._bounds, None
        if self._use_cuda_graph and bounds is None:
            tiles = P.tile_bound(int(qo_h[-1]), qo_lens.size, group, block_m)
            per_head = -(-attn_ops.num_sms(self.device) * attn_ops.resident_programs(block_m) // num_kv_heads)
            cap = ws // attn_ops.partial_item_bytes(num_kv_heads, block_m, head_dim_vo)
            lo = attn_ops.NO_SPLIT_ROWS + 1  # frozen split/merge lists always launch the merge kernel
            split_rows = min(cap, tiles + 2 * per_head)
            if fixed_split_keys is not None and not disable_split_kv:
                # a fixed split's chunk count grows with later plans' lengths and is never
                # coarsened: the frozen list holds the most chunks any later plan can have (the
                # page-id buffer bounds the keys), else all the workspace holds
                max_keys = self._paged_kv_indices_buf.numel() * page_size if self._paged and page_size else None
                uniform = -(-int(qo_lens.max(initial=1)) * group // block_m) if self._uniform_rows else None
                split_rows = min(cap, P.fixed_split_bound(tiles, qo_lens.size, max_keys, fixed_split_keys, uniform))
            bounds = P.Bounds(tiles, max(lo, split_rows), max(lo, tiles))
            freeze = (bounds, block_m, int(qo_h[-1]))
        elif self._use_cuda_graph:
            expect(int(qo_h[-1]) <= self._frozen_rows, "qo_indptr",
                   "total rows {} exceed the first plan's {} (frozen in CUDA-graph mode)", int(qo_h[-1]), self._frozen_rows)
        whole = False
        if bounds is None:  # (CUDA-graph plans keep split capacity: one captured launch serves every later plan)
            n_tiles = int((-(-(qo_lens * group) // block_m)).sum())
            keys = int(nnz_keys if nnz_keys is not None else kv_lens_h.sum())
            wide = attn_ops.wide_tiles(dtype, head_dim_qk, head_dim_vo)
            whole = attn_ops.whole_requests(n_tiles * num_kv_heads, keys // max(n_tiles, 1), block_m, wide,
                                            self.device, group) \
                and int(kv_lens_h.max(initial=0)) <= attn_ops.WHOLE_KEYS[1]  # no long request left unsplit
        sched = P.build_schedule(qo_lens, kv_lens_h, group=group, block_m=block_m, block_n=block_n,
                                 num_kv_heads=num_kv_heads, d_vo=head_dim_vo, causal=causal, window_left=window_left,
                                 has_mask=has_mask, device=self.device, workspace_bytes=ws,
                                 disable_split_kv=disable_split_kv, fixed_split_keys=fixed_split_keys,
                                 bounds=bounds, whole=whole)
        if bounds is not None:
            P.check_list_sizes(sched, bounds)
        return block_m, sched, freeze

    def _set_lists(self, sched, freeze, up: P.Upload, **tensors):
        if freeze is not None:
            self._bounds, self._frozen_block_m, self._frozen_rows = freeze
        into = self._t if (self._use_cuda_graph and self._t is not None) else None
        work, split_work, merge = P.list_tensors(sched, up, self._bounds, into)
        self._t = P.PlanTensors(work=work, split_work=split_work, merge=merge, **tensors)
        if not self._use_cuda_graph:  # (graph mode: the caller's buffers, sizes frozen)
            P.unbacked_plan(self._t)
        self._t_export = self._t.unmarked()

    def _tensors(self) -> P.PlanTensors:
        """The plan's device tensors as run() hands them to the ops: marked unbacked for
        torch.compile, unmarked under torch.export (whose strict mode rejects such constants)."""
        return self._t_export if P.exporting() else self._t

    def _mask_tensors(self, custom_mask, packed_custom_mask, qo_lens, kv_lens):
        """The packed masks of a plan; in CUDA-graph mode also checks that they fit the buffers
        given at __init__ (``_commit_masks`` copies them there)."""
        packed, mask_indptr = P.pack_custom_masks(custom_mask, packed_custom_mask, qo_lens, kv_lens, self.device,
                                                  self._non_blocking)
        if packed is None or not self._use_cuda_graph:
            return packed, mask_indptr
        mask_buf, indptr_buf = getattr(self, "_custom_mask_buf", None), getattr(self, "_mask_indptr_buf", None)
        if mask_buf is None or indptr_buf is None:
            raise ValueError("custom_mask_buf: CUDA-graph mode with a custom mask needs custom_mask_buf and "
                             "mask_indptr_buf at __init__")
        P.check_fits(mask_buf, packed.numel(), "custom_mask_buf")
        P.check_fits(indptr_buf, mask_indptr.numel(), "mask_indptr_buf")
        return packed, mask_indptr

    def _commit_masks(self, packed, mask_indptr):
        if packed is None or not self._use_cuda_graph:
            return packed, mask_indptr
        P.copy_into(self._custom_mask_buf, packed, "custom_mask_buf", self._non_blocking)
        P.copy_into(self._mask_indptr_buf, mask_indptr, "mask_indptr_buf", self._non_blocking)
        return self._custom_mask_buf, self._mask_indptr_buf

    # -- run ----------------------------------------------------------------------------
    def _check_run(self, q, cache_dtype, page_size, num_kv_heads, head_dim_qk, head_dim_vo, window_left, extra,
                   lse_base):
        if self._plan is None:
            raise RuntimeError(f"{self._name}.run() called before a successful plan()")
        pl = self._plan
        P.reject(**extra)
        check_tensor(q, "q", ndim=3)
        expect(q.dtype == pl.q_dtype, "q", "dtype {} does not match the planned q_data_type {}", q.dtype, pl.q_dtype)
        expect(cache_dtype == pl.kv_dtype, "paged_kv_cache" if self._paged else "k",
               "dtype {} does not match the planned kv_data_type {}", cache_dtype, pl.kv_dtype)
        expect(q.device == self.device, "q", "on {}, the workspace is on {}", q.device, self.device)
        expect(q.shape[1] == pl.num_qo_heads and q.shape[2] == pl.head_dim_qk, "q",
               "shape {} does not match the plan (num_qo_heads {}, head_dim {})", tuple(q.shape), pl.num_qo_heads, pl.head_dim_qk)
        name = "paged_kv_cache" if self._paged else "k"
        if page_size is not None:
            expect(page_size == pl.page_size, name, "page_size {} does not match the planned {} (read as kv_layout {})",
                   page_size, pl.page_size, self._kv_layout)
        expect(num_kv_heads == pl.num_kv_heads, name, "num_kv_heads {} does not match the planned {}", num_kv_heads, pl.num_kv_heads)
        expect(head_dim_qk == pl.head_dim_qk, name, "head dim {} does not match the planned {}", head_dim_qk, pl.head_dim_qk)
        expect(head_dim_vo == pl.head_dim_vo, "v" if not self._paged else name,
               "value head dim {} does not match the planned {}", head_dim_vo, pl.head_dim_vo)
        if window_left is not None:
            expect(int(window_left) == pl.window_left, "window_left",
                   "run(window_left={}) differs from the planned {}", window_left, pl.window_left)
        if not torch.compiler.is_compiling():
            expect(q.shape[0] >= pl.total_rows, "q", "has {} rows, the plan needs {}", q.shape[0], pl.total_rows)
        return P.check_lse_base(lse_base)

    def _outputs(self, q, out, lse):
        pl = self._plan
        if out is None and lse is None:
            return None, None
        if out is None:
            out = q.new_empty((q.shape[0], q.shape[1], pl.head_dim_vo), dtype=pl.o_dtype)
        if lse is None:
            lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
        check_out(out, lse, q, pl.head_dim_vo, pl.o_dtype)
        return out, lse

    def _opts(self, q_scale, k_scale, v_scale, lse_ln):
        """The op's option arguments (see ``_Plan`` for why floats come from strings)."""
        pl = self._plan
        sm_scale, soft_cap, rope_scale, rope_theta = (float(x) for x in pl.float_reprs)
        scale = sm_scale * P.scalar_scale(q_scale, "q_scale") * P.scalar_scale(k_scale, "k_scale")
        return (bool(pl.causal), pl.window_left, scale, soft_cap, pl.pos_encoding_mode, rope_scale, rope_theta,
                P.scalar_scale(v_scale, "v_scale"), lse_ln, pl.fixed_config)

    def forward(self, q: torch.Tensor, *args, **kwargs):
        """Deprecated alias of ``run(q, paged_kv_cache)`` / ``run(q, k, v)`` with FlashInfer's
        semantics: its plan-time keywords (``causal``, ``pos_encoding_mode``, ``window_left``,
        ``logits_soft_cap``, ``sm_scale``, ``rope_scale``, ``rope_theta``) replace the plan's, each
        at forward's own default when not given (so ``forward(q, kv)`` after ``plan(causal=True)``
        is not causal, as in FlashInfer), and stay for later runs; run keywords pass through. The
        schedule is kept where it covers the new options (causal or a narrower window only clip
        it) and rebuilt from the plan's page table otherwise. Options after the KV arguments may
        be given positionally, in the order of FlashInfer's ``forward`` for this wrapper
        (``_FORWARD_POSITIONAL``)."""
        return self._forward(q, args, kwargs, False)

    def forward_return_lse(self, q: torch.Tensor, *args, **kwargs):
        """Deprecated alias of ``run(..., return_lse=True)`` (see ``forward``)."""
        return self._forward(q, args, kwargs, True)

    _forward_takes_causal = True
    _FORWARD_KV_ARGS = 1  # paged_kv_cache (the ragged wrapper: k, v)
    # FlashInfer's forward()/forward_return_lse() parameters after the KV arguments, in order
    _FORWARD_POSITIONAL = ("causal", "pos_encoding_mode", "use_fp16_qk_reduction", "k_scale", "v_scale", "window_left",
                           "logits_soft_cap", "sm_scale", "rope_scale", "rope_theta")

    def _forward(self, q, args, kwargs, return_lse):
        if self._plan is None:
            raise RuntimeError(f"{self._name}.forward() called before a successful plan()")
        n = self._FORWARD_KV_ARGS
        kv, rest = args[:n], args[n:]
        names = self._FORWARD_POSITIONAL
        if len(rest) > len(names):
            raise TypeError(f"{self._name}.forward() takes at most {1 + n + len(names)} positional arguments "
                            f"(q, {n} KV, then {', '.join(names)}), got {1 + len(args)}")
        kwargs = dict(kwargs)
        for name, value in zip(names, rest):
            if name in kwargs:
                raise TypeError(f"{self._name}.forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _FORWARD_PLAN_KEYS}
        opts.pop("use_fp16_qk_reduction", None)
        defaults = dict(_FORWARD_DEFAULTS)
        if not self._forward_takes_causal:  # decode: causal follows q_len_per_req
            defaults.pop("causal")
        for key in opts:
            expect(key in defaults, key, "is not an argument of {}.forward()", self._name)
        self._apply_options(**{**defaults, **opts})
        return self.run(q, *kv, return_lse=return_lse, **kwargs)

    def _apply_options(self, *, causal=None, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale,
                       rope_theta):
        """Replace the plan's scalar options (forward()); re-plan when its schedule, clipped by the
        planned causal mask and window, would miss keys the new options need."""
        pl = self._plan
        causal = pl.causal if causal is None else bool(causal)
        window = P.check_window_left(window_left)
        check_pos_encoding_mode(pos_encoding_mode)
        soft = P.check_soft_cap(logits_soft_cap)
        sm = P.resolve_sm_scale(sm_scale, pl.head_dim_qk)
        rs, rt = P.rope_defaults(rope_scale, rope_theta)
        if (pl.causal and not causal) or (pl.window_left >= 0 and not 0 <= window <= pl.window_left):
            self._plan_common(**{**self._replan_args, **dict(
                causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window, logits_soft_cap=logits_soft_cap,
                sm_scale=sm_scale, rope_scale=rope_scale, rope_theta=rope_theta)})
            return
        kw = {k: getattr(pl, k) for k in _Plan.__slots__ if k != "float_reprs"}
        kw.update(causal=causal, pos_encoding_mode=pos_encoding_mode, window_left=window, soft_cap=soft, sm_scale=sm,
                  rope_scale=rs, rope_theta=rt)
        self._plan = _Plan(**kw)
        self._set_flashinfer_attrs(causal, pos_encoding_mode, window, logits_soft_cap, sm_scale, rope_scale, rope_theta)

    def _set_flashinfer_attrs(self, causal, pos_encoding_mode, window_left, logits_soft_cap, sm_scale, rope_scale,
                              rope_theta):
        """The option attributes FlashInfer's wrappers keep, which engines read back (vLLM asserts
        on ``_window_left``, ``_logits_soft_cap``, ``_sm_scale``, ``_causal`` every step)."""
        self._causal = bool(causal)
        self._pos_encoding_mode = pos_encoding_mode
        self._window_left = window_left
        self._logits_soft_cap = 0.0 if logits_soft_cap is None else logits_soft_cap
        self._sm_scale = sm_scale
        self._rope_scale = rope_scale
        self._rope_theta = rope_theta

    def _plan_common(self, qo_h, kv_lens_h, index_tensors, *, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo,
                     page_size, custom_mask, packed_custom_mask, causal, pos_encoding_mode, sm_scale, window_left,
                     logits_soft_cap, rope_scale, rope_theta, q_data_type, kv_data_type, o_data_type,
                     fixed_split_keys, disable_split_kv, nnz_pages=0, index_check=None):
        """Everything a plan does once the CSR is valid on the host: option checks, the schedule,
        the device tensors (``index_tensors(self, up)`` builds or fills the KV index tensors through
        the plan's ``Upload``) and the frozen scalars. Every check runs first (``index_check(self)``:
        the KV index tensors fit their CUDA-graph buffers), so a plan that fails leaves the previous
        plan and its buffers as they were; only then are buffers written."""
        names = self._ARG_NAMES
        if self.device.type == "cuda":  # (before any state changes: a refused plan leaves the last one intact)
            P.check_not_capturing()
        num_qo_heads = P.check_int(num_qo_heads, "num_qo_heads")
        num_kv_heads = P.check_int(num_kv_heads, "num_kv_heads")
        head_dim_qk = P.check_int(head_dim_qk, names["head_dim_qk"])
        head_dim_vo = head_dim_qk if head_dim_vo is None else P.check_int(head_dim_vo, "head_dim_vo")
        soft_cap = P.check_soft_cap(logits_soft_cap)
        rs, rt = P.rope_defaults(rope_scale, rope_theta)
        sm = P.resolve_sm_scale(sm_scale, head_dim_qk)
        check_heads(num_qo_heads, num_kv_heads)
        check_head_dim(head_dim_qk, names["head_dim_qk"])
        check_head_dim(head_dim_vo, "head_dim_vo")
        check_pos_encoding_mode(pos_encoding_mode)
        window = P.check_window_left(window_left)
        q_dt = P.parse_dtype(q_data_type, "q_data_type")
        expect(q_dt is not None, "q_data_type", "must be given (or data_type), got None")
        kv_dt = P.parse_dtype(kv_data_type, "kv_data_type") or q_dt
        expect(kv_dt == q_dt, "kv_data_type", "{} differs from q_data_type {}: q, k and v share one dtype here",
               kv_dt, q_dt)
        o_dt = P.parse_dtype(o_data_type, "o_data_type") or q_dt
        B = qo_h.size - 1
        dev = self.device
        if self._use_cuda_graph:
            expect(B == self._fixed_batch_size, names["batch"],
                   "batch size {} differs from the CUDA-graph batch size {}", B, self._fixed_batch_size)
        has_mask = custom_mask is not None or packed_custom_mask is not None
        block_m, sched, freeze = self._schedule(qo_h, kv_lens_h, num_qo_heads=num_qo_heads,
                                                num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk,
                                                head_dim_vo=head_dim_vo, causal=bool(causal), window_left=window,
                                                has_mask=has_mask, disable_split_kv=disable_split_kv,
                                                fixed_split_keys=fixed_split_keys, dtype=q_dt,
                                                nnz_keys=nnz_pages * page_size if page_size else None,
                                                page_size=page_size)
        packed, mask_indptr = self._mask_tensors(custom_mask, packed_custom_mask, np.diff(qo_h), kv_lens_h)
        if self._use_cuda_graph:
            P.check_fits(self._qo_indptr_buf, qo_h.size, names["batch"])
            if index_check is not None:
                index_check(self)
        # ---- commit: nothing below is expected to fail; if it does, the wrapper is left unplanned
        self._plan = None
        up = P.Upload(dev, self._non_blocking)  # (every int array of the plan, sent in one transfer below)
        if self._use_cuda_graph:
            up.into(self._qo_indptr_buf, qo_h, "qo_indptr")
            qo_t = self._qo_indptr_buf
        else:
            qo_t = up.fresh(qo_h)
        packed, mask_indptr = self._commit_masks(packed, mask_indptr)
        self._set_lists(sched, freeze, up, qo_indptr=qo_t, packed_mask=packed, mask_indptr=mask_indptr,
                        tile=P.tile_tensor(self._tiles, block_m, dev), **index_tensors(self, up))
        up.send()
        self._plan = _Plan(num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk,
                           head_dim_vo=head_dim_vo, page_size=page_size, causal=bool(causal),
                           pos_encoding_mode=pos_encoding_mode, window_left=window, soft_cap=soft_cap,
                           sm_scale=sm, rope_scale=rs, rope_theta=rt,
                           q_dtype=q_dt, kv_dtype=kv_dt, o_dtype=o_dt, block_m=block_m, nnz_pages=nnz_pages,
                           total_rows=int(qo_h[-1]), batch=B,
                           fixed_config=_fixed_config(disable_split_kv, fixed_split_keys))
        self._set_flashinfer_attrs(causal, pos_encoding_mode, window, logits_soft_cap, sm_scale, rope_scale,
                                   rope_theta)
        # forward() re-plans from the same page table when new options need keys this schedule skips
        # (data and wrapper-free closures only: a bound method here would keep the wrapper alive)
        self._replan_args = dict(
            qo_h=qo_h, kv_lens_h=kv_lens_h, index_tensors=index_tensors, num_qo_heads=num_qo_heads,
            num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, page_size=page_size,
            custom_mask=custom_mask, packed_custom_mask=packed_custom_mask, causal=causal,
            pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale, window_left=window_left,
            logits_soft_cap=logits_soft_cap, rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
            kv_data_type=kv_data_type, o_data_type=o_data_type, fixed_split_keys=fixed_split_keys,
            disable_split_kv=disable_split_kv, nnz_pages=nnz_pages, index_check=index_check)
        if not self._use_cuda_graph:  # FlashInfer keeps the planned device index tensors here too
            self._qo_indptr_buf = qo_t
            if self._paged:
                self._paged_kv_indptr_buf, self._paged_kv_indices_buf = self._t.kv_indptr, self._t.kv_indices
            else:
                self._kv_indptr_buf = self._t.kv_indptr

    def _plan_paged(self, qo_h, kv_indptr_h, kv_lens_h, kv_indices, last_page_len, *, page_size, fixed_split_size,
                    **options):
        """Plan over a page table (shared by the paged prefill and the decode wrappers), once
        ``validate_paged_csr`` has checked it: ``page_size`` is an int >= 1 here."""
        names = self._ARG_NAMES

        # (these take the wrapper as an argument: kept for forward()'s re-plan, they must not hold it)
        def index_tensors(w, up):
            if not w._use_cuda_graph:
                return dict(kv_indptr=up.fresh(kv_indptr_h),
                            kv_indices=up.fresh(kv_indices, P.MIN_LIST_ROWS, copy=True),
                            kv_lens=up.fresh(kv_lens_h, P.MIN_LIST_ROWS))
            up.into(w._paged_kv_indptr_buf, kv_indptr_h, "paged_kv_indptr")
            up.into(w._paged_kv_indices_buf, kv_indices, "paged_kv_indices")
            up.into(w._paged_kv_last_page_len_buf, last_page_len, "paged_kv_last_page_len")
            if w._kv_lens_buf is None:
                w._kv_lens_buf = torch.zeros(max(kv_lens_h.size, P.MIN_LIST_ROWS), dtype=torch.int32, device=up.device)
            up.into(w._kv_lens_buf, kv_lens_h, "kv_lens")
            return dict(kv_indptr=w._paged_kv_indptr_buf, kv_indices=w._paged_kv_indices_buf, kv_lens=w._kv_lens_buf)

        def index_check(w):
            P.check_fits(w._paged_kv_indptr_buf, kv_indptr_h.size, names["kv_indptr"])
            P.check_fits(w._paged_kv_indices_buf, kv_indices.numel(), names["kv_indices"])
            P.check_fits(w._paged_kv_last_page_len_buf, last_page_len.size, names["last_page_len"])

        fixed_split_size = _fixed_split(fixed_split_size)
        fixed_keys = None if fixed_split_size is None else fixed_split_size * page_size
        self._plan_common(qo_h, kv_lens_h, index_tensors, page_size=page_size, fixed_split_keys=fixed_keys,
                          nnz_pages=int(kv_indptr_h[-1]), index_check=index_check, **options)
        self._gather = None
        if not self._use_cuda_graph and not self._plan.fixed_config and \
                _gather_pays(qo_h, kv_lens_h, bool(options.get("causal")), self._plan):
            self._gather = _gather_rows(kv_lens_h, page_size, self._t, self.device, self._non_blocking)

    def _run_paged(self, q, paged_kv_cache, window_left, reserved, lse_base, q_scale, k_scale, v_scale, out, lse,
                   return_lse, check_q=None):
        """run() of the paged wrappers: validate against the plan, then launch the op."""
        kv = _unpack_paged_kv_cache(paged_kv_cache, self._kv_layout)
        lse_ln = self._check_run(q, kv.k.dtype, kv.page_size, kv.num_kv_heads, kv.head_dim, kv.head_dim_vo,
                                 window_left, reserved, lse_base)
        expect(kv.k.device == q.device, "paged_kv_cache", "on {}, q is on {}", kv.k.device, q.device)
        if check_q is not None:
            check_q(q)
        self._checked_page_ids(kv)
        t, pl = self._tensors(), self._plan
        opts = self._opts(q_scale, k_scale, v_scale, lse_ln)
        if self._gather is not None:  # contiguous copies of the planned K/V rows, ragged kernel
            k, v = _gather_kv(kv, self._kv_layout, self._gather)
            args = (q, k, v, t.work, t.split_work, t.merge, t.qo_indptr, self._gather.kv_indptr,
                    t.packed_mask, t.mask_indptr, t.tile.shape[0], *opts)
            functional, out_op = attn_ops.ragged_attention_op, attn_ops.ragged_attention_out_op
        else:
            args = (q, kv.op_args[0], kv.op_args[1], self._kv_layout, t.work, t.split_work, t.merge, t.qo_indptr,
                    t.kv_indptr, t.kv_indices, t.kv_lens, t.packed_mask, t.mask_indptr, t.tile.shape[0], *opts)
            functional, out_op = attn_ops.paged_attention_op, attn_ops.paged_attention_out_op
        out, lse = self._outputs(q, out, lse)
        if out is None:
            out, lse = functional(*args, pl.o_dtype)
        else:
            out_op(*args, out, lse)
        return (out, lse) if return_lse else out

    def _checked_page_ids(self, kv):
        if checks_enabled() and self._paged:
            n = self._plan.nnz_pages
            check_range_values(self._tensors().kv_indices[:n], self._ARG_NAMES["kv_indices"], 0, kv.num_pages)




def _gather_pays(qo_h: np.ndarray, kv_lens_h: np.ndarray, causal: bool, plan: "_Plan") -> bool:
    """Whether a paged plan should attend through gathered K/V (``PAGED_GATHER_*`` above)."""
    qo = np.diff(qo_h)
    if qo.max(initial=0) < PAGED_GATHER_MIN_ROWS_PER_KEY:  # (rows per key <= the longest request's rows: decode)
        return False
    qo = qo.astype(np.float64)
    kv = kv_lens_h.astype(np.float64)
    n_keys = float(kv.sum())
    if n_keys == 0:
        return False
    pairs = qo * kv - (qo * (qo - 1) / 2 if causal else 0.0)  # causal: bottom-right triangle
    elem = plan.kv_dtype.itemsize
    scratch = n_keys * plan.num_kv_heads * (plan.head_dim_qk + plan.head_dim_vo) * elem
    return float(pairs.clip(min=0).sum()) / n_keys >= PAGED_GATHER_MIN_ROWS_PER_KEY and scratch <= PAGED_GATHER_MAX_BYTES


class _GatherRows(NamedTuple):
    """Index tensors of the gathered-K/V path, built once at plan() (int64, keys in request
    order), so run() pays one ``gather_paged_kv`` launch (K and V together). A page id
    outside the cache reads page 0, as the paged kernel does."""

    page: torch.Tensor       # [N] page id of every planned key
    slot: torch.Tensor       # [N] its slot in the page
    kv_indptr: torch.Tensor  # int32 [B+1] token CSR of the gathered rows


def _gather_kv(kv, kv_layout: str, g: _GatherRows) -> Tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[N, H, D]`` copies of K and V at the planned ``(page, slot)``s, for any
    cache form and layout: one Triton gather (``flashops::gather_paged_kv``). It replaced a
    guard plus an ``index_select`` per tensor for contiguous NHD caches (H200, 2026-12-04,
    bf16, 4 x 4096 keys, 8 KV heads, D=128, 5-D NHD cache: 47.6-51.1 us against 48.9 us, a
    tie) and advanced indexing of the 4-D views for the other forms (HND, strided)."""
    k_raw, v_raw = kv.op_args
    return page_ops.gather_paged_kv(k_raw, v_raw, kv_layout, g.page, g.slot)


def _gather_rows(kv_lens_h: np.ndarray, page_size: int, t: "P.PlanTensors", device,
                 non_blocking: bool = True) -> _GatherRows:
    """The ``_GatherRows`` of a plan: ``get_batch_indices_positions`` over the whole sequences
    gives each key's request and position; page ids come from the device page table (no host
    sync)."""
    B = kv_lens_h.size
    tok_indptr = P.device_int32(np.concatenate([[0], np.cumsum(kv_lens_h.astype(np.int64))]), device,
                                non_blocking=non_blocking)
    req, pos = get_batch_indices_positions(tok_indptr, t.kv_lens[:B], int(kv_lens_h.sum()))
    page = t.kv_indices.index_select(0, t.kv_indptr.index_select(0, req) + pos // page_size).long()
    return _GatherRows(page, (pos % page_size).long(), tok_indptr)


class BatchPrefillWithPagedKVCacheWrapper(_BatchAttention):
    """Batch prefill (append) attention over a paged KV cache (FlashInfer-compatible).

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        uint8/int8 byte buffer, 16-byte aligned (128 MiB recommended). Its size bounds the
        split-KV partial states of a plan (the scratch itself is allocated per run).
    kv_layout : str
        ``"NHD"`` or ``"HND"``.
    use_cuda_graph : bool
        Freeze the batch size and list sizes so ``run()`` can be replayed from a CUDA graph;
        then ``qo_indptr_buf``, ``paged_kv_indptr_buf`` (int32 ``[B+1]``),
        ``paged_kv_indices_buf`` and ``paged_kv_last_page_len_buf`` (int32 ``[B]``) are required,
        and ``custom_mask_buf`` (uint8) / ``mask_indptr_buf`` (int32 ``[B+1]``) for masks.
    backend : str
        ``"auto"``, ``"fa2"``, ``"fa3"``, ``"trtllm-gen"`` (FlashInfer's names) or ``"triton"``: all
        run our Triton kernel.
    jit_args, jit_kwargs : None
        Reserved (``NotImplementedError``).

    Notes
    -----
    Long prefills (at least ``PAGED_GATHER_MIN_ROWS_PER_KEY`` = 1024 visible query rows per
    key, e.g. a causal 4k-token chunk) outside CUDA-graph mode copy the planned K/V rows into
    contiguous scratch at ``run()`` (at most ``PAGED_GATHER_MAX_BYTES`` = 1 GiB, allocated per
    run) and attend with the ragged kernel: the copy costs a few percent of such a run and
    the paged kernel's page-table lookups cost about a fifth (H100, causal B=4 x 4096: 381
    TFLOP/s = 1.16x SDPA flash, against 0.98x in place). Results equal the in-place path's.
    The choice is made at ``plan()`` and is a Python branch in ``run()``: a compiled ``run()``
    whose plans cross that line keeps two graphs, one per path (every other re-plan reuses one).
    """

    _EXTRA_BACKENDS = ("trtllm-gen",)
    _name = "BatchPrefillWithPagedKVCacheWrapper"

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, paged_kv_indptr_buf: Optional[torch.Tensor] = None,
                 paged_kv_indices_buf: Optional[torch.Tensor] = None,
                 paged_kv_last_page_len_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args: Optional[Any] = None, jit_kwargs: Optional[Any] = None) -> None:
        self._init_common(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args, jit_kwargs)
        self._custom_mask_buf, self._mask_indptr_buf = custom_mask_buf, mask_indptr_buf
        if self._use_cuda_graph:
            _check_graph_buf(paged_kv_last_page_len_buf, "paged_kv_last_page_len_buf")
            B = paged_kv_last_page_len_buf.shape[0]
            _check_graph_buf(qo_indptr_buf, "qo_indptr_buf", B + 1)
            _check_graph_buf(paged_kv_indptr_buf, "paged_kv_indptr_buf", B + 1)
            _check_graph_buf(paged_kv_indices_buf, "paged_kv_indices_buf")
            _check_mask_bufs(custom_mask_buf, mask_indptr_buf, B)
            self._fixed_batch_size = B
        self._qo_indptr_buf = qo_indptr_buf
        self._paged_kv_indptr_buf = paged_kv_indptr_buf
        self._paged_kv_indices_buf = paged_kv_indices_buf
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len_buf

    @P.host_only
    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor, paged_kv_indices: torch.Tensor,
             paged_kv_last_page_len: torch.Tensor, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             page_size: int, head_dim_vo: Optional[int] = None, custom_mask: Optional[torch.Tensor] = None,
             packed_custom_mask: Optional[torch.Tensor] = None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type: Union[str, torch.dtype] = "float16",
             kv_data_type: Optional[Union[str, torch.dtype]] = None,
             o_data_type: Optional[Union[str, torch.dtype]] = None, non_blocking: bool = True,
             prefix_len_ptr: Optional[torch.Tensor] = None, token_pos_in_items_ptr: Optional[torch.Tensor] = None,
             token_pos_in_items_len: int = 0, max_item_len_ptr: Optional[torch.Tensor] = None,
             seq_lens: Optional[torch.Tensor] = None, seq_lens_q: Optional[torch.Tensor] = None,
             block_tables: Optional[torch.Tensor] = None, max_token_per_sequence: Optional[int] = None,
             max_sequence_kv: Optional[int] = None, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False) -> None:
        """Plan attention for a batch: ``qo_indptr [B+1]`` (append lengths), the page table
        ``paged_kv_indptr [B+1]``, ``paged_kv_indices [>= indptr[-1]]``,
        ``paged_kv_last_page_len [B]`` (int32, host or device), heads, dims, page size and the
        options (see the class docstring and spec §5). Host code; not for compiled regions."""
        self._non_blocking = bool(non_blocking)
        P.reject(prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                 token_pos_in_items_len=token_pos_in_items_len or None, max_item_len_ptr=max_item_len_ptr,
                 seq_lens=seq_lens, seq_lens_q=seq_lens_q, block_tables=block_tables,
                 max_token_per_sequence=max_token_per_sequence, max_sequence_kv=max_sequence_kv)
        qo_h = P.to_host_int(qo_indptr, "qo_indptr")
        kv_indptr_h = P.to_host_int(paged_kv_indptr, "paged_kv_indptr")
        last_h = P.to_host_int(paged_kv_last_page_len, "paged_kv_last_page_len")
        P.check_indptr(kv_indptr_h, "paged_kv_indptr", indexes=("paged_kv_indices",))
        B = kv_indptr_h.size - 1  # (the page table's batch; qo_indptr and last_page_len must agree)
        P.validate_qo_indptr(qo_h, B)
        P.check_page_ids(paged_kv_indices, "paged_kv_indices")
        page_size = P.check_int(page_size, "page_size")
        kv_lens_h = P.validate_paged_csr(kv_indptr_h, last_h, paged_kv_indices.shape[0], page_size)
        self._plan_paged(qo_h, kv_indptr_h, kv_lens_h, paged_kv_indices, last_h,
                         num_qo_heads=num_qo_heads, num_kv_heads=num_kv_heads, head_dim_qk=head_dim_qk,
                         head_dim_vo=head_dim_vo, page_size=page_size, custom_mask=custom_mask,
                         packed_custom_mask=packed_custom_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
                         sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
                         rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                         kv_data_type=kv_data_type, o_data_type=o_data_type, fixed_split_size=fixed_split_size,
                         disable_split_kv=disable_split_kv)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, *args, q_scale: Optional[float] = None,
            k_scale: Optional[float] = None, v_scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
            lse: Optional[torch.Tensor] = None, return_lse: bool = False, enable_pdl: Optional[bool] = None,
            window_left: Optional[int] = None, sinks: Optional[torch.Tensor] = None,
            kv_cache_sf: Optional[torch.Tensor] = None, skip_softmax_threshold_scale_factor: Optional[float] = None,
            use_fp16_softmax: Optional[bool] = None, uses_spcompress: Optional[bool] = None,
            lse_base: str = "log2") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``q [R, num_qo_heads, head_dim_qk]`` (``R >= qo_indptr[-1]``) over the
        planned pages of ``paged_kv_cache`` (5-D tensor or ``(k_cache, v_cache)``, layout as at
        init). Returns ``o [R, num_qo_heads, head_dim_vo]`` (the planned ``o_data_type``) and,
        with ``return_lse``, the fp32 ``lse [R, num_qo_heads]`` (base 2, or e with
        ``lse_base="ln"``). ``out``/``lse`` are written in place when given."""
        reserved = dict(args=args or None, sinks=sinks, kv_cache_sf=kv_cache_sf,
                        skip_softmax_threshold_scale_factor=skip_softmax_threshold_scale_factor,
                        use_fp16_softmax=use_fp16_softmax or None, uses_spcompress=uses_spcompress or None)
        return self._run_paged(q, paged_kv_cache, window_left, reserved, lse_base, q_scale, k_scale, v_scale, out,
                               lse, return_lse)

    run_return_lse = _return_lse_alias(run)



class BatchPrefillWithRaggedKVCacheWrapper(_BatchAttention):
    """Batch prefill attention over ragged (contiguous, per-request) K/V (FlashInfer-compatible).

    Parameters
    ----------
    float_workspace_buffer : torch.Tensor
        uint8/int8 byte buffer, 16-byte aligned; bounds the split-KV partial states.
    kv_layout : str
        ``"NHD"`` (k/v ``[rows, H_kv, D]``) or ``"HND"`` (``[H_kv, rows, D]``, read as a strided
        view; vLLM's DCP prefill passes its cache layout here).
    use_cuda_graph : bool
        Freeze sizes for CUDA-graph replay; needs ``qo_indptr_buf`` and ``kv_indptr_buf``
        (int32 ``[B+1]``), and ``custom_mask_buf``/``mask_indptr_buf`` for masks.
    backend : str
        ``"auto"``, ``"fa2"``, ``"fa3"``, ``"cute-dsl"`` (FlashInfer's names) or ``"triton"``: all run
        our Triton kernel (FlashInfer's ``"cutlass"`` and ``"cudnn"`` are refused).
    """

    _EXTRA_BACKENDS = ("cute-dsl",)
    _paged = False
    _name = "BatchPrefillWithRaggedKVCacheWrapper"
    _FORWARD_KV_ARGS = 2  # k, v
    _FORWARD_POSITIONAL = ("causal", "pos_encoding_mode", "use_fp16_qk_reduction", "window_left", "logits_soft_cap",
                           "sm_scale", "rope_scale", "rope_theta")

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf: Optional[torch.Tensor] = None, kv_indptr_buf: Optional[torch.Tensor] = None,
                 custom_mask_buf: Optional[torch.Tensor] = None, mask_indptr_buf: Optional[torch.Tensor] = None,
                 backend: str = "auto", jit_args: Optional[Any] = None, jit_kwargs: Optional[Any] = None) -> None:
        self._init_common(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args, jit_kwargs)
        self._custom_mask_buf, self._mask_indptr_buf = custom_mask_buf, mask_indptr_buf
        if self._use_cuda_graph:
            _check_graph_buf(qo_indptr_buf, "qo_indptr_buf")
            B = qo_indptr_buf.shape[0] - 1
            _check_graph_buf(kv_indptr_buf, "kv_indptr_buf", B + 1)
            _check_mask_bufs(custom_mask_buf, mask_indptr_buf, B)
            self._fixed_batch_size = B
        self._qo_indptr_buf = qo_indptr_buf
        self._kv_indptr_buf = kv_indptr_buf

    @P.host_only
    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int, num_kv_heads: int,
             head_dim_qk: int, head_dim_vo: Optional[int] = None, custom_mask: Optional[torch.Tensor] = None,
             packed_custom_mask: Optional[torch.Tensor] = None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, window_left: int = -1, logits_soft_cap: Optional[float] = None,
             sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type: Union[str, torch.dtype] = "float16",
             kv_data_type: Optional[Union[str, torch.dtype]] = None,
             o_data_type: Optional[Union[str, torch.dtype]] = None, non_blocking: bool = True,
             prefix_len_ptr: Optional[torch.Tensor] = None, token_pos_in_items_ptr: Optional[torch.Tensor] = None,
             token_pos_in_items_len: int = 0, max_item_len_ptr: Optional[torch.Tensor] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False,
             seq_lens: Optional[torch.Tensor] = None, seq_lens_q: Optional[torch.Tensor] = None,
             max_token_per_sequence: Optional[int] = None, max_sequence_kv: Optional[int] = None,
             v_indptr: Optional[torch.Tensor] = None, o_indptr: Optional[torch.Tensor] = None) -> None:
        """Plan attention for ``qo_indptr [B+1]`` query rows against ``kv_indptr [B+1]`` K/V rows
        (int32, host or device); options as spec §6. Host code; not for compiled regions."""
        self._non_blocking = bool(non_blocking)
        P.reject(prefix_len_ptr=prefix_len_ptr, token_pos_in_items_ptr=token_pos_in_items_ptr,
                 token_pos_in_items_len=token_pos_in_items_len or None, max_item_len_ptr=max_item_len_ptr,
                 seq_lens=seq_lens, seq_lens_q=seq_lens_q, max_token_per_sequence=max_token_per_sequence,
                 max_sequence_kv=max_sequence_kv, v_indptr=v_indptr, o_indptr=o_indptr)
        qo_h = P.to_host_int(qo_indptr, "qo_indptr")
        kv_h = P.to_host_int(kv_indptr, "kv_indptr")
        P.validate_qo_indptr(qo_h, qo_h.size - 1)
        P.check_indptr(kv_h, "kv_indptr", qo_h.size, indexes=("k", "v"))
        kv_lens = np.diff(kv_h)

        def index_tensors(w, up):  # (the wrapper as an argument: see _plan_paged)
            if w._use_cuda_graph:
                up.into(w._kv_indptr_buf, kv_h, "kv_indptr")
                return dict(kv_indptr=w._kv_indptr_buf, kv_indices=None, kv_lens=None)
            return dict(kv_indptr=up.fresh(kv_h), kv_indices=None, kv_lens=None)

        def index_check(w):
            P.check_fits(w._kv_indptr_buf, kv_h.size, "kv_indptr")

        self._plan_common(qo_h, kv_lens, index_tensors, index_check=index_check, num_qo_heads=num_qo_heads,
                          num_kv_heads=num_kv_heads,
                          head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, page_size=None, custom_mask=custom_mask,
                          packed_custom_mask=packed_custom_mask, causal=causal, pos_encoding_mode=pos_encoding_mode,
                          sm_scale=sm_scale, window_left=window_left, logits_soft_cap=logits_soft_cap,
                          rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q_data_type,
                          kv_data_type=kv_data_type, o_data_type=o_data_type, fixed_split_keys=_fixed_split(fixed_split_size),
                          disable_split_kv=disable_split_kv)
        self._total_kv_rows = int(kv_h[-1])

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, q_scale: Optional[float] = None,
            k_scale: Optional[float] = None, v_scale: Optional[float] = None, o_scale: Optional[float] = None,
            out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None, return_lse: bool = False,
            enable_pdl: Optional[bool] = None, kv_cache_sf: Optional[torch.Tensor] = None,
            lse_base: str = "log2") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Attention of ``q [R, num_qo_heads, head_dim_qk]`` over ``k [kv_indptr[-1], num_kv_heads,
        head_dim_qk]`` and ``v [kv_indptr[-1], num_kv_heads, head_dim_vo]`` (strided views allowed;
        ``kv_layout="HND"``: ``[num_kv_heads, kv_indptr[-1], head_dim]``). Returns ``o [R,
        num_qo_heads, head_dim_vo]`` and, with ``return_lse``, ``lse [R, num_qo_heads]``."""
        check_tensor(k, "k", ndim=3)
        check_tensor(v, "v", ndim=3)
        reject_fp8(k, "k")
        reject_fp8(v, "v")
        if self._kv_layout == "HND":
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        expect(v.shape[0] == k.shape[0] and v.shape[1] == k.shape[1], "v",
               "shape {} does not match k's {} in rows and heads", tuple(v.shape), tuple(k.shape))
        expect(v.dtype == k.dtype, "v", "dtype {} does not match k's {}", v.dtype, k.dtype)
        lse_ln = self._check_run(q, k.dtype, None, k.shape[1], k.shape[2], v.shape[2], None,
                                 dict(args=args or None, o_scale=o_scale, kv_cache_sf=kv_cache_sf), lse_base)
        if not torch.compiler.is_compiling():
            expect(k.shape[0] >= self._total_kv_rows, "k",
                   "has {} rows, kv_indptr[-1] is {}", k.shape[0], self._total_kv_rows)
        t, pl = self._tensors(), self._plan
        a = (q, k, v, t.work, t.split_work, t.merge, t.qo_indptr, t.kv_indptr, t.packed_mask, t.mask_indptr,
             t.tile.shape[0], *self._opts(q_scale, k_scale, v_scale, lse_ln))
        out, lse = self._outputs(q, out, lse)
        if out is None:
            out, lse = attn_ops.ragged_attention_op(*a, pl.o_dtype)
        else:
            attn_ops.ragged_attention_out_op(*a, out, lse)
        return (out, lse) if return_lse else out

    run_return_lse = _return_lse_alias(run)



# ----------------------------------------------------------------------------- self-check
from ._selfcheck import CheckResult, max_abs_err, selfcheck  # noqa: E402


@selfcheck("attention")
def _attention_selfcheck(device) -> list:
    """Each attention op on a small random batch (bf16, GQA 4:2) against the fp64 oracle."""
    from .reference.attention import ref_attention

    g = torch.Generator().manual_seed(0)
    dt, Hq, Hkv, D, page = torch.bfloat16, 4, 2, 64, 5
    bf = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    out = []
    ws = torch.empty(1 << 22, dtype=torch.uint8, device=device)
    # single prefill (causal) and decode (long enough to split)
    for qo, kv, name in ((7, 40, "single_attention"), (1, 600, "single_attention")):
        q, k, v = bf(qo, Hq, D), bf(kv, Hkv, D), bf(kv, Hkv, D)
        o, lse = single_prefill_with_kv_cache(q.to(device), k.to(device), v.to(device), causal=True, return_lse=True)
        ro, rl = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), [0, qo], [0, kv], torch.arange(kv), [1], causal=True)
        out.append(CheckResult(name, max(max_abs_err(o, ro.to(dt)), max_abs_err(lse, rl) * 1e-1), 2e-2,
                               note=f"qo={qo} kv={kv} causal bf16"))
    # paged prefill and decode over one page table
    kv_lens = [9, 0, 33, 120]
    npg = [(n + page - 1) // page for n in kv_lens]
    indptr = torch.tensor([0] + torch.tensor(npg).cumsum(0).tolist(), dtype=torch.int32)
    P = int(indptr[-1]) + 2
    indices = torch.randperm(P, generator=g)[: int(indptr[-1])].int()
    last = torch.tensor([(n - 1) % page + 1 if n else 0 for n in kv_lens], dtype=torch.int32)
    cache = bf(P, 2, page, Hkv, D)
    for qo_lens, name in (([3, 2, 5, 1], "paged_attention"), ([1, 1, 1, 1], "paged_attention_out")):
        qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
        q = bf(int(qo_indptr[-1]), Hq, D)
        w = BatchPrefillWithPagedKVCacheWrapper(ws)
        w.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, page, causal=True, q_data_type=dt)
        o = torch.full((q.shape[0], Hq, D), float("nan"), dtype=dt, device=device) if name.endswith("_out") else None
        o = w.run(q.to(device), cache.to(device), out=o)
        ro, rl = ref_attention(q, cache[:, 0], cache[:, 1], qo_indptr, indptr, indices, last, causal=True)
        out.append(CheckResult(name, max_abs_err(o, ro.to(dt)), 2e-2, note=f"qo_lens={qo_lens} page={page} bf16"))
    # ragged prefill
    qi = torch.tensor([0, 4, 9], dtype=torch.int32)
    ki = torch.tensor([0, 20, 26], dtype=torch.int32)
    q, k, v = bf(9, Hq, D), bf(26, Hkv, D), bf(26, Hkv, D)
    w = BatchPrefillWithRaggedKVCacheWrapper(ws)
    w.plan(qi, ki, Hq, Hkv, D, causal=True, q_data_type=dt)
    ro, _ = ref_attention(q, k.unsqueeze(1), v.unsqueeze(1), qi, ki, torch.arange(26), [1, 1], causal=True)
    for name in ("ragged_attention", "ragged_attention_out"):
        o = torch.full((9, Hq, D), float("nan"), dtype=dt, device=device) if name.endswith("_out") else None
        o = w.run(q.to(device), k.to(device), v.to(device), out=o)
        out.append(CheckResult(name, max_abs_err(o, ro.to(dt)), 2e-2, note="causal bf16"))
    return out
