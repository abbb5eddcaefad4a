"""A/B of grouped-GEMM config variants on one GEMM of a fused_moe layer (GEMM1 with its x
gather, or GEMM2), alternating in one process: CUDA-graph replays of the GEMM alone over one
routing, so the layer's other kernels (and their noise) stay out. Variants use the inline mode
syntax of ``ab_gemm_modes.py`` (only the part for the GEMM timed matters, e.g. ``b2/TS4``).

    PYTHONPATH=. python scripts/ab_phase.py --points Mixtral-2GPU:1024 --gemm 2 --modes shipped,b2/TS4 [--rounds 5]
"""
import argparse
import importlib.util
import os

import torch

from benchmarks.harness import time_fn
from benchmarks.suites.moe import MODELS, _parse_points, make_batches, make_layer
from torch_flashops.ops import moe as ops

_spec = importlib.util.spec_from_file_location("ab_gemm_modes",
                                               os.path.join(os.path.dirname(__file__), "ab_gemm_modes.py"))
_modes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_modes)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--points", default="Mixtral-2GPU:1024")
    p.add_argument("--gemm", type=int, default=2, choices=(1, 2))
    p.add_argument("--modes", default="shipped,b2/TS4")
    a = p.parse_args()
    for name, T in _parse_points(a.points):
        m = MODELS[name]
        E, I, H, k = m["E"], m["I"], m["H"], m["k"]
        w1, w2, bias = make_layer(m, "cuda", torch.bfloat16)
        x, _, tw, ids = make_batches(m, T, 1, "cuda", torch.bfloat16, bias)[0]
        base = ops.moe_config(T, k, E, I, H, x.dtype, x.device)
        block_m = base["block_m"]
        route = ops._route(base, ids, block_m, E, None)
        flat_w = ops._flat(tw)
        numel = T * k
        h = ops._intermediate(x, route, numel, I)
        ops._gemm1(x, w1, h, base["gemm1"], route, block_m, k, flat_w, False)
        y = x.new_empty((numel, H))
        cfgs = {}
        for mode in a.modes.split(","):
            fn = (lambda c: c) if mode == "shipped" else _modes._spec_mode(mode)[0]
            cfgs[mode] = fn(base)["gemm1" if a.gemm == 1 else "gemm2"]

        def run(cfg, out):
            if a.gemm == 1:
                ops._gemm1(x, w1, out, cfg, route, block_m, k, flat_w, False)
            else:
                ops._gemm2(h, w2, out, cfg, route, block_m, numel, flat_w, False)

        outs, times = {}, {mode: [] for mode in cfgs}
        for mode, cfg in cfgs.items():
            outs[mode] = torch.empty_like(h if a.gemm == 1 else y)
            run(cfg, outs[mode])
        for _ in range(a.rounds):
            for mode, cfg in cfgs.items():
                times[mode].append(time_fn(lambda: run(cfg, outs[mode]), [()], device="cuda", graph=True) * 1e3)
        ntp = int(route["align"][2].item())
        print(f"[phase] {name} T={T} GEMM{a.gemm} block_m={block_m} live blocks {-(-ntp // block_m)}", flush=True)
        # GEMM1 writes the sorted intermediate: compare its rows of real pairs (pads may stay unwritten)
        rows = slice(None) if a.gemm == 2 else (route["align"][0][:ntp] < numel).nonzero().flatten()
        ref = next(iter(outs.values()))[rows].float()
        for mode, ts in times.items():
            diff = (outs[mode][rows].float() - ref).abs().max().item()
            print(f"    {mode:16s} " + " ".join(f"{t:7.1f}" for t in ts)
                  + f" us  min {min(ts):7.1f}  max diff {diff:.2e}", flush=True)
        del w1, w2, x, h, y, outs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
