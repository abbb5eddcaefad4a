"""A/B of w1's gate/up order on whole MoE layers (CUDA-graph replays, alternating rounds, one
routing per point): ``fused_moe`` with ``[gate; up]`` weights, ``cutlass_fused_moe`` with the
same weights as FlashInfer's ``[up; gate]`` read in place, and the swap-by-copy that
``cutlass_fused_moe`` did before (``torch.cat`` of the halves, then ``fused_moe``). The in-place
output must equal ``fused_moe``'s bit for bit (same products, same order).

    PYTHONPATH=. python scripts/ab_up_first.py [--rounds 2] [--points Qwen3-4GPU:1,Mixtral-2GPU:4096,...]
"""
import argparse
import time

import torch

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, make_batches, make_layer
from torch_flashops.fused_moe import cutlass_fused_moe, fused_moe

POINTS = ("Qwen3-4GPU:1,Qwen3-4GPU:64,Qwen3-4GPU:4096,DeepSeek-4GPU:1,DeepSeek-4GPU:256,DeepSeek-4GPU:4096,"
          "Mixtral-2GPU:64,Mixtral-2GPU:4096")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--points", default=POINTS)
    a = p.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for point in a.points.split(","):
        t0 = time.time()
        name, T = point.split(":")
        T = int(T)
        cfg = MODELS[name]
        I = cfg["I"]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        fc1 = torch.cat([w1[:, I:], w1[:, :I]], 1)  # FlashInfer's [up; gate]
        x, _, tw, ids = make_batches(cfg, T, 1, "cuda", torch.bfloat16, bias)[0]
        ids = ids.int()

        def gate_up():
            return fused_moe(x, w1, w2, tw, ids)

        def in_place():
            return cutlass_fused_moe(x, ids, tw, fc1, w2, torch.bfloat16)[0]

        def swap_copy():  # the previous cutlass_fused_moe
            return fused_moe(x, torch.cat([fc1[:, I:], fc1[:, :I]], 1), w2, tw, ids)

        runs = {"fused_moe [gate; up]": gate_up, "cutlass in place": in_place, "cutlass swap copy": swap_copy}
        ref = gate_up()
        diffs = {n: (f().float() - ref.float()).abs().max().item() for n, f in runs.items()}
        times = {n: [] for n in runs}
        for _ in range(a.rounds):
            for n, f in runs.items():
                times[n].append(time_fn(f, [()], device="cuda", graph=True) * 1e3)
        base = min(times["fused_moe [gate; up]"])
        print(f"[up-first] {name} T={T} ({time.time() - t0:.0f} s)", flush=True)
        for n, ts in times.items():
            print(f"    {n:22s} " + " ".join(f"{t:9.1f}" for t in ts) + f" us  {min(ts) / base:.3f}x time of"
                  f" [gate; up]  max diff {diffs[n]:.2e}", flush=True)
        runs = ref = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
