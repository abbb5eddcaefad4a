"""RoPE (spec/rope.md): flashops against plain PyTorch, eager and torch.compile'd.

Shapes: Llama-3-8B-like heads (32 q / 8 kv, D 128, bf16), nnz from one decode token to a 64k-token
prefill; rows per case:
  torch-eager     the fast plain-PyTorch RoPE below (fp32 math, one pass per tensor)
  torch-compile   the same function through torch.compile (Inductor fuses it)
  flashops        apply_rope_pos_ids (out-of-place) / apply_rope_pos_ids_inplace on views of a
                  packed qkv buffer / apply_rope_with_cos_sin_cache
bytes = q and k read once + written once + positions read (what the op must move); the harness
reports GB/s against the measured copy bandwidth. nnz <= 4096 is timed as CUDA-graph replays
(launch gaps out); larger sizes rotate input sets past the L2 cache.
"""
from __future__ import annotations

import torch

LLAMA = dict(Hq=32, Hk=8, D=128)
SIZES = [1, 32, 256, 2048, 16384, 65536]
QUICK = dict(Hq=4, Hk=2, D=64)
QUICK_SIZES = [1, 16, 128]
GRAPH_MAX_NNZ = 4096
L2_BYTES = 100 << 20  # rotate enough input sets to exceed the 50 MB L2 twice


# ------------------------------------------------------------------------------------ peers
def torch_rope(q, k, pos, freqs, rd: int):
    """Rotate-half RoPE in plain PyTorch: fp32 angle and rotation, one rounding to the dtype."""
    ang = pos.float()[:, None] * freqs[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    half = rd // 2

    def rot(x):
        x1, x2 = x[..., :half].float(), x[..., half:rd].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rd:].float()], -1).to(x.dtype)

    return rot(q), rot(k)


def torch_rope_inplace(q, k, pos, freqs, rd: int):
    qo, ko = torch_rope(q, k, pos, freqs, rd)
    q.copy_(qo)
    k.copy_(ko)


def torch_rope_cache_inplace(positions, query, key, cache, head_size: int):
    """vLLM's forward_native: gather cos|sin rows from the fp32 cache, rotate-half, write back."""
    rd = cache.shape[1]
    cos, sin = cache[positions].float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rot(x):
        x3 = x.view(x.shape[0], -1, head_size)
        x1, x2 = x3[..., : rd // 2].float(), x3[..., rd // 2 : rd].float()
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x3[..., rd:].float()], -1)
        x.copy_(out.to(x.dtype).view(x.shape))

    rot(query)
    rot(key)


# ------------------------------------------------------------------------------------ inputs
def _packed_sets(nnz, Hq, Hk, D, dtype, device, set_bytes):
    """Enough (qkv, q, k, pos) sets that together they exceed L2; random data, random positions."""
    n = max(1, min(16, -(-L2_BYTES // max(set_bytes, 1))))
    sets = []
    for _ in range(n):
        qkv = torch.randn(nnz, (Hq + 2 * Hk) * D, device=device, dtype=dtype)
        q = qkv[:, : Hq * D].view(nnz, Hq, D)
        k = qkv[:, Hq * D : (Hq + Hk) * D].view(nnz, Hk, D)
        pos = torch.randint(0, 65536, (nnz,), device=device)
        sets.append((qkv, q, k, pos))
    return sets


def run(ctx):
    import torch_flashops as fo
    from torch_flashops.reference.rope import rope_freqs

    dev = ctx.device
    cfg, sizes = (QUICK, QUICK_SIZES) if ctx.quick else (LLAMA, SIZES)
    Hq, Hk, D = cfg["Hq"], cfg["Hk"], cfg["D"]
    dtype = torch.bfloat16
    freqs = rope_freqs(D).to(dev)
    max_pos = 65536
    t = torch.arange(max_pos, dtype=torch.float32, device=dev)
    cache = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    compiled = torch.compile(torch_rope, dynamic=False)
    compiled_inplace = torch.compile(torch_rope_inplace, dynamic=False)
    compiled_cache = torch.compile(torch_rope_cache_inplace, dynamic=False)

    for nnz in ctx.progress(sizes, desc="rope"):
        qk_bytes = nnz * (Hq + Hk) * D * dtype.itemsize
        moved = 2 * qk_bytes + nnz * 8  # read q, k + write q, k + int64 positions
        sets = _packed_sets(nnz, Hq, Hk, D, dtype, dev, 2 * qk_bytes)
        graph = nnz <= GRAPH_MAX_NNZ
        tag = f"nnz={nnz} H={Hq}/{Hk} D={D} bf16"
        pos_sets = [(q, k, p) for _, q, k, p in sets]
        extra = dict(nnz=nnz, graph=graph, sets=len(sets))

        case = tag + " out-of-place"
        ctx.record(case, "torch-eager", ctx.time(lambda q, k, p: torch_rope(q, k, p, freqs, D), pos_sets, graph=graph), bytes=moved, **extra)
        ctx.record(case, "torch-compile", ctx.time(lambda q, k, p: compiled(q, k, p, freqs, D), pos_sets, graph=graph), bytes=moved, **extra)
        ctx.record(case, "flashops", ctx.time(lambda q, k, p: fo.apply_rope_pos_ids(q, k, p), pos_sets, graph=graph), bytes=moved, **extra)

        case = tag + " in-place on packed qkv"
        ctx.record(case, "torch-eager", ctx.time(lambda q, k, p: torch_rope_inplace(q, k, p, freqs, D), pos_sets, graph=graph), bytes=moved, **extra)
        ctx.record(case, "torch-compile", ctx.time(lambda q, k, p: compiled_inplace(q, k, p, freqs, D), pos_sets, graph=graph), bytes=moved, **extra)
        ctx.record(case, "flashops", ctx.time(lambda q, k, p: fo.apply_rope_pos_ids_inplace(q, k, p), pos_sets, graph=graph), bytes=moved, **extra)

        if nnz >= 2048 or ctx.quick:  # the vLLM/SGLang entry point, 2-D query/key views
            case = tag + " cos_sin_cache in-place"
            cache_sets = [(p, qkv[:, : Hq * D], qkv[:, Hq * D : (Hq + Hk) * D]) for qkv, _, _, p in sets]
            moved_c = moved + nnz * D * 4  # plus one fp32 cache row per token
            ctx.record(case, "torch-eager", ctx.time(lambda p, qq, kk: torch_rope_cache_inplace(p, qq, kk, cache, D), cache_sets, graph=graph), bytes=moved_c, **extra)
            ctx.record(case, "torch-compile", ctx.time(lambda p, qq, kk: compiled_cache(p, qq, kk, cache, D), cache_sets, graph=graph), bytes=moved_c, **extra)
            ctx.record(case, "flashops", ctx.time(lambda p, qq, kk: fo.apply_rope_with_cos_sin_cache_inplace(p, qq, kk, D, cache), cache_sets, graph=graph), bytes=moved_c, **extra)
        del sets, pos_sets
        if dev == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ tuning
def tune(nnz: int = 65536, interleave: bool = False, inplace: bool = True) -> list:
    """Time every tile configuration of the RoPE kernel at one Llama size on the GPU and print
    GB/s and % of the measured copy bandwidth, best first (feeds ``ops/rope._launch_config``)."""
    import torch_flashops as fo
    from benchmarks.harness import measure_ceilings, time_fn
    from torch_flashops.ops import rope as rope_ops

    Hq, Hk, D = LLAMA["Hq"], LLAMA["Hk"], LLAMA["D"]
    copy = measure_ceilings("cuda")["copy_GBps"]
    sets = [(q, k, p) for _, q, k, p in _packed_sets(nnz, Hq, Hk, D, torch.bfloat16, "cuda", 2 * nnz * (Hq + Hk) * D * 2)]
    moved = 2 * nnz * (Hq + Hk) * D * 2 + nnz * 8
    fn = fo.apply_rope_pos_ids_inplace if inplace else fo.apply_rope_pos_ids
    rows = []
    for bt in (1, 2, 4, 8, 16):
        for bh in (1, 2, 4, 8, 16, 32):
            for warps in (2, 4, 8):
                if not 512 <= bt * bh * D <= 16384:
                    continue
                with rope_ops.launch_config(BLOCK_T=bt, BLOCK_H=bh, G=1, num_warps=warps):
                    ms = time_fn(lambda q, k, p: fn(q, k, p, None, interleave), sets, device="cuda")
                rows.append((moved / ms / 1e6, bt, bh, warps, ms))
    rows.sort(reverse=True)
    default = rope_ops._launch_config(nnz, Hq, Hk, D, D, interpreting=False)
    print(f"nnz={nnz} H={Hq}/{Hk} D={D} bf16 interleave={interleave} inplace={inplace}; copy {copy:.0f} GB/s; "
          f"default config {default}")
    for gbps, bt, bh, warps, ms in rows:
        print(f"BLOCK_T={bt:<3} BLOCK_H={bh:<3} warps={warps}  {ms * 1e3:8.1f} us  {gbps:6.0f} GB/s  {100 * gbps / copy:5.1f}%")
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="RoPE tile tuning on the GPU (see tune())")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--nnz", type=int, default=65536)
    ap.add_argument("--interleave", action="store_true")
    ap.add_argument("--out-of-place", action="store_true")
    a = ap.parse_args()
    if a.tune:
        tune(a.nnz, a.interleave, not a.out_of_place)
