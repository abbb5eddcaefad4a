"""MoE routing and moe_align_block_size against plain PyTorch, eager and torch.compile'd.

Model shapes (spec moe.md §9 and issue 4), router logits bf16 ``[T, E]``:
  Mixtral-8x7B        E=8   k=2  topk_softmax renorm
  Qwen3-30B-A3B       E=128 k=8  topk_softmax renorm
  gpt-oss-20b / 120b  E=32 / 128, k=4, topk_softmax renorm
  DeepSeek-V3/R1      E=256 k=8  grouped_topk sigmoid + bias, 8 groups keep 4, rsf 2.5
  DeepSeek-V2         E=160 k=6  grouped_topk softmax, 8 groups keep 3, rsf 16
  Kimi-K2             E=384 k=8  grouped_topk sigmoid + bias, 1 group
  Llama-4 Scout / Maverick  E=16 / 128, k=1, topk_sigmoid
at T in {1, 16, 64, 256, 1024, 4096, 16384}; align of each model's ids with BLOCK 16 (T <= 256)
or 64 (the grouped GEMM's usual BLOCK_M), ids from the routing itself.

Everything here is tiny and launch-bound, so all rows are CUDA-graph replays (device time, no
host overhead). Bytes that must move: logits read + weights/ids written (routing); ids read +
sorted_token_ids / expert_ids / num_tokens_post_pad written (align).

Peers: ``torch-eager`` is plain PyTorch without host syncs (routing: the spec oracles in
``reference/moe_routing.py``; align: a stable sort by bucket, scatter_add counts, searchsorted
for the block experts, same layout as ours); ``torch-compile`` is the same function under
``torch.compile(dynamic=True)``.
"""
from __future__ import annotations

import torch

from torch_flashops.meta.moe_routing import align_sizes
from torch_flashops.reference import moe_routing as ref

# name: (E, k, kind, kwargs)
MODELS = {
    "mixtral-8x7b": (8, 2, "softmax", dict(renormalize=True)),
    "qwen3-30b-a3b": (128, 8, "softmax", dict(renormalize=True)),
    "gpt-oss-20b": (32, 4, "softmax", dict(renormalize=True)),
    "gpt-oss-120b": (128, 4, "softmax", dict(renormalize=True)),
    "deepseek-v3": (256, 8, "grouped", dict(n_group=8, topk_group=4, bias=True, scoring_func="sigmoid",
                                            renormalize=True, routed_scaling_factor=2.5)),
    "deepseek-v2": (160, 6, "grouped", dict(n_group=8, topk_group=3, bias=False, scoring_func="softmax",
                                            renormalize=False, routed_scaling_factor=16.0)),
    "kimi-k2": (384, 8, "grouped", dict(n_group=1, topk_group=1, bias=True, scoring_func="sigmoid",
                                        renormalize=True, routed_scaling_factor=2.827)),
    "llama4-scout": (16, 1, "sigmoid", {}),
    "llama4-maverick": (128, 1, "sigmoid", {}),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
_N_SETS = 4  # distinct inputs cycled per timing (all L2-resident: router outputs are hot)


# ------------------------------------------------------------------ plain-PyTorch peers
def torch_moe_align_block_size(topk_ids, block_size: int, num_experts: int):
    """moe_align_block_size in torch ops, no host sync (static sizes, device counts)."""
    flat = topk_ids.reshape(-1).long()
    numel, E, B = flat.numel(), num_experts, block_size
    bucket = torch.where((flat >= 0) & (flat < E), flat, E)
    counts = torch.zeros(E + 1, dtype=torch.long, device=flat.device).scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts + B - 1) // B * B
    end = padded.cumsum(0)
    start = end - padded
    first = counts.cumsum(0) - counts
    order = torch.sort(bucket, stable=True).indices
    sb = bucket[order]
    dest = start[sb] + torch.arange(numel, device=flat.device) - first[sb]
    cap, n_blocks = align_sizes(numel, E, B, False)
    sorted_ids = torch.full((cap,), numel, dtype=torch.int32, device=flat.device).scatter_(0, dest, order.int())
    blk_start = torch.arange(n_blocks, device=flat.device) * B
    blk_bucket = torch.searchsorted(end, blk_start, right=True)
    ntp = end[-1:]
    expert_ids = torch.where((blk_start < ntp) & (blk_bucket < E), blk_bucket, -1).int()
    return sorted_ids, expert_ids, ntp.int()


def _routing_fns(fo, kind, k, kw, bias):
    """(peer, ours) taking the logits only."""
    if kind == "softmax":
        return (lambda x: ref.ref_topk_softmax(x, k, kw["renormalize"]),
                lambda x: fo.topk_softmax(x, k, kw["renormalize"]))
    if kind == "sigmoid":
        return (lambda x: ref.ref_topk_sigmoid(x, k), lambda x: fo.topk_sigmoid(x, k))
    a = (kw["n_group"], kw["topk_group"])
    o = dict(scoring_func=kw["scoring_func"], renormalize=kw["renormalize"],
             routed_scaling_factor=kw["routed_scaling_factor"])
    return (lambda x: ref.ref_grouped_topk(x, k, *a, bias, o["scoring_func"], o["renormalize"], o["routed_scaling_factor"]),
            lambda x: fo.grouped_topk(x, k, *a, bias=bias, **o))


def _check_routing(name, got, want):
    """Peers must agree with the op before their time means anything (weights as sorted rows:
    ties among bf16 logits may swap ids, never the weights)."""
    gw = got[0].float().sort(-1).values
    ww = want[0].float().sort(-1).values
    err = (gw - ww).abs().max().item() if gw.numel() else 0.0
    if not err <= 1e-4:
        raise AssertionError(f"moe_routing suite: {name} routing weights disagree (max |err| {err})")


def _check_align(name, got, want):
    for a, b in zip(got, want):
        if not torch.equal(a.int(), b.int()):
            raise AssertionError(f"moe_routing suite: {name} align disagrees with flashops")


def _time_all(ctx, case, impls, arg_sets, nbytes, **extra):
    for name, fn in impls:
        ms = ctx.time(fn, arg_sets, graph=ctx.device == "cuda")
        ctx.record(case, name, ms, bytes=nbytes, **extra)


# -------------------------------------------------------------------------------- cases
def run(ctx):
    import torch_flashops as fo

    dev, quick = ctx.device, ctx.quick
    models = ["mixtral-8x7b", "deepseek-v3", "llama4-scout"] if quick else list(MODELS)
    tokens = [1, 16] if quick else TOKENS
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)

    for name in ctx.progress(models, desc="moe_routing"):
        E, k, kind, kw = MODELS[name]
        bias = torch.randn(E, generator=g, device=dev) * 0.1 if kw.get("bias") else None
        peer, ours = _routing_fns(fo, kind, k, kw, bias)
        route_impls = ctx.peers(peer, ours, dynamic=True)
        align_peer = ctx.peers(torch_moe_align_block_size, fo.moe_align_block_size, dynamic=True)
        for T in tokens:
            sets = [(torch.randn(T, E, generator=g, device=dev).to(dt),) for _ in range(_N_SETS)]
            for label, fn in route_impls[:-1]:
                _check_routing(f"{name} {label}", fn(*sets[0]), ours(*sets[0]))
            nbytes = T * E * sets[0][0].element_size() + T * k * 8
            _time_all(ctx, f"route {name} T={T} E={E} k={k}", route_impls, sets, nbytes)

            B = 16 if T <= 256 else 64
            id_sets = [(ours(*s)[1], B, E) for s in sets]
            for label, fn in align_peer[:-1]:
                _check_align(f"{name} {label}", fn(*id_sets[0]), fo.moe_align_block_size(*id_sets[0]))
            cap, n_blocks = align_sizes(T * k, E, B, False)
            nbytes = T * k * 4 + (cap + n_blocks + 1) * 4
            _time_all(ctx, f"align {name} T={T} E={E} k={k} B={B}", align_peer, id_sets, nbytes)
