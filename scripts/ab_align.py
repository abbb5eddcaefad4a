"""Where fused_moe's alignment time goes at large T: ``ops.moe.fused_align`` (memset + count +
scatter, integer atomics) against the public ``moe_align_block_size`` (per-chunk histogram
table, no atomics), and fused_align's launches one at a time. CUDA-graph replays of 8 routings.

    PYTHONPATH=. python scripts/ab_align.py
"""
import torch

from benchmarks.harness import time_fn
from torch_flashops.ops import moe as ops
from torch_flashops.ops import moe_routing as rops

SHAPES = (("Qwen3", 128, 8, (1024, 4096, 16384)), ("DeepSeek", 256, 8, (4096, 16384)),
          ("Mixtral", 8, 2, (1024, 4096, 16384)))


def main():
    dev = "cuda"
    for name, E, k, Ts in SHAPES:
        for T in Ts:
            g = torch.Generator(device=dev).manual_seed(T)
            sets = [(torch.rand(T, E, device=dev, generator=g).topk(k, dim=1).indices.int(),) for _ in range(8)]
            numel = T * k
            nb = max(16, ops._pow2(E + 1))
            t_fused = time_fn(lambda ids: ops.fused_align(ids, 128, E), sets, device=dev, graph=True) * 1e3
            t_pub = time_fn(lambda ids: rops.moe_align_block_size_launch(ids, 128, E, None, False), sets, device=dev,
                            graph=True) * 1e3
            t_table = time_fn(lambda ids: ops.fused_align(ids, 128, E, table_min=0), sets, device=dev, graph=True) * 1e3
            cap = numel + (E + 1) * 127
            ch = 1024 if nb <= 64 else 256
            counts = torch.zeros((2 * nb,), dtype=torch.int32, device=dev)
            sorted_ids = torch.empty((cap,), dtype=torch.int32, device=dev)
            eids = torch.empty((ops.cdiv(cap, 128),), dtype=torch.int32, device=dev)
            ntp = torch.empty((1,), dtype=torch.int32, device=dev)

            def count(ids):
                ops._align_count_kernel[(ops.cdiv(cap, ch),)](ids, ids, counts, sorted_ids, numel, E, E, cap,
                                                                HAS_MAP=False, CH=ch, NB=nb, num_warps=4,
                                                                **ops.COMPILE_OPTIONS)

            def scatter(ids):  # cursors reset first: a replay must not carry slots past the buffer
                counts[nb:].zero_()
                ops._align_scatter_kernel[(max(1, ops.cdiv(numel, ch)),)](
                    ids, ids, counts, sorted_ids, eids, ntp, numel, E, E, 128, eids.numel(), HAS_MAP=False, CH=ch,
                    NB=nb, EB=max(16, 8192 // nb), num_warps=4, **ops.COMPILE_OPTIONS)

            t_memset = time_fn(lambda ids: counts.zero_(), sets, device=dev, graph=True) * 1e3
            t_count = time_fn(count, sets, device=dev, graph=True) * 1e3
            counts.zero_()
            count(sets[0][0])  # true bucket counts (the timed replays summed many): the scatter's layout
            t_scatter = time_fn(scatter, [sets[0]] * 8, device=dev, graph=True) * 1e3
            print(f"[align] {name} T={T} pairs={numel} E={E}: fused_align {t_fused:.1f} us (memset {t_memset:.1f}, "
                  f"count {t_count:.1f}, cursor memset + scatter {t_scatter:.1f} alone); table path {t_table:.1f} us; "
                  f"moe_align_block_size {t_pub:.1f} us",
                  flush=True)


def layers(points=(("DeepSeek-4GPU", 4096), ("DeepSeek-4GPU", 16384), ("Qwen3-4GPU", 4096), ("Qwen3-4GPU", 1024),
                   ("Mixtral-2GPU", 1024), ("Mixtral-2GPU", 4096), ("Mixtral-2GPU", 256)), rounds=2):
    """Whole fused_moe layers (CUDA-graph replays), the atomic align path vs the table path, alternating."""
    from benchmarks.suites.moe import MODELS, make_batches, make_layer
    from torch_flashops.fused_moe import fused_moe

    for name, T in points:
        cfg = MODELS[name]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
        flops = 6 * cfg["H"] * cfg["I"] * ids.numel()
        res = {"atomic": [], "table": []}
        outs = {}
        for _ in range(rounds):
            for path, lo in (("atomic", 1 << 62), ("table", 0)):
                ops.ALIGN_TABLE_MIN = lo
                outs[path] = fused_moe(x, w1, w2, tw, ids)
                res[path].append(time_fn(fused_moe, [(x, w1, w2, tw, ids)], device="cuda", graph=True) * 1e3)
        ops.ALIGN_TABLE_MIN = 1 << 62
        err = (outs["atomic"].float() - outs["table"].float()).abs().max().item()
        print(f"[layer] {name} T={T}: " + " | ".join(
            f"{p} " + " ".join(f"{t:.1f}" for t in ts) + f" us ({flops / min(ts) / 1e6:.1f} TFLOP/s best)"
            for p, ts in res.items()) + f"; max diff {err:.2e}", flush=True)
        del w1, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
    layers()
