"""Plug torch_flashops' paged attention into a Hugging Face transformers model.

transformers picks a model's attention function by name from its ``AttentionInterface``
registry; we register ``"fops_paged"`` (transformers treats any name containing "flash" as a
FlashAttention kernel request, hence not "flashops"), which views the (dense, per-layer) K/V that
transformers hands over as a paged cache with one page per sequence and runs
``BatchPrefillWithPagedKVCacheWrapper`` over it: causal (bottom-right aligned, so it is right
for prefill and for decode steps alike) or, when transformers passes an attention mask, a
per-sequence custom mask.

    pip install transformers                           # not a dependency of torch_flashops
    python examples/transformers_attention.py          # tiny random Llama, compares with SDPA
"""
from __future__ import annotations

import torch

import torch_flashops as fo

_WORKSPACE: dict = {}


def flashops_paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, S, D]
    -> (attn_output [B, L, Hq, D], None)."""
    if dropout:
        raise NotImplementedError("flashops_paged attention is inference-only (dropout must be 0)")
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    dev = query.device
    # One page per sequence: cache [B, 2, S, Hkv, D] (NHD), page b holds sequence b.
    cache = torch.stack([key, value], 1).transpose(2, 3).contiguous()
    ws = _WORKSPACE.get(dev)
    if ws is None:
        ws = _WORKSPACE[dev] = torch.empty(16 << 20, dtype=torch.uint8, device=dev)
    wrapper = fo.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    i32 = dict(dtype=torch.int32, device=dev)
    qo_indptr = torch.arange(B + 1, **i32) * L
    kv_indptr = torch.arange(B + 1, **i32)
    kv_indices = torch.arange(B, **i32)
    last = torch.full((B,), S, **i32)
    mask = None
    if attention_mask is not None:
        m = attention_mask[..., -S:]
        keep = m if m.dtype == torch.bool else m == 0
        mask = keep.expand(B, 1, L, S)[:, 0].reshape(-1)  # per-request [L, S] flattened, concatenated
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, Hq, Hkv, D, S, custom_mask=mask,
                 causal=mask is None, sm_scale=scaling, q_data_type=query.dtype, kv_data_type=key.dtype)
    q = query.transpose(1, 2).reshape(B * L, Hq, D)
    o = wrapper.run(q, cache)
    return o.view(B, L, Hq, D), None


def register(name: str = "fops_paged") -> str:
    """Register the attention function with transformers; returns the name to pass as
    ``attn_implementation``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise SystemExit(f"this example needs Hugging Face transformers with AttentionInterface and masking_utils "
                         f"(pip install transformers): {e}") from None

    AttentionInterface.register(name, flashops_paged_attention)
    # Ask for SDPA-style masks (bool, True = attend; None when plain causal suffices): without
    # a registered mask function transformers passes no mask at all to custom attention.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def tiny_llama(attn_implementation: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = attn_implementation
    return LlamaForCausalLM(cfg).eval()


def main():
    name = register()
    ours, ref = tiny_llama(name), tiny_llama("sdpa")
    ids = torch.randint(0, 128, (2, 11))
    am = torch.ones_like(ids)
    am[1, :3] = 0  # sequence 1 is left-padded: exercises the custom-mask path
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits  # no mask: causal path
        ap, bp = ours(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits
        ga = ours.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
        gb = ref.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    real = am.bool()  # padded query rows attend to nothing; compare real tokens only
    err = max((a - b).abs().max().item(), (ap - bp)[real].abs().max().item())
    print(f"prefill logits max |flashops - sdpa| (causal and padded batches) = {err:.2e}")
    print(f"greedy generation identical: {torch.equal(ga, gb)}")
    return err, torch.equal(ga, gb)


if __name__ == "__main__":
    main()
