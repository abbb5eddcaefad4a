"""A/B of the grouped GEMM's half-tail blocks (``ops.HALF_TAIL_MIN_BLOCK_M``) on whole fused_moe
layers, alternating in one process: CUDA-graph replays of one routing per point, outputs of
each mode compared with the "off" mode's, and the torch._grouped_mm forward of the same inputs
for the ratio.

    PYTHONPATH=. python scripts/ab_half_tail.py [--rounds 3] [--points Mixtral-2GPU:1024,Qwen3-4GPU:4096]
"""
import argparse
import time

import torch

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, grouped_mm_forward, make_batches, make_layer
from torch_flashops.fused_moe import fused_moe
from torch_flashops.ops import moe as ops

MODES = {"off": 1 << 30, "half>=128": 128, "half>=64": 64}
POINTS = ("Mixtral-2GPU:1024,Mixtral-2GPU:4096,Qwen3-4GPU:1024,Qwen3-4GPU:4096,DeepSeek-4GPU:1024,"
          "DeepSeek-4GPU:4096,DeepSeek-4GPU:16384")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--points", default=POINTS)
    a = p.parse_args()
    default = ops.HALF_TAIL_MIN_BLOCK_M
    for point in a.points.split(","):
        t0 = time.time()
        name, T = point.split(":")
        T = int(T)
        cfg = MODELS[name]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
        args = [(x, w1, w2, tw, ids)]
        flops = 6 * cfg["H"] * cfg["I"] * ids.numel()
        block_m = ops.moe_config(T, cfg["k"], cfg["E"], cfg["I"], cfg["H"], torch.bfloat16, x.device)["block_m"]
        outs, times = {}, {m: [] for m in MODES}
        for m, lo in MODES.items():
            ops.HALF_TAIL_MIN_BLOCK_M = lo
            outs[m] = fused_moe(*args[0])
        for _ in range(a.rounds):
            for m, lo in MODES.items():
                ops.HALF_TAIL_MIN_BLOCK_M = lo
                times[m].append(time_fn(fused_moe, args, device="cuda", graph=True) * 1e3)
        ops.HALF_TAIL_MIN_BLOCK_M = default
        gmm = time_fn(grouped_mm_forward, args, device="cuda", graph=True) * 1e3
        diff = {m: (outs[m].float() - outs["off"].float()).abs().max().item() for m in MODES if m != "off"}
        line = " | ".join(f"{m} " + " ".join(f"{t:.1f}" for t in ts) + f" us ({flops / min(ts) / 1e6:.1f} TFLOP/s,"
                          f" {gmm / min(ts):.3f}x grouped_mm)" for m, ts in times.items())
        print(f"[half-tail] {name} T={T} block_m={block_m}: {line}; grouped_mm {gmm:.1f} us; max diff vs off "
              + " ".join(f"{m} {d:.2e}" for m, d in diff.items()) + f" ({time.time() - t0:.0f} s)", flush=True)
        del w1, w2, x, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
