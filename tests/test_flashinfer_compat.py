"""FlashInfer import swap (docs/flashinfer_compat.md): code written for FlashInfer's covered APIs
runs by changing only its import.

1. Signatures: every covered FlashInfer function and wrapper method is compared, by
   ``inspect.signature``, with the signature the specs give (parameter names, order, kinds,
   defaults; annotations ignored). The expected signatures are data below, copied from
   docs/spec/{attention,rope,moe}.md; where moe.md §7 abbreviates a FlashInfer signature
   with "...", the full FlashInfer parameter list is given and ours must accept every call it
   accepts (``COMPATIBLE``).
2. Module paths: ``import torch_flashops as flashinfer`` serves ``flashinfer.<module>.<name>``
   and the names FlashInfer exports at top level.
3. ``install_as_flashinfer()``: in a subprocess (``sys.modules`` of the test process stays
   clean) unmodified FlashInfer-style code (``import flashinfer``, ``from flashinfer.decode
   import ...``) runs end to end on tiny CPU shapes and matches plain-PyTorch math.

A covered feature that torch_flashops does not provide at all yet is skipped with the reason;
one that exists but differs from the spec fails.
"""
from __future__ import annotations

import enum
import functools
import inspect
import os
import subprocess
import sys
import textwrap
import types

import pytest

import torch_flashops

# --------------------------------------------------------------------------- expected signatures
# "<flashinfer module>:<qualified name>" -> parameter list exactly as in the spec (or, for the
# COMPATIBLE entries, as in FlashInfer 0.6.x). ``...`` as a default = "has some default".

SPEC = {
    # rope.md §2-3, plus the trailing ``backend`` FlashInfer added with its CuTe-DSL kernels
    "rope:apply_rope": "q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, backend='cuda'",
    "rope:apply_rope_inplace": "q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, backend='cuda'",
    "rope:apply_rope_pos_ids": "q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, backend='cuda'",
    "rope:apply_rope_pos_ids_inplace": "q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, backend='cuda'",
    "rope:apply_llama31_rope": "q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, "
                               "rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend='cuda'",
    "rope:apply_llama31_rope_inplace": "q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, "
                                       "rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend='cuda'",
    "rope:apply_llama31_rope_pos_ids": "q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, "
                                       "rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192, backend='cuda'",
    "rope:apply_llama31_rope_pos_ids_inplace": "q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, "
                                               "rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, "
                                               "old_context_len=8192, backend='cuda'",
    "rope:apply_rope_with_cos_sin_cache": "positions, query, key, head_size, cos_sin_cache, is_neox=True, backend='cuda'",
    "rope:apply_rope_with_cos_sin_cache_inplace": "positions, query, key, head_size, cos_sin_cache, is_neox=True, backend='cuda'",
    # attention.md §1
    "page:get_seq_lens": "kv_indptr, kv_last_page_len, page_size",
    "page:get_batch_indices_positions": "append_indptr, seq_lens, nnz, batch_indices=None, positions=None",
    "page:append_paged_kv_cache": "append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, "
                                  "kv_indptr, kv_last_page_len, kv_layout='NHD'",
    # attention.md §0.4 (mask utilities)
    "quantization:packbits": "x, bitorder='big'",
    "quantization:segment_packbits": "x, indptr, bitorder='big'",
    # attention.md §2
    "decode:single_decode_with_kv_cache": "q, k, v, kv_layout='NHD', pos_encoding_mode='NONE', use_tensor_cores=False, "
                                          "q_scale=None, k_scale=None, v_scale=None, window_left=-1, "
                                          "logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None, "
                                          "return_lse=False, *, lse_base='log2'",
    "prefill:single_prefill_with_kv_cache": "q, k, v, scale_q=None, scale_k=None, scale_v=None, o_dtype=None, "
                                            "custom_mask=None, packed_custom_mask=None, causal=False, kv_layout='NHD', "
                                            "pos_encoding_mode='NONE', use_fp16_qk_reduction=False, sm_scale=None, "
                                            "window_left=-1, logits_soft_cap=None, rope_scale=None, rope_theta=None, "
                                            "backend='auto', return_lse=False, kv_cache_sf=None, k_scale=None, "
                                            "v_scale=None, *, lse_base='log2'",
    # attention.md §4. plan: the spec shows the options after `*` and says they are also accepted
    # positionally (deprecated), i.e. a `*args` catch-all followed by keyword-only options.
    # FlashInfer's decode module (a plan() for SGLang's draft-step wrappers)
    "decode:fast_decode_plan": "self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, "
                               "page_size, pos_encoding_mode='NONE', window_left=-1, logits_soft_cap=None, "
                               "q_data_type=None, kv_data_type=None, data_type=None, sm_scale=None, rope_scale=None, "
                               "rope_theta=None, non_blocking=True, fixed_split_size=None, disable_split_kv=False, "
                               "global_override_indptr_cpu=None",
    "decode:BatchDecodeWithPagedKVCacheWrapper.__init__":
        "self, float_workspace_buffer, kv_layout='NHD', use_cuda_graph=False, use_tensor_cores=False, "
        "paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None, "
        "backend='auto', jit_args=None",
    "decode:BatchDecodeWithPagedKVCacheWrapper.plan":
        "self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *args, "
        "pos_encoding_mode='NONE', window_left=-1, window_right=0, logits_soft_cap=None, q_data_type='float16', "
        "kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None, rope_scale=None, rope_theta=None, "
        "non_blocking=True, block_tables=None, seq_lens=None, fixed_split_size=None, disable_split_kv=False, "
        "q_len_per_req=1",
    "decode:BatchDecodeWithPagedKVCacheWrapper.run":
        "self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None, "
        "return_lse=False, enable_pdl=None, window_left=None, sinks=None, q_len_per_req=None, "
        "skip_softmax_threshold_scale_factor=None, kv_cache_sf=None, lse_base='log2'",
    "decode:CUDAGraphBatchDecodeWithPagedKVCacheWrapper.__init__":
        "self, workspace_buffer, indptr_buffer, indices_buffer, last_page_len_buffer, kv_layout='NHD', "
        "use_tensor_cores=False",
    # attention.md §5
    "prefill:BatchPrefillWithPagedKVCacheWrapper.__init__":
        "self, float_workspace_buffer, kv_layout='NHD', use_cuda_graph=False, qo_indptr_buf=None, "
        "paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, custom_mask_buf=None, "
        "mask_indptr_buf=None, backend='auto', jit_args=None, jit_kwargs=None",
    "prefill:BatchPrefillWithPagedKVCacheWrapper.plan":
        "self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, "
        "head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None, causal=False, "
        "pos_encoding_mode='NONE', use_fp16_qk_reduction=False, sm_scale=None, window_left=-1, "
        "logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type='float16', kv_data_type=None, "
        "o_data_type=None, non_blocking=True, prefix_len_ptr=None, token_pos_in_items_ptr=None, "
        "token_pos_in_items_len=0, max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None, "
        "max_token_per_sequence=None, max_sequence_kv=None, fixed_split_size=None, disable_split_kv=False",
    "prefill:BatchPrefillWithPagedKVCacheWrapper.run":
        "self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None, "
        "return_lse=False, enable_pdl=None, window_left=None, sinks=None, kv_cache_sf=None, "
        "skip_softmax_threshold_scale_factor=None, use_fp16_softmax=None, uses_spcompress=None, lse_base='log2'",
    # attention.md §6
    "prefill:BatchPrefillWithRaggedKVCacheWrapper.__init__":
        "self, float_workspace_buffer, kv_layout='NHD', use_cuda_graph=False, qo_indptr_buf=None, kv_indptr_buf=None, "
        "custom_mask_buf=None, mask_indptr_buf=None, backend='auto', jit_args=None, jit_kwargs=None",
    "prefill:BatchPrefillWithRaggedKVCacheWrapper.plan":
        "self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None, custom_mask=None, "
        "packed_custom_mask=None, causal=False, pos_encoding_mode='NONE', use_fp16_qk_reduction=False, "
        "window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None, "
        "q_data_type='float16', kv_data_type=None, o_data_type=None, non_blocking=True, prefix_len_ptr=None, "
        "token_pos_in_items_ptr=None, token_pos_in_items_len=0, max_item_len_ptr=None, fixed_split_size=None, "
        "disable_split_kv=False, seq_lens=None, seq_lens_q=None, max_token_per_sequence=None, "
        "max_sequence_kv=None, v_indptr=None, o_indptr=None",
    "prefill:BatchPrefillWithRaggedKVCacheWrapper.run":
        "self, q, k, v, *args, q_scale=None, k_scale=None, v_scale=None, o_scale=None, out=None, lse=None, "
        "return_lse=False, enable_pdl=None, kv_cache_sf=None, lse_base='log2'",
    # attention.md §7
    "cascade:merge_state": "v_a, s_a, v_b, s_b, *, lse_base='log2'",
    "cascade:merge_state_in_place": "v, s, v_other, s_other, mask=None, *, lse_base='log2'",
    "cascade:merge_states": "v, s, *, lse_base='log2'",
    "triton.cascade:merge_state": "v_a, s_a, v_b, s_b, *, lse_base='log2'",
    "triton.cascade:merge_state_in_place": "v, s, v_other, s_other, mask=None, *, lse_base='log2'",
    "triton.cascade:merge_states": "v, s, *, lse_base='log2'",
    "triton.cascade:variable_length_merge_states": "v, s, indptr, *, lse_base='log2'",
    "cascade:MultiLevelCascadeAttentionWrapper.__init__":
        "self, num_levels, float_workspace_buffer, kv_layout='NHD', use_cuda_graph=False, qo_indptr_buf_arr=None, "
        "paged_kv_indptr_buf_arr=None, paged_kv_indices_buf_arr=None, paged_kv_last_page_len_buf_arr=None",
    "cascade:MultiLevelCascadeAttentionWrapper.plan":
        "self, qo_indptr_arr, paged_kv_indptr_arr, paged_kv_indices_arr, paged_kv_last_page_len, num_qo_heads, "
        "num_kv_heads, head_dim, page_size, causal=False, pos_encoding_mode='NONE', use_fp16_qk_reduction=False, "
        "sm_scale=None, window_left=-1, logits_soft_cap=None, rope_scale=None, rope_theta=None, "
        "q_data_type='float16', kv_data_type=None",
    "cascade:MultiLevelCascadeAttentionWrapper.run": "self, q, paged_kv_cache",
    # FlashInfer's older two-level cascade wrappers (flashinfer/cascade.py, 0.6.x; not in the spec)
    "cascade:BatchDecodeWithSharedPrefixPagedKVCacheWrapper.__init__": "self, float_workspace_buffer, kv_layout='NHD'",
    "cascade:BatchDecodeWithSharedPrefixPagedKVCacheWrapper.begin_forward":
        "self, unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len, num_qo_heads, num_kv_heads, head_dim, "
        "page_size, data_type='float16'",
    "cascade:BatchDecodeWithSharedPrefixPagedKVCacheWrapper.forward": "self, q, k_shared, v_shared, unique_kv_cache",
    "cascade:BatchPrefillWithSharedPrefixPagedKVCacheWrapper.__init__": "self, float_workspace_buffer, kv_layout='NHD'",
    "cascade:BatchPrefillWithSharedPrefixPagedKVCacheWrapper.begin_forward":
        "self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads, num_kv_heads, "
        "head_dim, page_size",
    "cascade:BatchPrefillWithSharedPrefixPagedKVCacheWrapper.forward":
        "self, q, k_shared, v_shared, unique_kv_cache, causal=False, use_fp16_qk_reduction=False, sm_scale=None, "
        "rope_scale=None, rope_theta=None",
    # moe.md §3, §7
    "activation:silu_and_mul": "input, out=None, enable_pdl=None",
    # (the two GELU forms: FlashInfer's flashinfer.activation signatures, beside the spec's silu)
    "activation:gelu_and_mul": "input, out=None, enable_pdl=None",
    "activation:gelu_tanh_and_mul": "input, out=None, enable_pdl=None",
    "fused_moe:fused_topk_deepseek": "scores, bias, n_group, topk_group, topk, routed_scaling_factor, topk_values, "
                                     "topk_indices, launch_with_pdl=True, routing_replay_out=None, *, "
                                     "backend='default'",
    # moe.md §7 abbreviates these; FlashInfer's full lists (COMPATIBLE below; moe_sort's out_*
    # buffers and their helpers as of 0.7; cutlass_fused_moe as of 0.7's later releases, which put
    # use_wfp4afp8_humming before tune_max_num_tokens and add the keyword-only SiTU betas).
    "moe_utils:moe_sort": "token_selected_experts, token_final_scales, num_experts, top_k, local_expert_offset=0, "
                          "num_local_experts=None, tile_tokens_dim=128, enable_pdl=False, "
                          "out_tile_idx_to_expert_idx=None, out_tile_idx_to_mn_limit=None, "
                          "out_expanded_idx_to_permuted_idx=None, out_permuted_idx_to_expanded_idx=None, "
                          "out_total_num_padded_tokens=None, out_num_non_exiting_tiles=None",
    "moe_utils:allocate_moe_sort_buffers": "num_tokens, num_experts, top_k, num_local_experts=None, "
                                           "tile_tokens_dim=128, device='cuda'",
    "moe_utils:get_max_num_tiles": "num_tokens, top_k, num_local_experts, tile_size",
    "moe_utils:get_max_num_permuted_tokens": "num_tokens, top_k, num_local_experts, tile_size",
    "moe_utils:moe_permute": "input, permuted_output, tile_idx_to_mn_limit, permuted_idx_to_expanded_idx, "
                             "num_non_exiting_tiles, max_num_permuted_tokens, top_k, tile_size, enable_pdl=False, "
                             "input_sf=None, permuted_sf=None",
    "moe_utils:moe_unpermute": "permuted_input, output, expanded_idx_to_permuted_idx, topk_scales, num_tokens, top_k, "
                               "enable_pdl=False",
    "fused_moe:cutlass_fused_moe": "input, token_selected_experts, token_final_scales, fc1_expert_weights, "
                                   "fc2_expert_weights, output_dtype, quant_scales, fc1_expert_biases=None, "
                                   "fc2_expert_biases=None, input_sf=None, swiglu_alpha=None, swiglu_beta=None, "
                                   "swiglu_limit=None, tp_size=1, tp_rank=0, ep_size=1, ep_rank=0, cluster_size=1, "
                                   "cluster_rank=0, output=None, enable_alltoall=False, "
                                   "use_deepseek_fp8_block_scale=False, use_w4_group_scaling=False, "
                                   "use_mxfp8_act_scaling=False, min_latency_mode=False, use_packed_weights=False, "
                                   "use_wfp4afp8_humming=False, tune_max_num_tokens=8192, enable_pdl=None, "
                                   "activation_type=..., swizzled_input_sf=True, use_fused_finalize=True, "
                                   "profile_ids=None, workspace_buffer=None, *, situ_beta=None, "
                                   "situ_linear_beta=None",
}
COMPATIBLE = {"moe_utils:moe_sort", "moe_utils:moe_permute", "moe_utils:moe_unpermute", "fused_moe:cutlass_fused_moe"}

# FlashInfer's functools.partial / partialmethod aliases: name -> (base, bound keywords).
PARTIALS = {
    "prefill:single_prefill_with_kv_cache_return_lse": ("prefill:single_prefill_with_kv_cache", {"return_lse": True}),
}
WRAPPERS = {
    "decode:BatchDecodeWithPagedKVCacheWrapper": "decode:BatchDecodeWithPagedKVCacheWrapper",
    "decode:CUDAGraphBatchDecodeWithPagedKVCacheWrapper": "decode:BatchDecodeWithPagedKVCacheWrapper",
    "prefill:BatchPrefillWithPagedKVCacheWrapper": "prefill:BatchPrefillWithPagedKVCacheWrapper",
    "prefill:BatchPrefillWithRaggedKVCacheWrapper": "prefill:BatchPrefillWithRaggedKVCacheWrapper",
    "cascade:MultiLevelCascadeAttentionWrapper": "cascade:MultiLevelCascadeAttentionWrapper",
}  # class -> the class whose plan/run spec it shares (CUDAGraph* inherits decode's)

# Names FlashInfer's modules re-export from another module (decode.py and prefill.py import
# page.get_seq_lens; vLLM imports it from flashinfer.decode): path -> names.
RE_EXPORTS = {"decode": ["get_seq_lens", "_get_range_buf"], "prefill": ["get_seq_lens"],
              # (where flashinfer.fused_moe's names are defined; vLLM and SGLang import ActivationType from it)
              "fused_moe.core": ["cutlass_fused_moe", "ActivationType", "RoutingMethodType"],
              "fused_moe.fused_routing_dsv3": ["fused_topk_deepseek"], "dsv3_ops": ["fused_topk_deepseek"],
              "tllm_enums": ["ActivationType", "RoutingMethodType"]}

# The covered names FlashInfer also exports from its top-level package (flashinfer/__init__.py).
TOP_LEVEL = {
    "decode": ["single_decode_with_kv_cache", "BatchDecodeWithPagedKVCacheWrapper",
               "CUDAGraphBatchDecodeWithPagedKVCacheWrapper", "fast_decode_plan"],
    "prefill": ["single_prefill_with_kv_cache", "single_prefill_with_kv_cache_return_lse",
                "BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper"],
    "cascade": ["merge_state", "merge_state_in_place", "merge_states", "MultiLevelCascadeAttentionWrapper",
                "BatchDecodeWithSharedPrefixPagedKVCacheWrapper", "BatchPrefillWithSharedPrefixPagedKVCacheWrapper"],
    "page": ["append_paged_kv_cache", "get_batch_indices_positions", "get_seq_lens"],
    "quantization": ["packbits", "segment_packbits"],
    "rope": ["apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
             "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
             "apply_llama31_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache",
             "apply_rope_with_cos_sin_cache_inplace"],
    "activation": ["silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul"],
    "fused_moe": ["cutlass_fused_moe", "ActivationType", "RoutingMethodType"],
}

# --------------------------------------------------------------------------- helpers


def _stub(params: str):
    """A function whose signature is ``params`` (the spec text), for comparing signatures."""
    ns = {}
    exec(f"def stub({params}):\n    pass", {}, ns)  # noqa: S102 - parsing our own literal table
    return ns["stub"]


@functools.lru_cache(maxsize=None)
def _compat_modules():
    """The modules install_as_flashinfer() registers, built without touching sys.modules."""
    from torch_flashops import compat
    return compat._build()


def _lookup(key: str):
    """Our object for ``"<module>:<Qual.name>"``; skips if the feature is not provided at all."""
    path, qual = key.split(":")
    obj = _compat_modules()[path]
    for i, part in enumerate(qual.split(".")):
        if not hasattr(obj, part):
            if i == 0:
                pytest.skip(f"flashinfer.{path}.{part} is not implemented in torch_flashops yet")
            raise AssertionError(f"flashinfer.{path}.{qual}: {obj.__name__} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _params(sig: inspect.Signature):
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _fmt(params):
    out = []
    for name, kind, default in params:
        star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(kind, "")
        kw = "(kw-only)" if kind == inspect.Parameter.KEYWORD_ONLY else ""
        d = "" if default is inspect.Parameter.empty else f"={default!r}"
        out.append(f"{star}{name}{kw}{d}")
    return ", ".join(out)


def _same_default(ours, theirs) -> bool:
    if theirs is Ellipsis:  # "has a default" (FlashInfer's enum default)
        return ours is not inspect.Parameter.empty
    if isinstance(theirs, (bool, str, type(None))) or isinstance(ours, (bool, str, type(None))):
        return type(ours) is type(theirs) and ours == theirs
    return ours == theirs  # numbers: 1e4 == 10000


def assert_signature(key: str, ours: inspect.Signature, expected: inspect.Signature, compatible=False):
    """Exact: same parameters (name, kind, default) in the same order. Compatible: every call
    FlashInfer accepts binds the same way here (same positional prefix, FlashInfer defaults kept,
    our extra parameters optional)."""
    got, want = _params(ours), _params(expected)
    msg = f"flashinfer.{key.replace(':', '.')} signature differs from the spec:\n  ours: ({_fmt(got)})\n  spec: ({_fmt(want)})"
    if not compatible:
        assert [(n, k) for n, k, _ in got] == [(n, k) for n, k, _ in want], msg
        bad = [n for (n, _, a), (_, _, b) in zip(got, want) if not _same_default(a, b)]
        assert not bad, f"{msg}\n  defaults differ: {bad}"
        return
    by_name = {n: (i, k, d) for i, (n, k, d) in enumerate(got)}
    for i, (name, kind, default) in enumerate(want):
        assert name in by_name, f"{msg}\n  missing: {name}"
        j, k, d = by_name[name]
        if kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
            assert (j, k) == (i, kind), f"{msg}\n  {name}: position/kind differs"
        if default is not inspect.Parameter.empty:
            assert _same_default(d, default), f"{msg}\n  {name}: default {d!r} != {default!r}"
    for name, kind, default in got:
        if name not in {n for n, _, _ in want}:
            assert default is not inspect.Parameter.empty or kind in (inspect.Parameter.VAR_POSITIONAL,
                                                                       inspect.Parameter.VAR_KEYWORD), \
                f"{msg}\n  extra parameter {name} must be optional"


# --------------------------------------------------------------------------- 1. signatures


@pytest.mark.parametrize("key", sorted(SPEC))
def test_signature(key):
    assert_signature(key, inspect.signature(_lookup(key)), inspect.signature(_stub(SPEC[key])),
                     compatible=key in COMPATIBLE)


@pytest.mark.parametrize("key", sorted(PARTIALS))
def test_partial_alias_signature(key):
    base, bound = PARTIALS[key]
    expected = inspect.signature(functools.partial(_stub(SPEC[base]), **bound))
    assert_signature(key, inspect.signature(_lookup(key)), expected)


@pytest.mark.parametrize("cls_key", sorted(WRAPPERS))
def test_wrapper_aliases(cls_key):
    """run_return_lse = partialmethod(run, return_lse=True); begin_forward = plan; end_forward();
    forward / forward_return_lse exist (attention.md §3, §7)."""
    cls = _lookup(cls_key)
    spec_cls = WRAPPERS[cls_key]
    run_spec, plan_spec = SPEC[f"{spec_cls}.run"], SPEC[f"{spec_cls}.plan"]
    if cls_key != spec_cls:  # inherited plan/run match the parent's spec too
        assert_signature(f"{cls_key}.plan", inspect.signature(cls.plan), inspect.signature(_stub(plan_spec)))
        assert_signature(f"{cls_key}.run", inspect.signature(cls.run), inspect.signature(_stub(run_spec)))
    assert_signature(f"{cls_key}.begin_forward", inspect.signature(cls.begin_forward),
                     inspect.signature(_stub(plan_spec)))
    assert callable(getattr(cls, "forward", None)), f"{cls_key}.forward missing"
    if "return_lse" in run_spec:
        Stub = type("Stub", (), {"run": _stub(run_spec)})
        Stub.run_return_lse = functools.partialmethod(Stub.run, return_lse=True)
        assert_signature(f"{cls_key}.run_return_lse", inspect.signature(cls.run_return_lse),
                         inspect.signature(Stub.run_return_lse))
        assert_signature(f"{cls_key}.end_forward", inspect.signature(cls.end_forward),
                         inspect.signature(_stub("self")))
        assert callable(getattr(cls, "forward_return_lse", None)), f"{cls_key}.forward_return_lse missing"


def test_routing_method_type_values():
    """moe.md §7: the FlashInfer routing enum; values shared by every 0.6.x release."""
    RMT = _lookup("fused_moe:RoutingMethodType")
    assert issubclass(RMT, enum.IntEnum)
    want = dict(Default=0, Renormalize=1, DeepSeekV3=2, Llama4=3, RenormalizeNaive=4)
    assert {n: int(RMT[n]) for n in want} == want


# --------------------------------------------------------------------------- 2. module paths


@pytest.mark.parametrize("path", sorted({k.split(":")[0] for k in SPEC} | set(TOP_LEVEL) | set(RE_EXPORTS)))
def test_import_as_module_paths(path):
    """``import torch_flashops as flashinfer``: ``flashinfer.<path>.<name>`` reaches every
    covered name (activation and moe_utils included, as FlashInfer's package binds them), and
    the re-exports too (``flashinfer.decode.get_seq_lens``, which vLLM imports)."""
    import torch_flashops as flashinfer

    names = sorted({k.split(":")[1].split(".")[0] for k in SPEC if k.startswith(path + ":")}
                   | set(TOP_LEVEL.get(path, [])) | set(RE_EXPORTS.get(path, [])))
    mod = flashinfer
    for part in path.split("."):
        mod = getattr(mod, part)
        assert isinstance(mod, types.ModuleType), (
            f"torch_flashops.{part} is {type(mod).__name__} {mod!r}, not a module: "
            f"`import torch_flashops as flashinfer; flashinfer.{path}.<name>` breaks")
    absent = [n for n in names if not hasattr(mod, n)]
    if absent and all(not hasattr(torch_flashops, n) for n in absent):
        pytest.skip(f"not implemented in torch_flashops yet: {absent}")
    assert not absent, f"flashinfer.{path} lacks {absent}"
    alias = _compat_modules()[path]
    assert all(getattr(mod, n) is getattr(alias, n) for n in names), "install_as_flashinfer() serves other objects"


@pytest.mark.parametrize("path", sorted(TOP_LEVEL))
def test_top_level_names(path):
    """FlashInfer's top-level exports of covered names are the same objects at our top level."""
    import torch_flashops as flashinfer

    absent = [n for n in TOP_LEVEL[path] if not hasattr(flashinfer, n)]
    if absent:
        pytest.skip(f"not implemented in torch_flashops yet: {absent}")
    mod = _compat_modules()[path]
    for n in TOP_LEVEL[path]:
        assert getattr(flashinfer, n) is getattr(mod, n), f"flashinfer.{n} is not flashinfer.{path}.{n}"


def test_compat_table_matches_spec():
    """compat.FLASHINFER_MODULES (what install_as_flashinfer registers, and the doc's table)
    lists exactly the covered names of this file, and each alias module holds them."""
    from torch_flashops.compat import FLASHINFER_MODULES

    want = {}
    for key in list(SPEC) + list(PARTIALS):
        path, qual = key.split(":")
        want.setdefault(path, set()).add(qual.split(".")[0])
    for path, names in list(TOP_LEVEL.items()) + list(RE_EXPORTS.items()):
        want.setdefault(path, set()).update(names)
    got = {p: set(n) for p, (_, n) in FLASHINFER_MODULES.items() if n}
    assert got == want
    mods = _compat_modules()
    assert mods["decode"].get_seq_lens is mods["prefill"].get_seq_lens is mods["page"].get_seq_lens
    absent = sorted(f"flashinfer.{p}.{n}" for p, names in got.items() for n in names if not hasattr(mods[p], n))
    if absent:
        pytest.skip(f"not implemented in torch_flashops yet: {absent}")


# --------------------------------------------------------------------------- 3. install_as_flashinfer


def test_install_refuses_real_flashinfer(monkeypatch):
    from torch_flashops.compat import install_as_flashinfer

    real = types.ModuleType("flashinfer")
    monkeypatch.setitem(sys.modules, "flashinfer", real)
    with pytest.raises(RuntimeError, match="real flashinfer is already imported"):
        install_as_flashinfer()
    assert sys.modules["flashinfer"] is real
    monkeypatch.delitem(sys.modules, "flashinfer")
    monkeypatch.setitem(sys.modules, "flashinfer.decode", types.ModuleType("flashinfer.decode"))
    with pytest.raises(RuntimeError, match="flashinfer.decode"):
        install_as_flashinfer()
    assert "flashinfer" not in sys.modules


# Unmodified FlashInfer-style code: only the first two lines are ours. Tiny fp32 shapes, compared
# with plain PyTorch written inline (GQA 4:2, page_size 4, two requests).
SNIPPET = r'''
from torch_flashops.compat import install_as_flashinfer
fi_mod = install_as_flashinfer()

import importlib.util, math
import torch
import flashinfer
import flashinfer.triton.cascade
from flashinfer.activation import gelu_and_mul, gelu_tanh_and_mul, silu_and_mul
from flashinfer.cascade import BatchDecodeWithSharedPrefixPagedKVCacheWrapper, merge_state
from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
from flashinfer.fused_moe import RoutingMethodType, cutlass_fused_moe
from flashinfer.fused_moe.core import ActivationType  # (vLLM's and SGLang's import path)
from flashinfer.tllm_enums import ActivationType as ActivationType2, RoutingMethodType as RoutingMethodType2
from flashinfer.fused_moe.fused_routing_dsv3 import fused_topk_deepseek
from flashinfer.dsv3_ops import fused_topk_deepseek as fused_topk_deepseek2
assert ActivationType2 is ActivationType and RoutingMethodType2 is RoutingMethodType
assert fused_topk_deepseek is fused_topk_deepseek2 is flashinfer.fused_moe.fused_topk_deepseek
from flashinfer.page import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from flashinfer.prefill import single_prefill_with_kv_cache
from flashinfer.decode import _get_range_buf  # (SGLang's and vLLM's backends import it)
r = _get_range_buf(5, "cpu")
assert r.dtype == torch.int32 and r.tolist() == [0, 1, 2, 3, 4] and _get_range_buf(0, "cpu").numel() == 0
assert _get_range_buf(7, "cpu").data_ptr() == r.data_ptr()  # (one cached buffer per power of two, as FlashInfer)

assert flashinfer is fi_mod and install_as_flashinfer() is fi_mod
assert importlib.util.find_spec("flashinfer") is not None
assert flashinfer.BatchDecodeWithPagedKVCacheWrapper is BatchDecodeWithPagedKVCacheWrapper
assert flashinfer.fused_moe.cutlass_fused_moe is cutlass_fused_moe
try:
    flashinfer.rmsnorm
except AttributeError as e:
    assert "flashinfer_compat.md" in str(e)
else:
    raise AssertionError("flashinfer.rmsnorm should not exist")

g = torch.Generator().manual_seed(0)
rnd = lambda *s: torch.randn(*s, generator=g)
Hq, Hkv, D, page = 4, 2, 16, 4
seq = [5, 9]
npages = [(n + page - 1) // page for n in seq]
kv_indptr = torch.tensor([0, npages[0], sum(npages)], dtype=torch.int32)
kv_indices = torch.tensor([3, 0, 5, 1, 4], dtype=torch.int32)
last = torch.tensor([(n - 1) % page + 1 for n in seq], dtype=torch.int32)
assert get_seq_lens(kv_indptr, last, page).tolist() == seq

# prefill-style append of every token, keys rotated first (cached K holds rotated keys)
nnz = sum(seq)
append_indptr = torch.tensor([0, seq[0], nnz], dtype=torch.int32)
bi, pos = get_batch_indices_positions(append_indptr, torch.tensor(seq, dtype=torch.int32), nnz)
k, v = rnd(nnz, Hkv, D), rnd(nnz, Hkv, D)
q_all = rnd(nnz, Hq, D)
q_rot, k_rot = flashinfer.apply_rope_pos_ids(q_all, k, pos)
half = D // 2
f = 1e4 ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
ang = pos.double()[:, None] * f
cos, sin = ang.cos()[:, None], ang.sin()[:, None]
kd = k.double()
k_ref = torch.cat([kd[..., :half] * cos - kd[..., half:] * sin, kd[..., half:] * cos + kd[..., :half] * sin], -1)
assert torch.allclose(k_rot.double(), k_ref, atol=1e-5), "apply_rope_pos_ids"
cache = torch.zeros(6, 2, page, Hkv, D)
append_paged_kv_cache(k_rot, v, bi, pos, cache, kv_indices, kv_indptr, last)

# decode: the last query row of each request against all its cached tokens
ws = torch.empty(1 << 20, dtype=torch.uint8)
w = BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
w.plan(kv_indptr, kv_indices, last, Hq, Hkv, D, page, q_data_type=torch.float32)
ends = append_indptr[1:].long() - 1
q = q_rot[ends]
o, lse = w.run(q, cache, return_lse=True)

def dense(qr, kr, vr):  # qr [Hq, D], kr/vr [n, Hkv, D] -> (o [Hq, D], lse base 2 [Hq])
    kr, vr = kr.double().repeat_interleave(Hq // Hkv, 1), vr.double().repeat_interleave(Hq // Hkv, 1)
    s = torch.einsum("hd,nhd->hn", qr.double(), kr) / math.sqrt(D)
    return torch.einsum("hn,nhd->hd", s.softmax(-1), vr), torch.logsumexp(s, -1) / math.log(2)

for b in range(2):
    lo, hi = int(append_indptr[b]), int(append_indptr[b + 1])
    ro, rl = dense(q[b], k_rot[lo:hi], v[lo:hi])
    assert torch.allclose(o[b].double(), ro, atol=1e-5), f"decode o, request {b}"
    assert torch.allclose(lse[b].double(), rl, atol=1e-4), f"decode lse, request {b}"

# attention states: two halves of request 1 merged == the whole (decode result)
lo, hi = int(append_indptr[1]), int(append_indptr[2])
parts = [single_prefill_with_kv_cache(q[1:2], k_rot[a:c], v[a:c], return_lse=True)
         for a, c in ((lo, lo + 4), (lo + 4, hi))]
mo, ml = merge_state(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
assert torch.allclose(mo[0], o[1], atol=1e-5) and torch.allclose(ml[0], lse[1], atol=1e-4), "merge_state"
vo, vl = flashinfer.triton.cascade.variable_length_merge_states(
    torch.cat([parts[0][0], parts[1][0]]), torch.cat([parts[0][1], parts[1][1]]),
    torch.tensor([0, 2], dtype=torch.int32))
assert torch.allclose(vo[0], o[1], atol=1e-5) and torch.allclose(vl[0], lse[1], atol=1e-4), "variable_length_merge_states"
# the older shared-prefix cascade: request 1's first page (page 5) as a contiguous prefix, its
# other two pages (1 and 4, one token on the last) as the paged unique part
sp = BatchDecodeWithSharedPrefixPagedKVCacheWrapper(ws, "NHD")
sp.begin_forward(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([1, 4], dtype=torch.int32),
                 torch.tensor([1], dtype=torch.int32), Hq, Hkv, D, page, data_type=torch.float32)
so = sp.forward(q[1:2], k_rot[lo:lo + 4], v[lo:lo + 4], cache)
assert torch.allclose(so[0], o[1], atol=1e-5), "BatchDecodeWithSharedPrefixPagedKVCacheWrapper"

# activation and the CUTLASS-style MoE entry point (fc1 = [up; gate])
x = rnd(3, 2 * 8)
assert torch.allclose(silu_and_mul(x), torch.nn.functional.silu(x[:, :8]) * x[:, 8:], atol=1e-6), "silu_and_mul"
for fn, approximate in ((gelu_and_mul, "none"), (flashinfer.gelu_tanh_and_mul, "tanh")):
    assert torch.allclose(fn(x), torch.nn.functional.gelu(x[:, :8], approximate=approximate) * x[:, 8:],
                          atol=1e-6), fn.__name__
assert flashinfer.gelu_tanh_and_mul is gelu_tanh_and_mul
T, H, I, E = 3, 16, 8, 4
hs = rnd(T, H)
ids = torch.tensor([[0, 2], [3, 1], [2, 0]], dtype=torch.int32)
wts = torch.rand(T, 2, generator=g)
fc1, fc2 = rnd(E, 2 * I, H) * 0.3, rnd(E, H, I) * 0.3
out = cutlass_fused_moe(hs, ids, wts, fc1, fc2, torch.float32, quant_scales=[],
                        activation_type=ActivationType.Swiglu)[0]
want = torch.zeros(T, H, dtype=torch.float64)
for t in range(T):
    for j in range(2):
        e = int(ids[t, j])
        up, gate = (fc1[e].double() @ hs[t].double()).split(I)
        want[t] += float(wts[t, j]) * (fc2[e].double() @ (torch.nn.functional.silu(gate) * up))
assert torch.allclose(out.double(), want, atol=1e-4), "cutlass_fused_moe"
assert int(RoutingMethodType.Renormalize) == 1
print("FLASHINFER-SNIPPET-OK")
'''


def test_install_as_flashinfer_runs_flashinfer_code():
    """``install_as_flashinfer()`` then unmodified FlashInfer-style code, in a fresh interpreter."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SNIPPET)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FLASHINFER-SNIPPET-OK" in proc.stdout, \
        f"snippet failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
