"""Mixture-of-Experts layer compute (spec/moe.md §3-§7): grouped GEMM, ``silu_and_mul`` (and
FlashInfer's ``gelu_and_mul`` / ``gelu_tanh_and_mul``), ``moe_sum``, the whole-layer
``fused_moe`` and FlashInfer's ``cutlass_fused_moe`` name.

The contract is vLLM/SGLang's: ``w1 [E, 2I, H]`` is ``[gate; up]``, ``w2 [E, H, I]``, ids of -1
are skipped pairs. Routing (``topk_softmax``, ``grouped_topk``...) and ``moe_align_block_size``
are in ``torch_flashops.moe_routing``.

``torch_flashops.fused_moe`` is this module (FlashInfer's ``flashinfer.fused_moe`` is a module);
the vLLM-style layer function is ``torch_flashops.fused_moe.fused_moe``.
"""
from __future__ import annotations

import enum
import sys as _sys
from typing import List, Optional

import torch

from . import _config
from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_range_values, check_tensor, check_writable, expect, is_int, is_number
from ._selfcheck import CheckResult, max_abs_err, selfcheck
from .ops import moe as ops
# FlashInfer keeps these routing entry points in flashinfer.fused_moe as well.
from .moe_routing import RoutingMethodType, fused_topk_deepseek  # noqa: F401

__all__ = ["fused_moe", "moe_grouped_gemm", "silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "moe_sum",
           "cutlass_fused_moe", "ActivationType",
           "RoutingMethodType", "fused_topk_deepseek"]

_MOE_DTYPES = FLOAT_DTYPES  # bf16, fp16; fp32 for CPU tests


def _static_float(v, name: str = "routed_scaling_factor") -> float:
    """The scale as a float, None meaning 1.0 (SGLang's default), and the default 1.0 as a
    literal: torch.compile turns a float *default argument* into a symbolic float, which makes
    Inductor restart the whole trace (seen on torch 2.13)."""
    if v is None:
        return 1.0
    expect(is_number(v), name, "must be a number or None, got {!r}", v)
    if v == 1.0:
        return 1.0
    return v if isinstance(v, (torch.SymFloat, torch.SymInt)) else float(v)


def _check_routing(topk_weights, topk_ids, T, device):
    check_tensor(topk_ids, "topk_ids", ndim=2, dtypes=INDEX_DTYPES, device=device, last_contiguous=False)
    check_tensor(topk_weights, "topk_weights", ndim=2, dtypes=FLOAT_DTYPES, device=device, last_contiguous=False)
    expect(topk_weights.shape == topk_ids.shape, "topk_weights",
        lambda: f"shape {tuple(topk_weights.shape)} does not match topk_ids {tuple(topk_ids.shape)}")
    expect(topk_ids.shape[0] == T, "topk_ids", lambda: f"has {topk_ids.shape[0]} rows, expected one per token ({T})")


def fused_moe(
    hidden_states: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    apply_router_weight_on_input: bool = False,
    routed_scaling_factor: Optional[float] = 1.0,
    expert_map: Optional[torch.Tensor] = None,
    global_num_experts: int = -1,
) -> torch.Tensor:
    """The routed-experts part of an MoE layer: ``out[t] = rsf * sum_j w[t,j] * y_{id[t,j]}(x_t)``
    with ``y_e(x) = w2[e] @ silu_and_mul(w1[e] @ x)``, as one opaque op.

    Parameters
    ----------
    hidden_states : torch.Tensor
        ``[T, H]``, bf16 / fp16 (fp32 on CPU), ``stride(-1) == 1`` (row stride free).
    w1 : torch.Tensor
        ``[E, 2I, H]``, rows ``[0, I)`` gate_proj, ``[I, 2I)`` up_proj; x's dtype; last dim
        contiguous. ``E`` is the local expert count.
    w2 : torch.Tensor
        ``[E, H, I]`` down_proj; x's dtype; last dim contiguous.
    topk_weights : torch.Tensor
        ``[T, k]`` routing weights, fp32 (16-bit accepted).
    topk_ids : torch.Tensor
        ``[T, k]`` expert ids in ``[-1, global_num_experts)``, int32 (int64 accepted); -1
        skips the pair (CUDA-graph padding rows).
    activation : str
        ``"silu"`` only; anything else raises ``NotImplementedError`` (reserved).
    apply_router_weight_on_input : bool
        Llama 4: scale the input by the weight instead of the output; needs ``k == 1``.
    routed_scaling_factor : float or None
        Multiplies the output (put it here or in the routing weights, never both); None means 1.
    expert_map : torch.Tensor, optional
        ``[global_num_experts]`` int32, global id -> local id or -1 (expert not on this rank:
        the pair contributes 0).
    global_num_experts : int
        ``-1`` means ``expert_map.numel()`` with a map, else ``E``.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in x's dtype, a new tensor (never ``hidden_states``). ``T == 0`` gives
        ``[0, H]``. Checked mode also validates id and map values.
    """
    return _fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                      routed_scaling_factor, expert_map, global_num_experts)


def _fused_moe(hidden_states, w1, w2, topk_weights, topk_ids, activation="silu", apply_router_weight_on_input=False,
               routed_scaling_factor=1.0, expert_map=None, global_num_experts=-1, w1_up_first=False):
    """``fused_moe``'s checks and op call; ``w1_up_first``: w1 is ``[up; gate]`` (FlashInfer's
    CUTLASS order, ``cutlass_fused_moe``), read in place."""
    x = hidden_states
    if activation != "silu":
        raise NotImplementedError(f"activation {activation!r} is not implemented (only 'silu')")
    check_tensor(x, "hidden_states", ndim=2, dtypes=_MOE_DTYPES)
    dev = x.device
    T, H = x.shape
    for w, name in ((w1, "w1"), (w2, "w2")):
        check_tensor(w, name, ndim=3, device=dev)
        expect(w.dtype == x.dtype, name, "dtype {} must match hidden_states' {}", w.dtype, x.dtype)
    E = w1.shape[0]
    expect(w1.shape[2] == H and w1.shape[1] % 2 == 0 and w1.shape[1] > 0, "w1",
             lambda: f"shape {tuple(w1.shape)} must be [E, 2I, H] with H = {H}")
    I = w1.shape[1] // 2
    expect(tuple(w2.shape) == (E, H, I), "w2", lambda: f"shape {tuple(w2.shape)} must be [E, H, I] = {(E, H, I)}")
    _check_routing(topk_weights, topk_ids, T, dev)
    k = topk_ids.shape[1]
    expect(k >= 1, "topk_ids", lambda: "needs at least one column (k >= 1)")
    expect(not apply_router_weight_on_input or k == 1, "apply_router_weight_on_input", lambda: f"needs k == 1, got k = {k}")
    if expert_map is not None:
        check_tensor(expert_map, "expert_map", ndim=1, dtypes=INDEX_DTYPES, device=dev)
        if global_num_experts == -1:
            global_num_experts = expert_map.numel()
        expect(expert_map.numel() == global_num_experts, "expert_map",
            lambda: f"has {expert_map.numel()} entries, expected global_num_experts = {global_num_experts}")
    else:
        if global_num_experts == -1:
            global_num_experts = E
        expect(global_num_experts == E, "global_num_experts",
            lambda: f"{global_num_experts} must equal w1.shape[0] = {E} without an expert_map")
    if _config.checks_enabled():
        check_range_values(topk_ids, "topk_ids", -1, global_num_experts)
        if expert_map is not None:
            check_range_values(expert_map, "expert_map", -1, E)
    return ops.fused_moe(x, w1, w2, topk_weights, topk_ids, activation, apply_router_weight_on_input,
                         _static_float(routed_scaling_factor), expert_map, global_num_experts, bool(w1_up_first))


def moe_grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    block_size: int,
    top_k: int,
    topk_weights: Optional[torch.Tensor] = None,
    mul_routed_weight: bool = False,
) -> torch.Tensor:
    """Grouped GEMM over aligned blocks: ``c[i] = a[i // top_k] @ w[e].T`` (times
    ``topk_weights.flat[i]`` if ``mul_routed_weight``) for every slot ``i`` of a block with
    expert ``e >= 0``; ``c[i] = 0`` for slots of blocks with expert -1.

    Parameters
    ----------
    a : torch.Tensor
        ``[M, K]`` bf16 / fp16 (fp32 on CPU), ``stride(-1) == 1``.
    w : torch.Tensor
        ``[E_local, N, K]``, a's dtype, last dim contiguous.
    sorted_token_ids, expert_ids, num_tokens_post_pad : torch.Tensor
        int32 outputs of ``moe_align_block_size`` for ``numel = M * top_k`` pairs and this
        ``block_size``: ``[max_num_tokens_padded]``, ``[cdiv(max_num_tokens_padded,
        block_size)]``, ``[1]`` (device scalar).
    block_size : int
        16, 32, 64, 128 or 256 (the GEMM's BLOCK_M).
    top_k : int
        Rows are gathered as ``a[i // top_k]``.
    topk_weights : torch.Tensor, optional
        ``numel`` routing weights (fp32; 16-bit accepted), needed with ``mul_routed_weight``.

    Returns
    -------
    torch.Tensor
        ``[M * top_k, N]`` in a's dtype.
    """
    check_tensor(a, "a", ndim=2, dtypes=_MOE_DTYPES)
    dev = a.device
    check_tensor(w, "w", ndim=3, device=dev)
    expect(w.dtype == a.dtype, "w", "dtype {} must match a's {}", w.dtype, a.dtype)
    expect(w.shape[2] == a.shape[1], "w", lambda: f"shape {tuple(w.shape)}: last dim must equal a's K = {a.shape[1]}")
    expect(block_size in ops.GEMM_BLOCK_SIZES, "block_size", lambda: f"must be one of {ops.GEMM_BLOCK_SIZES}, got {block_size}")
    expect(is_int(top_k) and top_k >= 1, "top_k", lambda: f"must be a positive int, got {top_k!r}")
    top_k = int(top_k)
    for t, name in ((sorted_token_ids, "sorted_token_ids"), (expert_ids, "expert_ids"), (num_tokens_post_pad, "num_tokens_post_pad")):
        check_tensor(t, name, ndim=1, dtypes=(torch.int32,), device=dev)
    expect(num_tokens_post_pad.numel() == 1, "num_tokens_post_pad", lambda: f"must have one element, got {num_tokens_post_pad.numel()}")
    nblk = -(-sorted_token_ids.numel() // block_size)
    expect(expert_ids.numel() >= nblk, "expert_ids", lambda: f"has {expert_ids.numel()} blocks, sorted_token_ids needs {nblk}")
    numel = a.shape[0] * top_k
    if mul_routed_weight:
        expect(topk_weights is not None, "topk_weights", lambda: "is required with mul_routed_weight=True")
    if topk_weights is not None:
        check_tensor(topk_weights, "topk_weights", dtypes=FLOAT_DTYPES, device=dev, last_contiguous=False)
        expect(topk_weights.numel() == numel, "topk_weights", lambda: f"has {topk_weights.numel()} elements, expected {numel}")
    if _config.checks_enabled():
        check_range_values(sorted_token_ids, "sorted_token_ids", 0, numel + 1)
        check_range_values(expert_ids, "expert_ids", -1, w.shape[0])
        ntp = int(num_tokens_post_pad[0])
        expect(0 <= ntp <= sorted_token_ids.numel() and ntp % block_size == 0, "num_tokens_post_pad",
            lambda: f"{ntp} must be a multiple of block_size {block_size} in [0, {sorted_token_ids.numel()}]")
        # every pair once (skipped ones too, in the skip bucket): else rows would stay unwritten,
        # e.g. a top_k other than the align call's (whose pad value numel would read as a pair)
        seen = torch.bincount(sorted_token_ids[:ntp].long(), minlength=numel + 1)[:numel]
        expect(bool((seen == 1).all()), "sorted_token_ids",
               lambda: f"its first num_tokens_post_pad = {ntp} entries must hold each of the a.shape[0] * top_k = "
                       f"{numel} pairs exactly once (is top_k the align call's?)")
    return ops.moe_grouped_gemm(a, w, sorted_token_ids, expert_ids, num_tokens_post_pad, block_size, top_k,
                                topk_weights, mul_routed_weight)


_ACT_AND_MUL_DOC = """

    Parameters
    ----------
    input : torch.Tensor
        ``[..., 2d]``, fp16 / bf16 / fp32, ``stride(-1) == 1``.
    out : torch.Tensor, optional
        ``[..., d]``, input's dtype and device; written in place and returned.
    enable_pdl : bool, optional
        Accepted for FlashInfer compatibility; no effect.

    Returns
    -------
    torch.Tensor
        ``[..., d]`` (``out`` when given).
"""


def _act_and_mul_doc(fn):
    """The ``*_and_mul`` functions' numpy-style docstring: their own summary, the shared sections."""
    fn.__doc__ = fn.__doc__.rstrip() + _ACT_AND_MUL_DOC
    return fn


def _act_and_mul(op, op_out, input, out, *args):
    """The ``*_and_mul`` functions' argument checks, then ``op(input, *args)`` or, with ``out``,
    ``op_out(input, out, *args)`` (returning ``out``)."""
    check_tensor(input, "input", dtypes=FLOAT_DTYPES)
    expect(input.dim() >= 1 and input.shape[-1] % 2 == 0, "input", lambda: f"last dim must be even, got shape {tuple(input.shape)}")
    if out is None:
        return op(input, *args)
    check_tensor(out, "out", device=input.device)
    expect(out.dtype == input.dtype, "out", "dtype {} must match input's {}", out.dtype, input.dtype)
    want = (*input.shape[:-1], input.shape[-1] // 2)
    expect(tuple(out.shape) == want, "out", lambda: f"shape {tuple(out.shape)} must be {want}")
    op_out(input, out, *args)
    return out


@_act_and_mul_doc
def silu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``silu(input[..., :d]) * input[..., d:]`` (fp32 math, input's dtype out)."""
    return _act_and_mul(ops.silu_and_mul, ops.silu_and_mul_out, input, out)


@_act_and_mul_doc
def gelu_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None, enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``gelu(input[..., :d]) * input[..., d:]`` with the exact (erf) GELU
    ``gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))`` (fp32 math, input's dtype out)."""
    return _act_and_mul(ops.gelu_and_mul, ops.gelu_and_mul_out, input, out, False)


@_act_and_mul_doc
def gelu_tanh_and_mul(input: torch.Tensor, out: Optional[torch.Tensor] = None,
                      enable_pdl: Optional[bool] = None) -> torch.Tensor:
    """``gelu_tanh(input[..., :d]) * input[..., d:]`` with GELU's tanh approximation
    ``gelu_tanh(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` (fp32 math,
    input's dtype out)."""
    return _act_and_mul(ops.gelu_and_mul, ops.gelu_and_mul_out, input, out, True)


def moe_sum(input: torch.Tensor, routed_scaling_factor: Optional[float] = 1.0) -> torch.Tensor:
    """``out[t] = rsf * sum_j input[t, j]``: fp32 accumulation in fixed j order.

    Parameters
    ----------
    input : torch.Tensor
        ``[T, k, H]`` fp16 / bf16 / fp32, ``stride(-1) == 1``.
    routed_scaling_factor : float or None
        Multiplies the sum; None means 1.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in input's dtype.
    """
    check_tensor(input, "input", ndim=3, dtypes=FLOAT_DTYPES)
    return ops.moe_sum(input, _static_float(routed_scaling_factor))


class ActivationType(enum.IntEnum):
    """FlashInfer's MoE activation ids (``flashinfer.fused_moe.ActivationType``), numbered as in
    its release with the SiTU activation (``Situ`` 10; ``InvalidType`` was 10 before it).
    ``cutlass_fused_moe`` runs ``Swiglu`` only."""

    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    SwigluStep = 7
    GegluTanh = 8
    Identity = 9
    Situ = 10
    InvalidType = 11


def _activation_name(activation_type) -> str:
    """The ``ActivationType`` name of ``activation_type``: None is the default (Swiglu), a plain
    int is read through FlashInfer's numbering, and an enum member of another class (an
    engine's stand-in for FlashInfer's) by its name."""
    if activation_type is None:
        return "Swiglu"
    if isinstance(activation_type, enum.Enum):
        return activation_type.name
    expect(is_int(activation_type), "activation_type", "must be an ActivationType or an int, got {!r}",
           activation_type)
    try:
        return ActivationType(int(activation_type)).name
    except ValueError:
        raise ValueError(f"activation_type: {activation_type!r} is not an ActivationType value (0..11)") from None


def cutlass_fused_moe(
    input: torch.Tensor,
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    fc1_expert_weights: torch.Tensor,
    fc2_expert_weights: torch.Tensor,
    output_dtype: torch.dtype,
    quant_scales: Optional[List[torch.Tensor]] = None,
    fc1_expert_biases: Optional[torch.Tensor] = None,
    fc2_expert_biases: Optional[torch.Tensor] = None,
    input_sf: Optional[torch.Tensor] = None,
    swiglu_alpha: Optional[torch.Tensor] = None,
    swiglu_beta: Optional[torch.Tensor] = None,
    swiglu_limit: Optional[torch.Tensor] = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    ep_size: int = 1,
    ep_rank: int = 0,
    cluster_size: int = 1,
    cluster_rank: int = 0,
    output: Optional[torch.Tensor] = None,
    enable_alltoall: bool = False,
    use_deepseek_fp8_block_scale: bool = False,
    use_w4_group_scaling: bool = False,
    use_mxfp8_act_scaling: bool = False,
    min_latency_mode: bool = False,
    use_packed_weights: bool = False,
    use_wfp4afp8_humming: bool = False,
    tune_max_num_tokens: int = 8192,
    enable_pdl: Optional[bool] = None,
    activation_type=ActivationType.Swiglu,
    swizzled_input_sf: bool = True,
    use_fused_finalize: bool = True,
    profile_ids: Optional[List[int]] = None,
    workspace_buffer: Optional[torch.Tensor] = None,
    *,
    situ_beta: Optional[torch.Tensor] = None,
    situ_linear_beta: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """FlashInfer's CUTLASS MoE entry point, mapped onto ``fused_moe`` (spec §7).

    Parameters
    ----------
    input : torch.Tensor
        ``[T, H]`` bf16 / fp16.
    token_selected_experts : torch.Tensor
        ``[T, k]`` global expert ids (int32; -1 skips).
    token_final_scales : torch.Tensor
        ``[T, k]`` routing weights.
    fc1_expert_weights : torch.Tensor
        ``[E_local, 2I, H]`` **``[up (w3); gate (w1)]``** (FlashInfer's order; read in place,
        no copy).
    fc2_expert_weights : torch.Tensor
        ``[E_local, H, I]``.
    output_dtype : torch.dtype
        Dtype of the result.
    tp_size, tp_rank : int
        Tensor parallelism as in FlashInfer: the weights are this rank's shard along I (fc1 the
        rank's up rows then its gate rows, ``[E_local, 2 I / tp_size, H]``; fc2
        ``[E_local, H, I / tp_size]``), and the result is this rank's partial sum, which the
        caller all-reduces. With no biases every rank computes the same function of its shard,
        so ``tp_rank`` is only checked to lie in ``[0, tp_size)``.
    ep_size, ep_rank : int
        Expert parallelism over contiguous shards: this rank holds global experts
        ``[ep_rank * E_local, (ep_rank + 1) * E_local)``; other experts contribute 0.
    output : torch.Tensor, optional
        ``[T, H]`` of ``output_dtype``; written and returned.
    activation_type : ActivationType or int
        FlashInfer's ``ActivationType`` (an int is read through it, as FlashInfer does); only
        ``Swiglu`` (3) is supported. An enum member of another class named ``Swiglu`` is
        accepted too (engines define a stand-in when FlashInfer is missing), and None means
        the default.
    Parameters in FlashInfer's order as of 0.7 (``use_wfp4afp8_humming`` before
    ``tune_max_num_tokens``; ``situ_beta`` / ``situ_linear_beta`` keyword-only). Only
    unquantized weights, no biases and the SwiGLU activation are supported
    (``tp_size`` > 1 included); the other options raise ``NotImplementedError`` when set. ``enable_pdl``,
    ``tune_max_num_tokens``: accepted, no effect. ``use_fused_finalize`` (either value: the
    finalize here is always deterministic), ``swizzled_input_sf`` (only matters with
    ``input_sf``) and ``workspace_buffer`` (scratch is allocated here) are accepted with no
    effect; ``profile_ids``, ``use_wfp4afp8_humming=True`` and a ``situ_beta`` /
    ``situ_linear_beta`` (the SiTU activation) raise ``NotImplementedError``.

    Returns
    -------
    list of torch.Tensor
        ``[out]`` (a list, as FlashInfer's code returns).
    """
    act = _activation_name(activation_type)
    unsupported = dict(
        quant_scales=bool(quant_scales), fc1_expert_biases=fc1_expert_biases is not None,
        fc2_expert_biases=fc2_expert_biases is not None, input_sf=input_sf is not None,
        swiglu_alpha=swiglu_alpha is not None, swiglu_beta=swiglu_beta is not None,
        swiglu_limit=swiglu_limit is not None, cluster_size=cluster_size != 1,
        enable_alltoall=enable_alltoall, use_deepseek_fp8_block_scale=use_deepseek_fp8_block_scale,
        use_w4_group_scaling=use_w4_group_scaling, use_mxfp8_act_scaling=use_mxfp8_act_scaling,
        min_latency_mode=min_latency_mode, use_packed_weights=use_packed_weights,
        profile_ids=profile_ids is not None, use_wfp4afp8_humming=use_wfp4afp8_humming,
        situ_beta=situ_beta is not None, situ_linear_beta=situ_linear_beta is not None,
    )
    if act != "Swiglu":
        raise NotImplementedError(f"activation_type: only SwiGLU (ActivationType.Swiglu = 3) is supported, got "
                                  f"{activation_type!r} ({act})")
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise NotImplementedError(f"cutlass_fused_moe: {', '.join(bad)} not supported (unquantized SwiGLU without "
                                  f"biases only)")
    # checked here so that errors name this function's arguments, not fused_moe's
    check_tensor(input, "input", ndim=2, dtypes=_MOE_DTYPES)
    H = input.shape[1]
    check_tensor(fc1_expert_weights, "fc1_expert_weights", ndim=3, dtypes=_MOE_DTYPES, device=input.device)
    expect(fc1_expert_weights.shape[1] % 2 == 0, "fc1_expert_weights", lambda: f"shape {tuple(fc1_expert_weights.shape)}: dim 1 must be 2I")
    expect(ep_size >= 1, "ep_size", lambda: f"must be >= 1, got {ep_size}")
    expect(0 <= ep_rank < ep_size, "ep_rank", lambda: f"{ep_rank} must lie in [0, ep_size={ep_size})")
    expect(tp_size >= 1, "tp_size", lambda: f"must be >= 1, got {tp_size}")
    expect(0 <= tp_rank < tp_size, "tp_rank", lambda: f"{tp_rank} must lie in [0, tp_size={tp_size})")
    E_local, I = fc1_expert_weights.shape[0], fc1_expert_weights.shape[1] // 2
    check_tensor(fc2_expert_weights, "fc2_expert_weights", ndim=3, dtypes=_MOE_DTYPES, device=input.device)
    for t, name in ((fc1_expert_weights, "fc1_expert_weights"), (fc2_expert_weights, "fc2_expert_weights")):
        expect(t.dtype == input.dtype, name, lambda: f"dtype {t.dtype} must match input's {input.dtype}")
    expect(fc1_expert_weights.shape[2] == H, "fc1_expert_weights",
           lambda: f"shape {tuple(fc1_expert_weights.shape)} must be [E, 2I, H] with H = input.shape[1] = {H}")
    expect(tuple(fc2_expert_weights.shape) == (E_local, H, I), "fc2_expert_weights",
           lambda: f"shape {tuple(fc2_expert_weights.shape)} must be [E, H, I] = {(E_local, H, I)}")
    check_tensor(token_selected_experts, "token_selected_experts", ndim=2, dtypes=INDEX_DTYPES, device=input.device,
                 last_contiguous=False)
    check_tensor(token_final_scales, "token_final_scales", ndim=2, dtypes=FLOAT_DTYPES, device=input.device,
                 last_contiguous=False)
    expect(token_final_scales.shape == token_selected_experts.shape, "token_final_scales",
           lambda: f"shape {tuple(token_final_scales.shape)} must equal token_selected_experts' "
                   f"{tuple(token_selected_experts.shape)}")
    expect(token_selected_experts.shape[0] == input.shape[0], "token_selected_experts",
           lambda: f"has {token_selected_experts.shape[0]} rows, input has {input.shape[0]} tokens")
    expect(output_dtype in FLOAT_DTYPES, "output_dtype", "must be one of {}, got {!r}", FLOAT_DTYPES, output_dtype)
    expert_map = None
    if ep_size > 1:
        g = torch.arange(E_local * ep_size, device=input.device, dtype=torch.int32) - ep_rank * E_local
        expert_map = torch.where((g >= 0) & (g < E_local), g, -1).to(torch.int32)
    out = _fused_moe(input, fc1_expert_weights, fc2_expert_weights, token_final_scales, token_selected_experts,
                     expert_map=expert_map, w1_up_first=True).to(output_dtype)
    if output is not None:
        check_tensor(output, "output", ndim=2, dtypes=(output_dtype,), device=input.device)
        expect(output.shape == out.shape, "output", lambda: f"shape {tuple(output.shape)} must be {tuple(out.shape)}")
        check_writable(output, "output")
        output.copy_(out)
        out = output
    return [out]


@selfcheck("moe")
def _moe_selfcheck(device) -> list[CheckResult]:
    """Each moe op on small random inputs against the fp32 oracle (GPU: bf16, CPU: fp32)."""
    from .reference import moe as ref

    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device != "cpu" else torch.float32
    tol = 3e-2 if dt == torch.bfloat16 else 1e-4
    T, H, I, E, k = 37, 64, 32, 8, 2

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dt)

    x, w1, w2 = rnd(T, H), rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    ids[3] = -1
    tw = torch.rand(T, k, generator=g)
    res = []
    # (outputs of O(1): one bf16 rounding step stays under the tolerance)
    h = rnd(T, k, 2 * I, scale=0.5)
    res.append(CheckResult("silu_and_mul", max_abs_err(silu_and_mul(h), ref.ref_silu_and_mul(h.cpu())), tol))
    out = torch.full((T, k, I), float("nan"), dtype=dt, device=device)
    silu_and_mul(h, out=out)
    res.append(CheckResult("silu_and_mul_out", max_abs_err(out, ref.ref_silu_and_mul(h.cpu())), tol,
                           note="into a NaN-filled out="))
    for name, fn, approx in (("gelu_and_mul", gelu_and_mul, False), ("gelu_tanh_and_mul", gelu_tanh_and_mul, True)):
        exp = ref.ref_gelu_and_mul(h.cpu(), approx)
        res.append(CheckResult(name, max_abs_err(fn(h), exp), tol))
        out = torch.full((T, k, I), float("nan"), dtype=dt, device=device)
        fn(h, out=out)
        res.append(CheckResult(f"{name}_out", max_abs_err(out, exp), tol, note="into a NaN-filled out="))
    y = rnd(T, k, H, scale=0.25)
    res.append(CheckResult("moe_sum", max_abs_err(moe_sum(y, 2.5), ref.ref_moe_sum(y.cpu(), 2.5)), tol))
    # the grouped GEMM on a hand-made alignment: block b holds pair b, pair 3's block skipped
    B, numel = 16, T * k
    sid = torch.full((numel * B,), numel, dtype=torch.int32)
    sid[::B] = torch.arange(numel, dtype=torch.int32)
    eid = ids.reshape(-1).clone()
    ntp = torch.tensor([numel * B], dtype=torch.int32)
    c = moe_grouped_gemm(x, w1, sid.to(device), eid.to(device), ntp.to(device), B, k, tw.to(device), True)
    c_ref = ref.ref_moe_grouped_gemm(x.cpu().float(), w1.cpu().float(), sid, eid, ntp, B, k, tw, True)
    res.append(CheckResult("moe_grouped_gemm", max_abs_err(c.float(), c_ref), tol))
    out = fused_moe(x, w1, w2, tw.to(device), ids.to(device), routed_scaling_factor=2.5)
    exp = ref.ref_fused_moe_dense(x.float(), w1.float(), w2.float(), tw, ids, rsf=2.5)
    res.append(CheckResult("fused_moe", max_abs_err(out.float(), exp), tol * 4, "rsf 2.5, one row skipped"))
    return res


# FlashInfer defines its fused_moe names in flashinfer.fused_moe.core (vLLM and SGLang import
# ActivationType from there); under `import torch_flashops as flashinfer` that path is this module.
core = _sys.modules[__name__]
fused_routing_dsv3 = core  # (where FlashInfer defines fused_topk_deepseek)
