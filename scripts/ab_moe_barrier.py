"""A/B of the one-launch decode MoE kernel's two grid-barrier forms (``ops.DECODE_GEN_BARRIER``)
on the layers it serves, alternating in one process: CUDA-graph replays of 16 routings per
layer (``time_fn(..., graph=True)``), outputs compared bitwise between the forms.

    PYTHONPATH=. python scripts/ab_moe_barrier.py [--rounds 3] [--points Qwen3-4GPU:1,Qwen3-4GPU:2]
"""
import argparse

import torch

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, _work, make_batches, make_layer
from torch_flashops.fused_moe import fused_moe
from torch_flashops.ops import moe as ops


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--points", default="Qwen3-4GPU:1,Qwen3-4GPU:2,Qwen3-4GPU:4")
    a = p.parse_args()
    for point in a.points.split(","):
        name, T = point.split(":")
        T = int(T)
        cfg = MODELS[name]
        w1, w2, bias = make_layer(cfg, "cuda", torch.bfloat16)
        batches = make_batches(cfg, T, 16, "cuda", torch.bfloat16, bias)
        args = [(x, w1, w2, tw, ids) for x, _, tw, ids in batches]
        _, nbytes = _work(cfg, batches, 2)
        outs = {}
        for form in (False, True):
            ops.DECODE_GEN_BARRIER = form
            outs[form] = [fused_moe(*x) for x in args]
        same = all(torch.equal(u, v) for u, v in zip(outs[False], outs[True]))
        times = {False: [], True: []}
        for _ in range(a.rounds):
            for form in (False, True):
                ops.DECODE_GEN_BARRIER = form
                times[form].append(time_fn(fused_moe, args, device="cuda", graph=True) * 1e3)
        line = " | ".join(f"{'gen' if f else 'count+leave'} " + " ".join(f"{t:.2f}" for t in ts) + " us"
                          f" ({nbytes / min(ts) / 1e3:.0f} GB/s best)" for f, ts in times.items())
        print(f"[barrier] {name} T={T} one launch={ops.decode_one_launch('cuda', T * cfg['k'], cfg['I'], cfg['H'])}"
              f" bitwise equal={same}: {line}", flush=True)
    ops.DECODE_GEN_BARRIER = False


if __name__ == "__main__":
    main()
