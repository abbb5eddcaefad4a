"""MoE routing and token alignment (spec moe.md §1, §2, §7): FlashInfer/vLLM-compatible API.

Routing turns router logits ``[T, E]`` into per-token expert choices ``(weights, ids)``;
``moe_align_block_size`` groups the ``T * k`` expanded pairs by expert into blocks for the
grouped GEMM. Everything is a ``torch.ops.flashops`` op (no host sync, CUDA-graph safe), except
the FlashInfer sort/permute shims at the bottom, which are short torch code on top of them.
"""
from __future__ import annotations

import enum
from typing import Optional, Tuple

import torch

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_range_values, check_tensor, check_writable, expect, is_int
from ._config import checks_enabled
from ._selfcheck import CheckResult, max_abs_err, selfcheck
from .meta import moe_routing as _meta_routing
from .ops import moe_routing as _ops

__all__ = [
    "topk_softmax",
    "grouped_topk",
    "topk_sigmoid",
    "moe_align_block_size",
    "fused_topk_deepseek",
    "RoutingMethodType",
    "moe_sort",
    "moe_permute",
    "moe_unpermute",
]

def _check_logits(gating_output: torch.Tensor) -> None:
    # dtype and rank here; the ints (topk, n_group, ...) are checked by the ops themselves
    # (meta/moe_routing.py, before every implementation)
    check_tensor(gating_output, "gating_output", ndim=2, dtypes=FLOAT_DTYPES)


def topk_softmax(gating_output: torch.Tensor, topk: int, renormalize: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax routing: the ``topk`` most probable experts of each token.

    Parameters
    ----------
    gating_output : torch.Tensor
        Router logits, shape ``[T, E]``, fp16/bf16/fp32, ``stride(-1) == 1``. Math in fp32.
    topk : int
        Experts per token, ``1 <= topk <= E``.
    renormalize : bool
        Divide the kept probabilities by their sum (Mixtral, Qwen3-MoE, gpt-oss); this equals a
        softmax over the selected logits (FlashInfer's ``Renormalize`` / ``RenormalizeNaive``).

    Returns
    -------
    (topk_weights, topk_ids) : (torch.Tensor, torch.Tensor)
        float32 ``[T, topk]`` and int32 ``[T, topk]``, by descending probability, ties to the
        lower expert id.
    """
    _check_logits(gating_output)
    return _ops.topk_softmax_op(gating_output, topk, bool(renormalize))


def grouped_topk(
    gating_output: torch.Tensor,
    topk: int,
    n_group: int,
    topk_group: int,
    *,
    bias: Optional[torch.Tensor] = None,
    scoring_func: str = "sigmoid",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek grouped routing ("noaux_tc" with ``bias``, V2 "group_limited_greedy" without).

    Parameters
    ----------
    gating_output : torch.Tensor
        Router logits, shape ``[T, E]``, fp16/bf16/fp32, ``stride(-1) == 1``.
    topk : int
        Experts per token, ``1 <= topk <= topk_group * (E // n_group)``.
    n_group : int
        Number of contiguous expert groups (``E % n_group == 0``); group ``g`` holds experts
        ``[g*G, (g+1)*G)`` with ``G = E // n_group``.
    topk_group : int
        Groups kept per token, ``1 <= topk_group <= n_group``.
    bias : torch.Tensor, optional
        ``e_score_correction_bias``, shape ``[E]``, fp16/bf16/fp32, any stride. Added to the scores for
        selection only; group score = sum of the two best biased scores (needs ``G >= 2``).
        Without bias the group score is the best score.
    scoring_func : str
        ``"sigmoid"`` (DeepSeek-V3/R1, Kimi-K2) or ``"softmax"`` (DeepSeek-V2).
    renormalize : bool
        ``w = w / (sum(w) + 1e-20)`` over the selected unbiased scores.
    routed_scaling_factor : float
        Multiplies the weights (apply it here *or* on the layer output, never both).

    Returns
    -------
    (topk_weights, topk_ids) : (torch.Tensor, torch.Tensor)
        float32 ``[T, topk]`` (unbiased scores) and int32 ``[T, topk]``, by descending biased
        score, ties to the lower expert id.
    """
    _check_logits(gating_output)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES, device=gating_output.device, last_contiguous=False)
    return _ops.grouped_topk_op(gating_output, topk, n_group, topk_group, bias, scoring_func, bool(renormalize),
                                float(routed_scaling_factor))


def topk_sigmoid(gating_output: torch.Tensor, topk: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 routing: the ``topk`` largest logits, weights ``sigmoid(logit)`` (no renorm).

    Parameters
    ----------
    gating_output : torch.Tensor
        Router logits, shape ``[T, E]``, fp16/bf16/fp32, ``stride(-1) == 1``.
    topk : int
        Experts per token (Llama 4 uses 1, with the weight applied on the input).

    Returns
    -------
    (topk_weights, topk_ids) : (torch.Tensor, torch.Tensor)
        float32 ``[T, topk]`` and int32 ``[T, topk]``, by descending logit, ties to the lower id.
    """
    _check_logits(gating_output)
    return _ops.topk_sigmoid_op(gating_output, topk)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: Optional[torch.Tensor] = None,
    pad_sorted_ids: bool = False,
    ignore_invalid_experts: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the ``T * k`` expanded pairs by expert into blocks of ``block_size`` (vLLM contract).

    Pair ``i = t * k + j`` goes to the bucket of expert ``topk_ids[t, j]`` (mapped through
    ``expert_map``); ids of -1 and remote experts go to a skip bucket placed after the last
    expert. Buckets are laid out in ascending expert id, each padded to whole blocks with the
    value ``numel = T * k``; pairs keep ascending order inside a bucket.

    Parameters
    ----------
    topk_ids : torch.Tensor
        int32 or int64, shape ``[T, k]``, values in ``[-1, num_experts)`` (checked mode).
    block_size : int
        Rows per block (the grouped GEMM's BLOCK_M), ``>= 1``.
    num_experts : int
        Number of experts (the *global* count when ``expert_map`` is given).
    expert_map : torch.Tensor, optional
        int32 ``[num_experts]``: global id -> local id, or -1 for experts not on this rank.
    pad_sorted_ids : bool
        Round the length of ``sorted_token_ids`` up to a multiple of ``block_size``.
    ignore_invalid_experts : bool
        Accepted for vLLM's signature; either value gives the layout above [diff: vLLM with
        ``False`` sorts remote pairs under their global expert and marks those blocks -1, with
        ``True`` leaves them out; here they fill the skip bucket, whose blocks are -1]. The
        grouped GEMM computes the same either way: no remote pair reaches an expert's block.

    Returns
    -------
    sorted_token_ids : torch.Tensor
        int32 ``[max_num_tokens_padded]``, ``max_num_tokens_padded = numel + (num_experts + 1) *
        (block_size - 1)`` (rounded up to a multiple of ``block_size`` with ``pad_sorted_ids``).
    expert_ids : torch.Tensor
        int32 ``[cdiv(max_num_tokens_padded, block_size)]``: each block's (local) expert, -1 for
        skip-bucket blocks and for every block at or past ``num_tokens_post_pad / block_size``.
    num_tokens_post_pad : torch.Tensor
        int32 ``[1]`` on the input's device: total padded length of all buckets (skip included).
    """
    check_tensor(topk_ids, "topk_ids", ndim=2, dtypes=INDEX_DTYPES, last_contiguous=False)
    if expert_map is not None:
        check_tensor(expert_map, "expert_map", ndim=1, dtypes=INDEX_DTYPES, device=topk_ids.device)
    if checks_enabled():
        _meta_routing.check_align_args(topk_ids, block_size, num_experts, expert_map)  # sizes before the data
        check_range_values(topk_ids, "topk_ids", -1, num_experts)
        if expert_map is not None:
            check_range_values(expert_map, "expert_map", -1, num_experts)
    return _ops.moe_align_block_size_op(topk_ids, block_size, num_experts, expert_map, bool(pad_sorted_ids))


# --------------------------------------------------------------------------- FlashInfer names

class RoutingMethodType(enum.IntEnum):
    """FlashInfer's routing method ids, numbered as in its current release (the trtllm
    ``fused_moe`` runner; 0.6.x releases before it had ``Unspecified = 6``, a value that now
    means ``SigmoidRenorm``), and what each maps to here: Default ->
    ``topk_softmax(renormalize=False)``; Renormalize, RenormalizeNaive ->
    ``topk_softmax(renormalize=True)``; DeepSeekV3 -> ``grouped_topk(sigmoid, bias)``; Llama4 ->
    ``topk_sigmoid(topk=1)``; Sigmoid -> ``topk_sigmoid``. TopK, SigmoidRenorm and MiniMax2 are
    named for code that passes them around; no single op here computes them."""

    Default = 0
    Renormalize = 1
    DeepSeekV3 = 2
    Llama4 = 3
    RenormalizeNaive = 4
    TopK = 5
    SigmoidRenorm = 6
    MiniMax2 = 7
    Sigmoid = 8
    Unspecified = 9


def fused_topk_deepseek(
    scores: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    topk: int,
    routed_scaling_factor: float,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    launch_with_pdl: bool = True,
    routing_replay_out: Optional[torch.Tensor] = None,
    *,
    backend: str = "default",
) -> None:
    """FlashInfer's DeepSeek-V3 routing, written into the given outputs.

    Same as ``grouped_topk(scores, topk, n_group, topk_group, bias=bias, scoring_func="sigmoid",
    renormalize=True, routed_scaling_factor=routed_scaling_factor)``, then copied into
    ``topk_values`` (``[T, topk]``, scores' dtype or any float dtype) and ``topk_indices``
    (``[T, topk]`` int32/int64). ``routing_replay_out`` (int16 ``[>= T, topk]``), if given, also
    gets the ids. FlashInfer's kernel limits (topk <= 8, ...) do not apply. ``launch_with_pdl``
    is accepted and ignored; ``backend`` may be ``"default"`` or ``"cake"`` (both run ours).
    """
    if backend not in ("default", "cake"):
        raise NotImplementedError(f"backend: {backend!r} is not provided (use 'default')")
    check_tensor(scores, "scores", ndim=2, dtypes=FLOAT_DTYPES)
    T = scores.shape[0]
    check_tensor(topk_values, "topk_values", ndim=2, dtypes=FLOAT_DTYPES, device=scores.device, last_contiguous=False)
    expect(tuple(topk_values.shape) == (T, topk), "topk_values",
           "shape {} must be ({}, {})", tuple(topk_values.shape), T, topk)
    check_tensor(topk_indices, "topk_indices", ndim=2, dtypes=INDEX_DTYPES, device=scores.device, last_contiguous=False)
    expect(tuple(topk_indices.shape) == (T, topk), "topk_indices",
           "shape {} must be ({}, {})", tuple(topk_indices.shape), T, topk)
    if routing_replay_out is not None:
        check_tensor(routing_replay_out, "routing_replay_out", ndim=2, dtypes=(torch.int16,), device=scores.device,
                     last_contiguous=False)
        expect(routing_replay_out.shape[0] >= T and routing_replay_out.shape[1] == topk, "routing_replay_out",
               "shape {} must be (>= {}, {})", tuple(routing_replay_out.shape), T, topk)
    w, ids = grouped_topk(scores, topk, n_group, topk_group, bias=bias, scoring_func="sigmoid", renormalize=True,
                          routed_scaling_factor=routed_scaling_factor)
    topk_values.copy_(w)
    topk_indices.copy_(ids)
    if routing_replay_out is not None:
        routing_replay_out[:T].copy_(ids)


def _ep_expert_map(num_experts: int, offset: int, local: int, device) -> torch.Tensor:
    """FlashInfer-style expert parallelism: global e -> e - offset on this rank's shard, else -1."""
    e = torch.arange(num_experts, dtype=torch.int32, device=device)
    return torch.where((e >= offset) & (e < offset + local), e - offset, torch.full_like(e, -1))


def moe_sort(
    token_selected_experts: torch.Tensor,
    token_final_scales: torch.Tensor,
    num_experts: int,
    top_k: int,
    local_expert_offset: int = 0,
    num_local_experts: Optional[int] = None,
    tile_tokens_dim: int = 128,
    enable_pdl: bool = False,
    out_tile_idx_to_expert_idx: Optional[torch.Tensor] = None,
    out_tile_idx_to_mn_limit: Optional[torch.Tensor] = None,
    out_expanded_idx_to_permuted_idx: Optional[torch.Tensor] = None,
    out_permuted_idx_to_expanded_idx: Optional[torch.Tensor] = None,
    out_total_num_padded_tokens: Optional[torch.Tensor] = None,
    out_num_non_exiting_tiles: Optional[torch.Tensor] = None,
):
    """FlashInfer's ``moe_sort`` on top of ``moe_align_block_size`` (tiles = blocks).

    Parameters
    ----------
    token_selected_experts : torch.Tensor
        int32/int64 ``[T, top_k]`` global expert ids (-1 = skip).
    token_final_scales : torch.Tensor
        ``[T, top_k]`` routing weights (shape-checked only; not used for sorting).
    num_experts, top_k : int
        Global expert count and experts per token.
    local_expert_offset, num_local_experts : int
        This rank's experts are ``[offset, offset + num_local_experts)`` (default: all).
    tile_tokens_dim : int
        Tile (block) size.
    enable_pdl : bool
        Accepted and ignored.
    out_* : torch.Tensor, optional
        Preallocated int32 outputs (FlashInfer's CUDA-graph form; ``allocate_moe_sort_buffers``
        makes them): each result is written into its buffer, which is returned in its place. The
        tile buffers may be shorter than the tile count below, down to ``get_max_num_tiles``
        (every local tile fits there); longer ones are padded as past-the-end tiles are.
        ``out_expanded_idx_to_permuted_idx`` is ``[T, top_k]``, the two counts ``[1]``.

    Returns
    -------
    tile_idx_to_expert_idx : int32 ``[num_tiles]``, local expert per tile; -1 for tiles past the
        local ones [diff: FlashInfer leaves zeros there].
    tile_idx_to_mn_limit : int32 ``[num_tiles]``, ``tile * B + valid rows of the tile`` (=
        ``min((tile+1)*B, bucket_start + count)`` for local tiles, ``tile * B`` past them).
    expanded_idx_to_permuted_idx : int32 ``[T, top_k]``, slot of pair ``t*k+j``, -1 if skipped.
    permuted_idx_to_expanded_idx : int32 ``[num_tiles * B]``, pair in each slot, ``T * top_k``
        for padding and every slot past the local tiles.
    total_num_padded_tokens : int32 ``[1]`` device tensor [diff: FlashInfer returns an int,
        which would need a host sync].
    num_non_exiting_tiles : int32 ``[1]`` device tensor.
    Sizes use the align bound ``numel + (E_global + 1) * (B - 1)`` rounded up to whole tiles,
    not FlashInfer's tighter one (that one branches on sizes).
    """
    check_tensor(token_selected_experts, "token_selected_experts", ndim=2, dtypes=INDEX_DTYPES, last_contiguous=False)
    check_tensor(token_final_scales, "token_final_scales", ndim=2, dtypes=FLOAT_DTYPES, last_contiguous=False,
                 device=token_selected_experts.device)
    T = token_selected_experts.shape[0]
    expect(token_selected_experts.shape[1] == top_k, "token_selected_experts",
           "shape {} must be (T, top_k={})", tuple(token_selected_experts.shape), top_k)
    expect(tuple(token_final_scales.shape) == (T, top_k), "token_final_scales",
           "shape {} must be ({}, {})", tuple(token_final_scales.shape), T, top_k)
    L = num_experts if num_local_experts is None else num_local_experts
    expect(0 <= local_expert_offset and 1 <= L and local_expert_offset + L <= num_experts, "num_local_experts",
           "local experts [{}, {}) must lie in [0, {})", local_expert_offset, local_expert_offset + L, num_experts)
    expect(is_int(tile_tokens_dim) and tile_tokens_dim >= 1, "tile_tokens_dim", "must be an int >= 1, got {!r}",
           tile_tokens_dim)
    B = int(tile_tokens_dim)
    dev = token_selected_experts.device
    emap = None if (local_expert_offset == 0 and L == num_experts) else _ep_expert_map(num_experts, local_expert_offset, L, dev)
    sid, eid, _ = moe_align_block_size(token_selected_experts, B, num_experts, emap, pad_sorted_ids=True)
    numel = T * top_k
    n_tiles = (eid >= 0).sum(dtype=torch.int32).reshape(1)  # the skip bucket's tiles and the tail are -1
    total = n_tiles * B
    slot = torch.arange(sid.shape[0], dtype=torch.int32, device=dev)
    p2e = torch.where(slot < total, sid, torch.full_like(sid, numel))
    valid = p2e < numel
    e2p = torch.full((numel + 1,), -1, dtype=torch.int32, device=dev)  # last entry: dump slot
    e2p.scatter_(0, torch.where(valid, p2e, numel).long(), torch.where(valid, slot, -1))
    mn_limit = slot.view(-1, B)[:, 0] + valid.view(-1, B).sum(1, dtype=torch.int32)
    result = [eid, mn_limit, e2p[:numel].view(T, top_k), p2e, total, n_tiles]
    outs = (out_tile_idx_to_expert_idx, out_tile_idx_to_mn_limit, out_expanded_idx_to_permuted_idx,
            out_permuted_idx_to_expanded_idx, out_total_num_padded_tokens, out_num_non_exiting_tiles)
    if any(o is not None for o in outs):
        result = _into_sort_buffers(result, outs, T, top_k, B, numel, dev)
    return tuple(result)


def get_max_num_tiles(num_tokens: int, top_k: int, num_local_experts: int, tile_size: int) -> int:
    """Most tiles ``moe_sort`` can give the local experts (FlashInfer's bound): every expert
    holding a pair owns at most one partly filled tile, the other pairs fill whole tiles. With
    no more pairs than experts, each pair may sit alone in its tile."""
    pairs = num_tokens * top_k
    if pairs <= num_local_experts:
        return pairs
    return num_local_experts + (pairs - num_local_experts + tile_size - 1) // tile_size


def get_max_num_permuted_tokens(num_tokens: int, top_k: int, num_local_experts: int, tile_size: int) -> int:
    """Slots in ``get_max_num_tiles`` whole tiles."""
    return get_max_num_tiles(num_tokens, top_k, num_local_experts, tile_size) * tile_size


def allocate_moe_sort_buffers(num_tokens: int, num_experts: int, top_k: int, num_local_experts: Optional[int] = None,
                              tile_tokens_dim: int = 128, device="cuda") -> dict:
    """The ``out_*`` buffers of ``moe_sort`` for ``num_tokens`` tokens (int32, uninitialised),
    keyed by argument name: allocate them once, before CUDA-graph capture, and pass them as
    ``moe_sort(..., **buffers)`` so every replay writes the same memory."""
    L = num_experts if num_local_experts is None else num_local_experts
    tiles = get_max_num_tiles(num_tokens, top_k, L, tile_tokens_dim)
    shapes = ((tiles,), (tiles,), (num_tokens, top_k), (tiles * tile_tokens_dim,), (1,), (1,))
    return {name: torch.empty(shape, dtype=torch.int32, device=device) for name, shape in zip(_SORT_OUT_NAMES, shapes)}


_SORT_OUT_NAMES = ("out_tile_idx_to_expert_idx", "out_tile_idx_to_mn_limit", "out_expanded_idx_to_permuted_idx",
                   "out_permuted_idx_to_expanded_idx", "out_total_num_padded_tokens", "out_num_non_exiting_tiles")


def _into_sort_buffers(result, outs, T, top_k, B, numel, dev) -> list:
    """Copy ``moe_sort``'s results into the caller's buffers (checked first, nothing written on
    bad input). Lengths may differ from ours: a shorter tile/slot buffer takes our prefix (the
    local tiles come first, and FlashInfer's bound covers them); a longer one is filled past our
    end with what past-the-end tiles hold (expert -1, mn limit = tile start, slot -> numel)."""
    fixed = {2: (T, top_k), 4: (1,), 5: (1,)}  # the others: 1-D, any length
    for i, (o, name) in enumerate(zip(outs, _SORT_OUT_NAMES)):
        if o is not None:
            check_tensor(o, name, ndim=len(fixed.get(i, (0,))), dtypes=(torch.int32,), device=dev,
                         last_contiguous=False)
            expect(i not in fixed or tuple(o.shape) == fixed[i], name, "shape {} must be {}", tuple(o.shape),
                   fixed.get(i))
            check_writable(o, name)
    for i, o in enumerate(outs):
        if o is None:
            continue
        ours = result[i]
        n = o.shape[0] if i in fixed else min(o.shape[0], ours.shape[0])
        o[:n].copy_(ours[:n])
        if o.shape[0] > n:  # past our last tile / slot: what past-the-end tiles hold
            rest = torch.arange(n, o.shape[0], dtype=torch.int32, device=dev)
            o[n:].copy_({0: torch.full_like(rest, -1), 1: rest * B, 3: torch.full_like(rest, numel)}[i])
        result[i] = o
    return result


def moe_permute(
    input: torch.Tensor,
    permuted_output: torch.Tensor,
    tile_idx_to_mn_limit: torch.Tensor,
    permuted_idx_to_expanded_idx: torch.Tensor,
    num_non_exiting_tiles: torch.Tensor,
    max_num_permuted_tokens: int,
    top_k: int,
    tile_size: int,
    enable_pdl: bool = False,
    input_sf: Optional[torch.Tensor] = None,
    permuted_sf: Optional[torch.Tensor] = None,
) -> None:
    """FlashInfer's ``moe_permute``: ``permuted_output[p] = input[p2e[p] // top_k]`` for every
    valid slot ``p < max_num_permuted_tokens`` (inside a non-exiting tile, below its mn limit);
    other rows are left as they were. ``input [T, H]``, ``permuted_output [>= max, H]``, same
    dtype. Our grouped GEMM gathers rows on load, so this is only for FlashInfer-style callers.
    FP4 scale factors (``input_sf``/``permuted_sf``) are not provided."""
    if input_sf is not None or permuted_sf is not None:
        raise NotImplementedError("input_sf/permuted_sf: FP4 permutation is not provided")
    check_tensor(input, "input", ndim=2, last_contiguous=False)
    check_tensor(permuted_output, "permuted_output", ndim=2, device=input.device, last_contiguous=False)
    expect(permuted_output.dtype == input.dtype, "permuted_output",
           "dtype {} must match input {}", permuted_output.dtype, input.dtype)
    expect(permuted_output.shape[1] == input.shape[1], "permuted_output", "hidden size must match input")
    check_writable(permuted_output, "permuted_output")
    dev = input.device
    check_tensor(tile_idx_to_mn_limit, "tile_idx_to_mn_limit", ndim=1, dtypes=INDEX_DTYPES, device=dev,
                 last_contiguous=False)
    check_tensor(permuted_idx_to_expanded_idx, "permuted_idx_to_expanded_idx", ndim=1, dtypes=INDEX_DTYPES,
                 device=dev, last_contiguous=False)
    check_tensor(num_non_exiting_tiles, "num_non_exiting_tiles", dtypes=INDEX_DTYPES, device=dev,
                 last_contiguous=False)
    expect(num_non_exiting_tiles.numel() == 1, "num_non_exiting_tiles", "must have one element, got {}",
           num_non_exiting_tiles.numel())
    expect(int(top_k) >= 1, "top_k", "must be >= 1, got {}", top_k)
    expect(int(tile_size) >= 1, "tile_size", "must be >= 1, got {}", tile_size)
    M = max_num_permuted_tokens
    expect(0 <= M <= permuted_output.shape[0] and M <= permuted_idx_to_expanded_idx.shape[0],
           "max_num_permuted_tokens", "{} exceeds permuted_output / permuted_idx_to_expanded_idx rows", M)
    T = input.shape[0]
    if M == 0 or T == 0 or tile_idx_to_mn_limit.shape[0] == 0:  # (no tile has a row limit: nothing to copy)
        return
    p = torch.arange(M, device=input.device)
    e = permuted_idx_to_expanded_idx[:M].long()
    tile = p // tile_size
    limit = tile_idx_to_mn_limit.long()[tile.clamp(max=tile_idx_to_mn_limit.shape[0] - 1)]
    valid = (tile < num_non_exiting_tiles.long()) & (p < limit)
    valid = valid & (e >= 0) & (e < T * top_k)
    rows = input[(e // top_k).clamp(0, T - 1)]
    out = permuted_output[:M]
    out.copy_(torch.where(valid[:, None], rows, out))


def moe_unpermute(
    permuted_input: torch.Tensor,
    output: torch.Tensor,
    expanded_idx_to_permuted_idx: torch.Tensor,
    topk_scales: torch.Tensor,
    num_tokens: int,
    top_k: int,
    enable_pdl: bool = False,
) -> None:
    """FlashInfer's ``moe_unpermute``: ``output[t] = sum_j topk_scales[t, j] *
    permuted_input[e2p[t, j]]`` over ``j`` with ``e2p[t, j] != -1`` (fp32 sum, fixed j order),
    written into ``output[:num_tokens]`` in its dtype. ``permuted_input [P, H]``, ``output
    [>= num_tokens, H]``, ``expanded_idx_to_permuted_idx`` int32 ``[num_tokens, top_k]``,
    ``topk_scales [num_tokens, top_k]`` fp32/fp16/bf16."""
    check_tensor(permuted_input, "permuted_input", ndim=2, last_contiguous=False)
    check_tensor(output, "output", ndim=2, device=permuted_input.device, last_contiguous=False)
    expect(output.shape[0] >= num_tokens and output.shape[1] == permuted_input.shape[1], "output",
           "shape {} must be (>= {}, {})", tuple(output.shape), num_tokens, permuted_input.shape[1])
    expect(output.dtype in FLOAT_DTYPES, "output", "dtype {} not supported (expected float16, bfloat16 or float32)",
           output.dtype)
    check_writable(output[:num_tokens], "output")
    e2p = expanded_idx_to_permuted_idx
    check_tensor(e2p, "expanded_idx_to_permuted_idx", ndim=2, dtypes=INDEX_DTYPES, device=permuted_input.device,
                 last_contiguous=False)
    expect(tuple(e2p.shape) == (num_tokens, top_k), "expanded_idx_to_permuted_idx",
           "shape {} must be ({}, {})", tuple(e2p.shape), num_tokens, top_k)
    check_tensor(topk_scales, "topk_scales", ndim=2, dtypes=FLOAT_DTYPES, device=permuted_input.device,
                 last_contiguous=False)
    expect(tuple(topk_scales.shape) == (num_tokens, top_k), "topk_scales",
           "shape {} must be ({}, {})", tuple(topk_scales.shape), num_tokens, top_k)
    P = permuted_input.shape[0]
    if num_tokens == 0:
        return
    if P == 0:
        output[:num_tokens].zero_()
        return
    valid = (e2p >= 0) & (e2p < P)
    rows = permuted_input[e2p.long().clamp(0, P - 1)].float()  # [T, k, H]
    contrib = torch.where(valid[..., None], rows * topk_scales.float()[..., None], 0.0)
    output[:num_tokens].copy_(contrib.sum(1).to(output.dtype))


# --------------------------------------------------------------------------- self-check

@selfcheck("moe_routing")
def _selfcheck(device) -> list:
    """Each op on small random inputs against the spec oracles (reference/moe_routing.py)."""
    from .reference import moe_routing as ref

    g = torch.Generator().manual_seed(0)
    out = []
    x = torch.randn(37, 64, generator=g)
    xd = x.to(device)

    def ids_as_sets_err(ids, ref_ids):
        same = torch.equal(ids.cpu().sort(-1).values, ref_ids.cpu().sort(-1).values)
        return 0.0 if same else float("inf")

    for ren in (False, True):
        w, ids = topk_softmax(xd, 6, ren)
        rw, rids = ref.ref_topk_softmax(x, 6, ren)
        out.append(CheckResult(f"topk_softmax ids [renormalize={ren}]", ids_as_sets_err(ids, rids), 0.0))
        out.append(CheckResult(f"topk_softmax w [renormalize={ren}]", max_abs_err(w, rw), 1e-5))
    bias = torch.randn(64, generator=g) * 0.1
    for sf, b in (("sigmoid", bias), ("softmax", None)):
        w, ids = grouped_topk(xd, 6, 8, 3, bias=None if b is None else b.to(device), scoring_func=sf,
                              routed_scaling_factor=2.5)
        rw, rids = ref.ref_grouped_topk(x, 6, 8, 3, b, sf, True, 2.5)
        out.append(CheckResult(f"grouped_topk ids [{sf}]", ids_as_sets_err(ids, rids), 0.0))
        out.append(CheckResult(f"grouped_topk w [{sf}]", max_abs_err(w, rw), 1e-5))
    w, ids = topk_sigmoid(xd, 1)
    rw, rids = ref.ref_topk_sigmoid(x, 1)
    out.append(CheckResult("topk_sigmoid ids", ids_as_sets_err(ids, rids), 0.0))
    out.append(CheckResult("topk_sigmoid w", max_abs_err(w, rw), 1e-5))
    for T, k, E, B in ((37, 6, 64, 16), (400, 8, 16, 4)):
        tid = torch.randint(-1, E, (T, k), generator=g, dtype=torch.int32)
        got = moe_align_block_size(tid.to(device), B, E)
        exp = ref.ref_moe_align_block_size(tid, B, E)
        err = max(max_abs_err(a, b) for a, b in zip(got, exp))
        out.append(CheckResult(f"moe_align_block_size T={T} k={k} E={E} B={B}", err, 0.0))
    return out
